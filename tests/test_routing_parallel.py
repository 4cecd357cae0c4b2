"""Routing part 2 under expert parallelism (gloo on CPU, 2 ranks): top-p, null experts and DS-MoE equal the
single-process layer; gating dropout keeps every token on its own rank's experts.

One spawned job runs every case (the harness of tests/test_parallel.py); each pytest test reads its case's verdict.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import test_parallel as harness
from reference_adaptive import swiglu_expert

WORLD_SIZE = 2
E = harness.NUM_EXPERTS
MODES = harness.MODES


def _grad(p):
    return harness.grad_or_zeros(p)


def check_equal_to_single_process(config, sizes):
    """This rank's output, aux loss, tokens per expert and input gradient equal the single-process layer's on this
    rank's tokens; expert-shard gradients equal the slice of the single-process ones (every rank's loss summed);
    replicated parameters (router, null experts) have gradients whose sum over ranks is the single-process one."""
    group = dist.group.WORLD
    rank = dist.get_rank()
    full, ep = harness.full_and_sharded(config, group)
    xs, masks, grads = harness.rank_inputs(sizes, seed=100, padding=True)
    ref = [harness.run(full, xs[s], masks[s], grads[s]) for s in range(WORLD_SIZE)]
    x, y, aux, stats = harness.run(ep, xs[rank], masks[rank], grads[rank])
    x_ref, y_ref, aux_ref, stats_ref = ref[rank]
    assert_close(y.detach(), y_ref.detach(), **harness.TIGHT)
    assert_close(aux.detach(), aux_ref.detach(), **harness.TIGHT)
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    assert_close(stats.experts_per_token, stats_ref.experts_per_token, **harness.TIGHT)
    assert_close(x.grad, x_ref.grad, **harness.TIGHT)
    full_params = dict(full.named_parameters())
    shard = slice(rank * ep.experts.num_experts, (rank + 1) * ep.experts.num_experts)
    for name, p in ep.named_parameters():
        if name.startswith("experts."):
            assert_close(_grad(p), _grad(full_params[name])[shard], **harness.TIGHT, msg=lambda m, n=name: f"{n}: {m}")
        else:
            summed = _grad(p)
            dist.all_reduce(summed)
            assert_close(summed, _grad(full_params[name]), **harness.TIGHT, msg=lambda m, n=name: f"{n}: {m}")
    remote = torch.ones(E, dtype=torch.bool)
    remote[shard] = False
    assert stats.tokens_per_expert[remote].sum() > 0, "test setup: no token leaves this rank"


def _cases():
    cases = {}
    for mode, options in MODES.items():
        cases[f"top_p_{mode}"] = lambda o=options: check_equal_to_single_process(
            harness.make_config(router="top_p", top_k=3, top_p_threshold=0.6, **o), [9, 7])
        cases[f"null_experts_{mode}"] = lambda o=options: check_equal_to_single_process(
            harness.make_config(num_zero_experts=1, num_copy_experts=1, num_constant_experts=2, **o), [9, 7])
        cases[f"gating_dropout_{mode}"] = lambda o=options: check_gating_dropout_stays_local(o)
    cases["ds_moe_dropless"] = lambda: check_equal_to_single_process(harness.make_config(router="ds_moe",
                                                                                         **MODES["dropless"]), [9, 7])
    return cases


def check_gating_dropout_stays_local(options):
    rank = dist.get_rank()
    config = harness.make_config(gating_dropout=1.0, aux_loss_coef=0.0, z_loss_coef=0.0, **options)
    full, ep = harness.full_and_sharded(config, dist.group.WORLD)
    xs, _, grads = harness.rank_inputs([10, 6], seed=200)
    x, y, _, stats = harness.run(ep, xs[rank], None, grads[rank])
    local = E // WORLD_SIZE
    T = xs[rank].shape[0]
    params = {n: p.detach() for n, p in full.named_parameters()}
    expert_of = [rank * local + t * local // T for t in range(T)]
    y_ref = torch.stack([swiglu_expert(params, expert_of[t], xs[rank][t]) for t in range(T)])
    assert_close(y.detach(), y_ref, **harness.TIGHT)
    assert torch.equal(stats.tokens_per_expert, torch.bincount(torch.tensor(expert_of), minlength=E))


CASES = _cases()


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=harness.GROUP_TIMEOUT_S))
    results = {}
    try:
        for name, case in CASES.items():
            try:
                case()
                results[name] = {"ok": True}
            except BaseException:  # noqa: BLE001  (reported to the test)
                results[name] = {"ok": False, "error": traceback.format_exc()}
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


_JOB: dict = {}


def _job() -> dict:
    if not _JOB:
        _JOB.update(harness._run_job(WORLD_SIZE, _worker))
    return _JOB


@pytest.mark.parametrize("case", list(CASES))
def test_routing_part2_expert_parallel(case):
    problems = harness._case_problems(_job(), case)
    assert not problems, "\n".join(problems)

"""Expert parallelism across processes (gloo on CPU, 2 and 4 ranks) against the single-process layer.

Spawning is slow, so one job per world size runs every case in the same process group; each pytest test then
reads its case's verdict. Every job carries a deadline (and the process group a timeout), so a hang fails the
test instead of blocking the suite.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tempfile
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

import torch_moe
from torch_moe import parallel

D_MODEL, D_FF, NUM_EXPERTS = 8, 12, 8
JOB_DEADLINE_S = 240  # a whole job; normal runs take a small fraction of this
GROUP_TIMEOUT_S = 30  # a collective that waits longer than this raises instead of hanging
FAST_FAILURE_S = 10  # a mismatch must be reported well before GROUP_TIMEOUT_S
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64: the same math in other GEMM shapes, nothing more

CAPACITY = dict(capacity_factor=1.0, min_capacity=1)  # tight enough that some assignments are dropped
DROPLESS = dict(capacity_factor=None)
MODES = {"capacity": CAPACITY, "dropless": DROPLESS}


# --------------------------------------------------------------------------------------------------
# helpers (run inside the workers)


def make_config(**overrides):
    config = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, top_k=2, jitter_eps=0.0,
                  aux_loss_coef=0.1, z_loss_coef=0.01)
    config.update(overrides)
    return config


def randomize_(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
            scale = 0.5 if name.endswith("router.weight") else 1.0 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)
    return module


def full_and_sharded(config, group=None, seed=0):
    """The single-process layer (all experts) and this rank's expert-parallel layer with the same weights."""
    full = randomize_(torch_moe.MoE(**config, dtype=torch.float64), seed)
    group = group if group is not None else dist.group.WORLD
    ep = torch_moe.MoE(**config, expert_parallel_group=group, dtype=torch.float64)
    ep.load_state_dict(parallel.shard_state_dict(full.state_dict(), ep))
    return full, ep


def rank_inputs(sizes, seed=100, padding=False):
    """Every rank's tokens (each rank builds all of them; the single-process run needs them all)."""
    xs, masks, grads = [], [], []
    for rank, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(seed + rank)
        xs.append(torch.randn(size, D_MODEL, generator=gen, dtype=torch.float64))
        grads.append(torch.randn(size, D_MODEL, generator=gen, dtype=torch.float64))
        mask = torch.rand(size, generator=gen) > 0.25 if padding else None
        masks.append(mask)
    return xs, masks, grads


def run(layer, x, mask, grad_out, requires_grad=True):
    x = x.detach().clone().requires_grad_(requires_grad)
    y = layer(x, padding_mask=mask)
    aux, stats = layer.aux_loss, layer.stats
    ((y * grad_out).sum() + aux).backward()
    return x, y, aux, stats


def grad_or_zeros(p):
    """A parameter that took part in no computation has no grad; for the comparison that is a zero gradient."""
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def check_against_single_process(config, sizes, padding=False, requires_grad=None, group=None, seed=0,
                                 expect_drops=None, expect_remote=True):
    """The core equality: this rank's outputs, aux loss, stats and input gradient equal the single-process layer's
    on this rank's tokens; the expert-shard gradients equal the matching slice of the single-process gradients
    of the sum of every rank's loss; the router gradients, summed over the group, equal the single-process one."""
    group = group if group is not None else dist.group.WORLD
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    assert len(sizes) == world_size
    requires_grad = requires_grad or [True] * world_size
    full, ep = full_and_sharded(config, group, seed)
    xs, masks, grads = rank_inputs(sizes, seed=seed + 100, padding=padding)

    ref = []
    for s in range(world_size):
        x_s, y_s, aux_s, stats_s = run(full, xs[s], masks[s], grads[s], requires_grad[s])
        ref.append((x_s, y_s.detach(), aux_s.detach(), stats_s))
    x, y, aux, stats = run(ep, xs[rank], masks[rank], grads[rank], requires_grad[rank])
    x_ref, y_ref, aux_ref, stats_ref = ref[rank]

    assert y.shape == xs[rank].shape and y.dtype == torch.float64
    assert_close(y.detach(), y_ref, **TIGHT, msg=lambda m: f"rank {rank} output: {m}")
    assert_close(aux.detach(), aux_ref, **TIGHT, msg=lambda m: f"rank {rank} aux_loss: {m}")
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert), (
        stats.tokens_per_expert.tolist(), stats_ref.tokens_per_expert.tolist())
    assert torch.equal(stats.dropped_fraction, stats_ref.dropped_fraction), (
        stats.dropped_fraction.item(), stats_ref.dropped_fraction.item())
    for field in ("router_entropy", "load_balancing_loss", "z_loss"):
        assert_close(getattr(stats, field), getattr(stats_ref, field), **TIGHT, msg=lambda m, f=field: f"{f}: {m}")
    if requires_grad[rank]:
        assert_close(x.grad, x_ref.grad, **TIGHT, msg=lambda m: f"rank {rank} grad of x: {m}")
    else:
        assert x.grad is None

    full_grads = {name: p.grad for name, p in full.named_parameters()}
    ep_params = dict(ep.named_parameters())
    assert set(ep_params) == set(full_grads)
    shard = slice(rank * ep.experts.num_experts, (rank + 1) * ep.experts.num_experts)
    for name, p in ep_params.items():
        if name == "router.weight":
            summed = grad_or_zeros(p)
            dist.all_reduce(summed, group=group)
            assert_close(summed, grad_or_zeros(dict(full.named_parameters())[name]), **TIGHT,
                         msg=lambda m: f"summed router grad: {m}")
        else:
            want = grad_or_zeros(dict(full.named_parameters())[name])[shard]
            got = grad_or_zeros(p)
            assert got.shape == want.shape
            assert_close(got, want, **TIGHT, msg=lambda m, n=name: f"rank {rank} grad of {n}: {m}")

    # The setup does what the case claims.
    dropped = torch.stack([r[3].dropped_fraction for r in ref])
    if expect_drops is True:
        assert dropped[rank] > 0, "test setup: the single-process layer drops nothing on this rank"
    elif expect_drops is False:
        assert torch.all(dropped == 0)
    if expect_remote:
        remote = torch.ones(NUM_EXPERTS, dtype=torch.bool)
        remote[shard] = False
        assert stats.tokens_per_expert[remote].sum() > 0, "test setup: no token leaves this rank"
    return full, ep, ref


def raises_fast(fn, exc_type, *needles):
    start = time.monotonic()
    try:
        fn()
    except exc_type as err:
        elapsed = time.monotonic() - start
        message = str(err)
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        assert elapsed < FAST_FAILURE_S, f"the failure took {elapsed:.1f} s"
        return message
    raise AssertionError(f"{fn} did not raise {exc_type.__name__}")


# --------------------------------------------------------------------------------------------------
# cases (each is called on every rank, in the same order)


def case_capacity_equal_batches(rank, world_size):
    for drop_policy in ("position", "probability"):
        config = make_config(**CAPACITY, drop_policy=drop_policy)
        check_against_single_process(config, [16] * world_size, expect_drops=True)


def case_capacity_uneven_batches_padding_bias(rank, world_size):
    # Different T per rank means a different capacity per rank; drops must still be exactly the local layer's.
    # capacity_factor 0.5: C = ceil(T / 8), i.e. 1, 2, 3, 4 slots per expert on ranks 0..3.
    sizes = [7 + 6 * r for r in range(world_size)]
    for drop_policy in ("position", "probability"):
        config = make_config(capacity_factor=0.5, min_capacity=1, drop_policy=drop_policy, expert="mlp",
                             activation="relu", bias=True)
        _, ep, _ = check_against_single_process(config, sizes, padding=True, seed=3, expect_drops=True)
        assert ep.capacity(sizes[rank]) == rank + 1
    config = make_config(capacity_factor=8.0, min_capacity=2, expert="geglu", bias=True, top_k=1)  # C = T
    check_against_single_process(config, sizes[::-1], seed=4, expect_drops=False)


def case_dropless_equal_batches(rank, world_size):
    check_against_single_process(make_config(**DROPLESS), [12] * world_size, expect_drops=False)


def case_dropless_uneven_batches_padding_bias(rank, world_size):
    sizes = [5 + 7 * ((r + 1) % world_size) for r in range(world_size)]
    check_against_single_process(make_config(**DROPLESS, expert="mlp", activation="gelu", bias=True), sizes,
                                 padding=True, seed=5)
    check_against_single_process(make_config(**DROPLESS, expert="swiglu", bias=True, top_k=3), sizes[::-1], seed=6)


def case_zero_tokens_on_one_rank(rank, world_size):
    sizes = [0] + [9] * (world_size - 1)
    for mode, extra in MODES.items():
        check_against_single_process(make_config(**extra), sizes, seed=7, expect_remote=rank != 0)
    # No tokens anywhere (capacity 0 on every rank, so no exchange at all; dropless exchanges empty splits).
    for extra in (dict(capacity_factor=1.0, min_capacity=0), DROPLESS):
        check_against_single_process(make_config(**extra), [0] * world_size, seed=8, expect_remote=False)


def case_all_tokens_to_one_rank(rank, world_size):
    # Positive tokens and a router whose rows are positive only for the last rank's experts: every token of every
    # rank chooses experts held by the last rank, so the other ranks' experts get nothing.
    config_overrides = dict(top_k=2)
    target = world_size - 1
    per_rank = NUM_EXPERTS // world_size
    owned = slice(target * per_rank, (target + 1) * per_rank)
    for mode, extra in MODES.items():
        config = make_config(**extra, **config_overrides)
        full, ep = full_and_sharded(config, seed=9)
        with torch.no_grad():
            weight = -torch.ones(NUM_EXPERTS, D_MODEL, dtype=torch.float64)
            weight[owned] = torch.linspace(1.0, 1.5, per_rank, dtype=torch.float64).unsqueeze(1)
            full.router.weight.copy_(weight)
            ep.router.weight.copy_(weight)
        if mode == "dropless":
            # An expert path that returns a fresh zero tensor when no rows arrive (as a per-expert Python loop
            # does) must not cut the graph: the idle ranks still take part in the backward exchange.
            grouped = ep.experts.forward_grouped
            ep.experts.forward_grouped = lambda rows, offsets: (
                torch.zeros_like(rows) if rows.shape[0] == 0 else grouped(rows, offsets))
        sizes = [6 + r for r in range(world_size)]
        xs, _, grads = rank_inputs(sizes, seed=50)
        xs = [x.abs() + 0.1 for x in xs]
        x_ref = [run(full, xs[s], None, grads[s]) for s in range(world_size)]
        x, y, aux, stats = run(ep, xs[rank], None, grads[rank])
        others = torch.ones(NUM_EXPERTS, dtype=torch.bool)
        others[owned] = False
        assert stats.tokens_per_expert[others].sum() == 0 and stats.tokens_per_expert[owned].sum() == 2 * sizes[rank]
        assert_close(y.detach(), x_ref[rank][1].detach(), **TIGHT)
        assert_close(x.grad, x_ref[rank][0].grad, **TIGHT)
        assert torch.equal(stats.dropped_fraction, x_ref[rank][3].dropped_fraction)
        if mode == "capacity":
            assert stats.dropped_fraction > 0
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        for name, p in ep.experts.named_parameters():
            want = dict(full.experts.named_parameters())[name].grad[shard]
            got = p.grad if p.grad is not None else torch.zeros_like(want)
            assert_close(got, want, **TIGHT)
            if rank != target:
                assert torch.count_nonzero(got) == 0
        summed = ep.router.weight.grad.clone()
        dist.all_reduce(summed)
        assert_close(summed, full.router.weight.grad, **TIGHT)


def case_input_without_grad_on_one_rank(rank, world_size):
    # Rank 0's input needs no gradient; its exchanges must still take part in the backward of the others.
    requires_grad = [r != 0 for r in range(world_size)]
    for mode, extra in MODES.items():
        check_against_single_process(make_config(**extra), [10] * world_size, requires_grad=requires_grad, seed=10)


def case_global_load_balancing(rank, world_size):
    for mode, extra in MODES.items():
        config = make_config(**extra, aux_loss_coef=1.0, z_loss_coef=0.0)
        full, ep_local = full_and_sharded(config, seed=11)
        ep = torch_moe.MoE(**config, expert_parallel_group=dist.group.WORLD, global_load_balancing=True,
                           dtype=torch.float64)
        ep.load_state_dict(ep_local.state_dict())
        sizes = [4 + 5 * r for r in range(world_size)]
        xs, masks, _ = rank_inputs(sizes, seed=60, padding=True)
        y = ep(xs[rank], padding_mask=masks[rank])
        y_local = ep_local(xs[rank], padding_mask=masks[rank])
        assert torch.equal(y, y_local), "global balancing must not change the output"
        assert_close(ep.stats.z_loss, ep_local.stats.z_loss, **TIGHT)
        ep.aux_loss.backward()  # aux loss only: the backward needs no exchange, on any rank

        y_all = full(torch.cat(xs), padding_mask=torch.cat(masks))
        full.aux_loss.backward()
        mean_loss = ep.stats.load_balancing_loss.clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
        assert_close(mean_loss, full.stats.load_balancing_loss, **TIGHT)
        assert not torch.allclose(ep.stats.load_balancing_loss, ep_local.stats.load_balancing_loss), (
            "test setup: the local and the global loss coincide")
        summed = ep.router.weight.grad.clone()
        dist.all_reduce(summed)
        assert_close(summed, world_size * full.router.weight.grad, **TIGHT)
        del y_all
    # Uniform router: the global loss is exactly 1 on every rank when the ranks hold as many valid tokens.
    ep = torch_moe.MoE(**make_config(), expert_parallel_group=dist.group.WORLD, global_load_balancing=True,
                       dtype=torch.float64)
    with torch.no_grad():
        ep.router.weight.zero_()
    ep(torch.randn(12, D_MODEL, dtype=torch.float64))
    assert_close(ep.stats.load_balancing_loss, torch.tensor(1.0, dtype=torch.float64), **TIGHT)


class TwoLayerModel(nn.Module):
    def __init__(self, group=None, num_experts=NUM_EXPERTS):
        super().__init__()
        kw = {} if group is None else {"expert_parallel_group": group}
        self.embed = nn.Linear(D_MODEL, D_MODEL, dtype=torch.float64)
        self.moe1 = torch_moe.MoE(D_MODEL, D_FF, num_experts, capacity_factor=None, dtype=torch.float64, **kw)
        self.blocks = nn.ModuleList([torch_moe.MoE(D_MODEL, D_FF, num_experts, expert="mlp", bias=True,
                                                   dtype=torch.float64, **kw)])

    def forward(self, x):
        return self.blocks[0](self.moe1(self.embed(x)))


def case_other_token_choice_routers(rank, world_size):
    # With a frozen bias (rate 0) the sigmoid router, and the frozen random router, shard exactly like softmax.
    sizes = [6 + 2 * r for r in range(world_size)]
    for router, extra in (("sigmoid", dict(bias_update_rate=0.0, n_groups=2, topk_groups=1)), ("random", {})):
        for capacity_factor in (1.0, None):
            torch.manual_seed(1234)  # the random router's frozen weight is a buffer drawn from the (shared) seed
            try:
                check_against_single_process(make_config(router=router, capacity_factor=capacity_factor, **extra),
                                             sizes, padding=True)
            except AssertionError as err:
                raise AssertionError(f"router={router}, capacity_factor={capacity_factor}: {err}") from err


def case_sigmoid_bias_stays_replicated(rank, world_size):
    # Every rank sees different tokens, yet the loss-free balancing bias must move by the group's load.
    config = make_config(router="sigmoid", bias_update_rate=0.1, capacity_factor=1.0)
    full, ep = full_and_sharded(config)
    xs, masks, _ = rank_inputs([5 + 3 * r for r in range(world_size)], padding=True)
    ep.train()
    ep(xs[rank], padding_mask=masks[rank]).sum().backward()  # the update lands when the backward ends
    biases = [torch.empty_like(ep.router.expert_bias) for _ in range(world_size)]
    dist.all_gather(biases, ep.router.expert_bias)
    assert all(torch.equal(b, biases[0]) for b in biases)
    load = torch.zeros(NUM_EXPERTS, dtype=torch.int64)
    with torch.no_grad():
        full.eval()
        for x, mask in zip(xs, masks):
            full(x, padding_mask=mask)
            load += full.stats.tokens_per_expert
    load = load.to(torch.float32)
    assert_close(ep.router.expert_bias, 0.1 * torch.sign(load.mean() - load))


def case_checkpoint_round_trip(rank, world_size):
    full = randomize_(TwoLayerModel(), seed=12)
    full_sd = full.state_dict()
    ep = TwoLayerModel(group=dist.group.WORLD)
    ep_keys = parallel.expert_parameter_names(ep)
    expected_keys = [f"{p}.experts.{n}" for p, names in (("moe1", "w1 w2 w3"), ("blocks.0", "w1 w2 b1 b2"))
                     for n in names.split()]
    assert sorted(ep_keys) == sorted(expected_keys)
    ep.load_state_dict(parallel.shard_state_dict(full_sd, ep))
    per_rank = NUM_EXPERTS // world_size
    assert ep.moe1.experts.w1.shape == (per_rank, D_MODEL, D_FF)
    assert torch.equal(ep.moe1.experts.w1, full.moe1.experts.w1[rank * per_rank:(rank + 1) * per_rank])

    # Collective gather: the single-process state_dict on every rank, bit for bit.
    gathered = parallel.full_state_dict(ep)
    assert list(gathered) == list(full_sd)
    for key in full_sd:
        assert torch.equal(gathered[key], full_sd[key]), key
    restored = TwoLayerModel()
    restored.load_state_dict(gathered)
    x = torch.randn(5, D_MODEL, dtype=torch.float64)
    assert torch.equal(restored(x), full(x))

    # Offline: the files each rank would save, merged; and re-split for every world size that divides E.
    buffer = io.BytesIO()
    torch.save(ep.state_dict(), buffer)
    shards = [None] * world_size
    dist.all_gather_object(shards, buffer.getvalue())
    shards = [torch.load(io.BytesIO(b), weights_only=True) for b in shards]
    merged = parallel.merge_expert_shards(shards)
    for key in full_sd:
        assert torch.equal(merged[key], full_sd[key]), key
    for other in (1, 2, 4, 8):
        pieces = [parallel.split_expert_state_dict(full_sd, other, r) for r in range(other)]
        assert pieces[0]["moe1.experts.w2"].shape[0] == NUM_EXPERTS // other
        assert torch.equal(pieces[0]["embed.weight"], full_sd["embed.weight"])
        again = parallel.merge_expert_shards(pieces, prefixes=["moe1", "blocks.0"])
        for key in full_sd:
            assert torch.equal(again[key], full_sd[key]), (other, key)
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        parallel.split_expert_state_dict(full_sd, 3, 0)

    # The sharded model computes what the single-process model computes, on this rank's tokens.
    y_ep = ep(x)
    assert_close(y_ep, full(x), **TIGHT)


def case_beside_ddp(rank, world_size):
    # DDP all-reduces the replicated parameters only; the expert shards keep the gradients of the exchange.
    full = randomize_(TwoLayerModel(), seed=13)
    ep = TwoLayerModel(group=dist.group.WORLD)
    ep.load_state_dict(parallel.shard_state_dict(full.state_dict(), ep))
    plain = TwoLayerModel(group=dist.group.WORLD)
    plain.load_state_dict(ep.state_dict())
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        ep, parallel.expert_parameter_names(ep))
    ddp = nn.parallel.DistributedDataParallel(ep)
    x = torch.randn(6, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(70 + rank))
    (ddp(x).square().sum() + torch_moe.aux_loss(ep)).backward()
    (plain(x).square().sum() + torch_moe.aux_loss(plain)).backward()
    expert_names = set(parallel.expert_parameter_names(ep))
    plain_params = dict(plain.named_parameters())
    for name, p in ep.named_parameters():
        if name in expert_names:
            assert torch.equal(p.grad, plain_params[name].grad), name
        else:
            averaged = plain_params[name].grad.clone()
            dist.all_reduce(averaged)
            assert_close(p.grad, averaged / world_size, **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


def case_beside_fsdp2(rank, world_size):
    # FSDP2 (fully_shard on a CPU mesh over gloo) shards the replicated parameters; the expert shards are left out
    # with ignored_params. Two training steps against the single-process model on all ranks' tokens.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    full = randomize_(TwoLayerModel(), seed=15)
    ep = TwoLayerModel(group=dist.group.WORLD)
    ep.load_state_dict(parallel.shard_state_dict(full.state_dict(), ep))
    expert_names = set(parallel.expert_parameter_names(ep))
    ignored = {p for name, p in ep.named_parameters() if name in expert_names}
    mesh = init_device_mesh("cpu", (world_size,))
    for module in (ep.embed, ep.moe1, ep.blocks[0]):  # resharded after forward: the backward all-gathers again
        fully_shard(module, mesh=mesh, ignored_params=ignored, reshard_after_forward=True)
    fully_shard(ep, mesh=mesh, ignored_params=ignored)
    ep_params = dict(ep.named_parameters())
    assert {name for name, p in ep_params.items() if not isinstance(p, DTensor)} == expert_names
    per_rank = NUM_EXPERTS // world_size
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    ep_opt = torch.optim.SGD(ep.parameters(), lr=0.05)
    full_opt = torch.optim.SGD(full.parameters(), lr=0.05)

    def loss(model, x):
        y = model(x)
        return y, y.square().sum() + torch_moe.aux_loss(model)

    for step in range(2):
        xs = [torch.randn(5 + s, D_MODEL, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(80 + 10 * step + s)) for s in range(world_size)]
        with warnings.catch_warnings():  # FSDP2 warns that the layer returns a view (no in-place op follows here)
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            y, ep_loss = loss(ep, xs[rank])
            ep_loss.backward()
        full_outputs = []
        for x in xs:  # the single-process gradient of the sum of every rank's loss
            y_s, loss_s = loss(full, x)
            loss_s.backward()
            full_outputs.append(y_s.detach())
        assert_close(y.detach(), full_outputs[rank], **TIGHT, msg=lambda m: f"step {step} output: {m}")
        full_params = dict(full.named_parameters())
        for name, p in ep_params.items():
            want = full_params[name].grad
            if name in expert_names:  # the exchange sums the expert gradients over the ranks
                assert_close(p.grad, want[shard], **TIGHT, msg=lambda m, n=name: f"step {step} {n}: {m}")
                p.grad.div_(world_size)  # the gradient of the mean loss, as FSDP's average for the rest
            else:  # FSDP reduce-scatters the mean over the ranks; gathered, it is the mean loss's gradient
                assert isinstance(p.grad, DTensor)
                assert_close(p.grad.full_tensor(), want / world_size, **TIGHT,
                             msg=lambda m, n=name: f"step {step} {n}: {m}")
        for p in full.parameters():
            p.grad.div_(world_size)
        ep_opt.step()
        full_opt.step()
        ep_opt.zero_grad()
        full_opt.zero_grad()

    # The gathered checkpoint: expert shards concatenated by full_state_dict, FSDP's DTensors gathered by the user.
    gathered = parallel.full_state_dict(ep)
    full_sd = full.state_dict()
    assert list(gathered) == list(full_sd)
    for key, value in gathered.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        assert_close(value, full_sd[key], **TIGHT, msg=lambda m, k=key: f"{k}: {m}")


def case_subgroups(rank, world_size):
    # Expert-parallel groups smaller than the world (here pairs of ranks, or each rank alone).
    size = 2 if world_size >= 4 else 1
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world_size, size)]
    group = groups[rank // size]
    for mode, extra in MODES.items():
        _, ep, _ = check_against_single_process(make_config(**extra), [8 + r for r in range(size)], group=group,
                                                seed=14, expect_remote=size > 1)
        assert ep.expert_parallel_size == size and ep.experts.num_experts == NUM_EXPERTS // size


def case_construction_errors(rank, world_size):
    with pytest.raises(ValueError, match="must be divisible by the size of expert_parallel_group"):
        torch_moe.MoE(D_MODEL, D_FF, 2 * world_size + 1, expert_parallel_group=dist.group.WORLD)
    lonely = dist.new_group([0])
    if rank != 0:
        with pytest.raises(ValueError, match="not a member"):
            torch_moe.MoE(D_MODEL, D_FF, NUM_EXPERTS, expert_parallel_group=lonely)
    # Ranks seeded alike get the same router and different expert shards.
    torch.manual_seed(0)
    ep = torch_moe.MoE(D_MODEL, D_FF, NUM_EXPERTS, expert_parallel_group=dist.group.WORLD)
    routers = [torch.empty_like(ep.router.weight) for _ in range(world_size)]
    shards = [torch.empty_like(ep.experts.w1) for _ in range(world_size)]
    dist.all_gather(routers, ep.router.weight.detach())
    dist.all_gather(shards, ep.experts.w1.detach())
    assert all(torch.equal(r, routers[0]) for r in routers)
    assert all(not torch.equal(shards[i], shards[j]) for i in range(world_size) for j in range(i))
    after = torch.rand(3)
    others = [torch.empty_like(after) for _ in range(world_size)]
    dist.all_gather(others, after)
    assert all(torch.equal(o, after) for o in others), "the global RNG must stay in step across ranks"
    assert "expert_parallel=rank" in repr(ep)


def case_mismatched_configuration_fails_fast(rank, world_size):
    x = torch.randn(6, D_MODEL, dtype=torch.float64)
    group = dist.group.WORLD

    def forward_with(**overrides):
        layer = torch_moe.MoE(**make_config(**overrides), expert_parallel_group=group, dtype=torch.float64)
        return lambda: layer(x)

    message = raises_fast(forward_with(num_experts=NUM_EXPERTS * (2 if rank == 0 else 1)), RuntimeError,
                          "num_experts", f"rank 0: {2 * NUM_EXPERTS}", f"rank 1: {NUM_EXPERTS}")
    assert "disagree" in message
    raises_fast(forward_with(capacity_factor=None if rank == world_size - 1 else 1.25), RuntimeError,
                "capacity_factor", "None (dropless)")
    raises_fast(forward_with(top_k=1 + (rank == 0)), RuntimeError, "top_k")
    raises_fast(forward_with(expert="mlp" if rank == 1 else "swiglu"), RuntimeError, "expert", "'mlp'")
    # GPT-OSS's options (from_hf_moe): the clamp of swiglu_oss and the router's bias.
    raises_fast(forward_with(expert="swiglu_oss", swiglu_limit=7.0 if rank == 0 else 5.0), RuntimeError,
                "swiglu_limit", "7.0", "5.0")
    raises_fast(forward_with(expert="swiglu_oss", swiglu_alpha=1.5 + rank), RuntimeError, "swiglu_alpha", "1.5")
    raises_fast(forward_with(router_bias=rank == 0), RuntimeError, "router_bias")

    layer = torch_moe.MoE(**make_config(), expert_parallel_group=group,
                          dtype=torch.float32 if rank == 0 else torch.float64)
    raises_fast(lambda: layer(x.to(layer.experts.w1.dtype)), RuntimeError, "dtype", "float32", "float64")

    layer = torch_moe.MoE(**make_config(), expert_parallel_group=group, dtype=torch.float64)

    def grad_mode_differs():
        with torch.set_grad_enabled(rank != 0):
            layer(x)

    raises_fast(grad_mode_differs, RuntimeError, "grad_mode", "disabled", "enabled")

    model = TwoLayerModel(group=group)
    raises_fast(lambda: parallel.full_state_dict(model) if rank == 0 else model.moe1(x), RuntimeError,
                "different collectives")

    # The public exchange checks its split sizes before moving anything.
    rows = torch.arange(4.0, dtype=torch.float64).unsqueeze(1).expand(4, 3).contiguous()
    splits_in = [4] + [0] * (world_size - 1)
    splits_out = [1] * world_size if rank != 1 else [2] + [1] * (world_size - 1)
    raises_fast(lambda: parallel.all_to_all(rows, group, splits_out, splits_in), RuntimeError,
                "split sizes disagree")

    # Bad arguments on one rank only: that rank says what is wrong, the others that it is wrong; none waits.
    sizes_in = [4] + [0] * (world_size - 1) if rank != 0 else [3] + [0] * (world_size - 1)
    sizes_out = [4 if rank == 0 else 0] * world_size
    if rank == 0:
        raises_fast(lambda: parallel.all_to_all(rows, group, sizes_out, sizes_in), ValueError,
                    "input_split_sizes sum to 3, x has 4 rows")
    else:
        raises_fast(lambda: parallel.all_to_all(rows, group, sizes_out, sizes_in), RuntimeError,
                    "arguments of rank(s) [0] are invalid")

    # After every refusal the group is still in step: a consistent forward and backward works.
    layer = torch_moe.MoE(**make_config(), expert_parallel_group=group, dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.experts.w1.grad is not None


def case_all_to_all(rank, world_size):
    # Equal splits, then variable ones (with empty pieces); the backward is the reverse exchange.
    group = dist.group.WORLD
    x = (torch.arange(2 * world_size, dtype=torch.float64) + 100 * rank).unsqueeze(1).repeat(1, 3).requires_grad_()
    y = parallel.all_to_all(x, group)
    want = torch.cat([torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float64) + 100 * src
                      for src in range(world_size)]).unsqueeze(1).repeat(1, 3)
    assert torch.equal(y, want)
    weight = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    (y * weight).sum().backward()
    # d(sum_ranks y·w)/dx: x's chunk for rank d went to rank d's rows of this source.
    weights = [torch.empty_like(weight) for _ in range(world_size)]
    dist.all_gather(weights, weight)
    expected = torch.cat([weights[d][2 * rank:2 * rank + 2] for d in range(world_size)])
    assert torch.equal(x.grad, expected)

    # rank r sends r+1 rows to each rank s, except none to itself.
    sends = [0 if s == rank else rank + 1 for s in range(world_size)]
    receives = [0 if s == rank else s + 1 for s in range(world_size)]
    x = torch.full((sum(sends), 2), float(rank), dtype=torch.float64, requires_grad=True)
    y = parallel.all_to_all(x, group, receives, sends)
    assert torch.equal(y[:, 0], torch.tensor([float(s) for s in range(world_size) for _ in range(receives[s])],
                                             dtype=torch.float64))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="divisible"):
        parallel.all_to_all(torch.zeros(world_size + 1, 2), group)


CASES = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_") and callable(fn)
}


# --------------------------------------------------------------------------------------------------
# the job runner


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    try:
        for name, case in CASES.items():
            start = time.monotonic()
            try:
                case(rank, world_size)
                results[name] = {"ok": True, "seconds": time.monotonic() - start}
            except BaseException:  # noqa: BLE001  (the verdict is reported to the test, not raised here)
                results[name] = {"ok": False, "error": traceback.format_exc()}
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(world_size: int, worker=None) -> dict:
    """Spawn ``worker(rank, world_size, port, out_dir)`` (default: this file's) on world_size ranks; each writes its
    cases' verdicts to rank<r>.json. -> {"failure": why the job itself failed or None, "ranks": {rank: verdicts}}."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(worker or _worker, args=(world_size, _free_port(), out_dir), nprocs=world_size,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + JOB_DEADLINE_S
        finished, failure = False, None
        try:
            while time.monotonic() < deadline:
                if context.join(timeout=1):
                    finished = True
                    break
        except Exception as err:  # a worker died (not a case failure: those are caught inside)
            failure = f"a worker process failed: {err}"
        if not finished and failure is None:
            failure = f"the {world_size}-rank job did not finish within {JOB_DEADLINE_S} s (a hang)"
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        per_rank = {}
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.json")
            per_rank[rank] = json.load(open(path)) if os.path.exists(path) else {}
        return {"failure": failure, "ranks": per_rank}


_JOBS: dict[int, dict] = {}  # world size -> the job's verdicts, run once per pytest session


def _job(world_size: int) -> dict:
    if world_size not in _JOBS:
        _JOBS[world_size] = _run_job(world_size)
    return _JOBS[world_size]


def _case_problems(job: dict, case: str) -> list[str]:
    """What went wrong with ``case`` on any rank of a job from _run_job (empty when it passed everywhere)."""
    problems = []
    for rank, results in job["ranks"].items():
        verdict = results.get(case)
        if verdict is None:
            problems.append(f"rank {rank}: the case did not run ({job['failure'] or 'no result'})")
        elif not verdict["ok"]:
            problems.append(f"rank {rank}:\n{verdict['error']}")
    if job["failure"] and not problems:
        problems.append(job["failure"])
    return problems


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel(world_size, case):
    problems = _case_problems(_job(world_size), case)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# single-process checks (no process group needed)


def test_global_load_balancing_needs_a_group():
    with pytest.raises(ValueError, match="global_load_balancing=True needs an expert_parallel_group"):
        torch_moe.MoE(D_MODEL, D_FF, NUM_EXPERTS, global_load_balancing=True)


@pytest.mark.skipif(dist.is_initialized(), reason="needs an uninitialised torch.distributed")
def test_group_without_init_process_group():
    with pytest.raises(ValueError, match="not initialized"):
        torch_moe.MoE(D_MODEL, D_FF, NUM_EXPERTS, expert_parallel_group=object())


def test_split_and_merge_offline():
    full = TwoLayerModel().state_dict()
    for world_size in (1, 2, 4, 8):
        shards = [parallel.split_expert_state_dict(full, world_size, r) for r in range(world_size)]
        for r, shard in enumerate(shards):
            per_rank = NUM_EXPERTS // world_size
            assert torch.equal(shard["blocks.0.experts.b2"], full["blocks.0.experts.b2"][r * per_rank:(r + 1) * per_rank])
            assert shard["moe1.router.weight"] is full["moe1.router.weight"]
        merged = parallel.merge_expert_shards(shards)
        assert list(merged) == list(full) and all(torch.equal(merged[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="cannot be split over 5 ranks"):
        parallel.split_expert_state_dict(full, 5, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        parallel.split_expert_state_dict(full, 2, 2)
    bad = parallel.split_expert_state_dict(full, 2, 1)
    del bad["embed.bias"]
    with pytest.raises(ValueError, match="different keys"):
        parallel.merge_expert_shards([parallel.split_expert_state_dict(full, 2, 0), bad])
    # prefixes= names the layers exactly: a look-alike key elsewhere is left whole.
    lookalike = {"other.experts.w1": torch.zeros(8, 2), **full}
    shard = parallel.split_expert_state_dict(lookalike, 2, 0, prefixes=["moe1", "blocks.0"])
    assert shard["other.experts.w1"].shape == (8, 2) and shard["moe1.experts.w1"].shape[0] == 4
    assert parallel.expert_parameter_names(TwoLayerModel()) == []

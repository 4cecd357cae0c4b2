"""The CUDA test module's harness, run CPU against CPU: its agreement tests with "cuda" replaced by "cpu" must pass
on any machine, so the first GPU session spends its minutes on the kernels, not on the harness (issue 21).
test_grouped_mm_agrees_with_zero_token_experts is left out: it also asserts which CUDA GEMM path ran."""

from __future__ import annotations

import pytest
import torch

import test_cuda

CASES = [
    (test_cuda.test_router_topk_agrees, dict(dtype=torch.float32, score_func="softmax", T=33, E=8, k=2)),
    (test_cuda.test_router_topk_group_limited_agrees, None),
    (test_cuda.test_capacity_plan_agrees, dict(policy="probability", masked=True, T=77, E=5, k=5, C=3)),
    (test_cuda.test_dispatch_combine_agree, dict(dtype=torch.float32, d=13)),
    (test_cuda.test_permute_unpermute_agree, dict(dtype=torch.float32)),
    (test_cuda.test_fused_dropless_ops_agree, dict(dtype=torch.float32)),
    (test_cuda.test_gather_grouped_glu_agrees, dict(dtype=torch.float32, activation="silu")),
    (test_cuda.test_router_losses_agree, dict(dtype=torch.float32, E=8)),
    (test_cuda.test_expert_choice_agrees, dict(dtype=torch.float32, masked=True, T=37, E=4, C=50)),
    (test_cuda.test_noisy_topk_load_agrees, dict(dtype=torch.float32, masked=True, T=19, E=5, k=5)),
]


def _params(fn):
    """The first parameter set of a parametrised test function (its pytest marks), as keyword arguments."""
    values = {}
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames, argvalues = mark.args[0], mark.args[1]
        argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        first = argvalues[0]
        first = first.values if hasattr(first, "values") else first
        first = first if len(argnames) > 1 else (first,)
        values.update(zip(argnames, first))
    return values


@pytest.mark.parametrize("fn,kwargs", CASES, ids=[fn.__name__ for fn, _ in CASES])
def test_agreement_harness_runs_cpu_against_cpu(monkeypatch, fn, kwargs):
    monkeypatch.setattr(test_cuda, "CUDA", "cpu")
    fn(**(kwargs if kwargs is not None else _params(fn)))


def test_leaf_is_a_fresh_leaf_on_each_device():
    source = torch.randn(3)
    for device in ("cpu", "cpu"):
        leaf = test_cuda._leaf(source, device)
        assert leaf.is_leaf and leaf.requires_grad and leaf is not source and not source.requires_grad
        leaf.sum().backward()
        assert torch.equal(leaf.grad, torch.ones(3)) and source.grad is None
    # the pattern it replaces: the source itself becomes the leaf on the CPU pass
    shared = source.to("cpu").requires_grad_()
    assert shared is source

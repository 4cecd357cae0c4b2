"""The CUDA test module's harness, run CPU against CPU: its agreement tests with "cuda" replaced by "cpu" must pass
on any machine, so the first GPU session spends its minutes on the kernels, not on the harness (issue 21).
test_grouped_mm_agrees_with_zero_token_experts is left out: it also asserts which CUDA GEMM path ran."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref
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


# ------------------------------------------------------------------ the CUDA kernels' rounding, emulated on the CPU
# The CUDA grouped_mm family builds its backward from row gathers and grouped GEMMs (experts/grouped_mm_cuda.cu).
# Written here with plain PyTorch ops on the CPU, rounding exactly where the kernel rounds, it is compared with the
# CPU kernel in bf16/fp16: the low-precision agreement is checked without a GPU.


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_of_rows(row_index):
    """(rows [n] that hold an assignment, their token [n], their flat assignment [n])."""
    flat = row_index.reshape(-1)
    assignment = torch.arange(flat.numel())
    used = flat >= 0
    return flat[used], assignment[used] // row_index.shape[1], assignment[used]


def _segment_mm(a, b, offsets):
    """segment_mm on the per-expert loop: each segment of a times its b[e] in a's dtype; other rows zero."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype)
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        if bounds[e + 1] > bounds[e]:
            out[bounds[e]:bounds[e + 1]] = a[bounds[e]:bounds[e + 1]] @ b[e]
    return out


def _segment_weight_grad(a, g, offsets):
    grad = torch.zeros(offsets.numel() - 1, a.shape[1], g.shape[1], dtype=a.dtype)
    bounds = offsets.tolist()
    for e in range(grad.shape[0]):
        if bounds[e + 1] > bounds[e]:
            grad[e] = a[bounds[e]:bounds[e + 1]].t() @ g[bounds[e]:bounds[e + 1]]
    return grad


def _scatter_rows(src, row_index, num_rows, weights=None):
    """row_ops_cuda's scatter_rows: out[row_index[t, j]] = round(w[t, j] * src[t]) computed in opmath."""
    rows, token, assignment = _token_of_rows(row_index)
    out = torch.zeros(num_rows, src.shape[1], dtype=src.dtype)
    if weights is None:
        out[rows] = src[token]
    else:
        opmath = _opmath(src.dtype)
        out[rows] = (weights.reshape(-1)[assignment].to(opmath)[:, None] * src[token].to(opmath)).to(src.dtype)
    return out


def _gather_rows(src, row_index):
    """row_ops_cuda's gather_rows without weights: y[t] = sum over j (in order) of src[row_index[t, j]] in opmath,
    rounded once to src's dtype."""
    opmath = _opmath(src.dtype)
    out = torch.zeros(row_index.shape[0], src.shape[1], dtype=opmath)
    for j in range(row_index.shape[1]):
        rows = row_index[:, j]
        used = rows >= 0
        out[used] += src[rows[used]].to(opmath)
    return out.to(src.dtype)


def _cuda_unpermute_backward(grad_y, h, b, offsets, weights, row_index, weights_in_activation_dtype=False):
    """_grouped_mm_unpermute_backward as grouped_mm_cuda.cu computes it (or, with weights_in_activation_dtype, as it
    did before issue 21: the weights rounded to h's dtype first)."""
    N, dtype = h.shape[0], h.dtype
    grad_y = grad_y.to(dtype)
    if weights_in_activation_dtype:
        w_row = _scatter_rows(weights.reshape(-1, 1).to(dtype), row_index.reshape(-1, 1), N)
        grad_b = _segment_weight_grad(h, _scatter_rows(grad_y, row_index, N) * w_row, offsets)
    else:
        w_row = _scatter_rows(weights.reshape(-1, 1).to(_opmath(dtype)), row_index.reshape(-1, 1), N)
        grad_b = _segment_weight_grad(h, _scatter_rows(grad_y, row_index, N, weights), offsets)
    P = _segment_mm(_scatter_rows(grad_y, row_index, N), b.transpose(1, 2), offsets)
    per_row_dot = (P.to(_opmath(dtype)) * h.to(_opmath(dtype))).sum(1, keepdim=True)
    grad_weights = _gather_rows(per_row_dot, row_index.reshape(-1, 1)).reshape(weights.shape).to(weights.dtype)
    grad_h = P.mul_(w_row)  # the kernel's in-place product: in opmath when w_row is, rounded once
    return grad_h, grad_b, grad_weights


def _fused_case(dtype, seed=21, T=64, E=6, k=2, K=32, M=24):
    g = torch.Generator().manual_seed(seed)
    _, _, row_index, offsets = ref.random_row_plan(T, E, k, True, g)
    x = torch.randn(T, K, generator=g, dtype=torch.float64).to(dtype)
    w1 = (torch.randn(E, K, M, generator=g, dtype=torch.float64) / K**0.5).to(dtype)
    w2 = (torch.randn(E, K, M, generator=g, dtype=torch.float64) / K**0.5).to(dtype)
    weights = torch.rand(T, k, generator=g)  # float32, as the router gives them
    return g, x, w1, w2, weights, row_index, offsets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_unpermute_backward_rounding_matches_the_cpu_kernel(dtype):
    g, _, _, b, weights, row_index, offsets = _fused_case(dtype)
    T, N, K = row_index.shape[0], row_index.numel(), b.shape[1]
    h = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(T, b.shape[2], generator=g, dtype=torch.float64).to(dtype)
    cpu = torch.ops.torch_moe._grouped_mm_unpermute_backward(grad_y, h, b, offsets, weights, row_index)
    new = _cuda_unpermute_backward(grad_y, h, b, offsets, weights, row_index)
    old = _cuda_unpermute_backward(grad_y, h, b, offsets, weights, row_index, weights_in_activation_dtype=True)
    # grad_h and grad_b: the same GEMMs and one rounding of each weighted row, as the CPU: the same bits.
    assert torch.equal(new[0], cpu[0])
    assert torch.equal(new[1], cpu[1])
    torch.testing.assert_close(new[2], cpu[2], rtol=1e-5, atol=1e-5)  # float32 dots, another summation order
    # The rounding before issue 21 (weights cast to the activation dtype) does not give the CPU's bits.
    assert not (torch.equal(old[0], cpu[0]) and torch.equal(old[1], cpu[1]))


def _glu_grads(grad_act, gate, up):
    """(grad_gate, grad_up) of silu(gate) * up, as glu_backward_out computes them in the activation dtype."""
    grad_gate = torch.ops.aten.silu_backward(grad_act * up, gate)
    return grad_gate, F.silu(gate) * grad_act


def _cuda_glu_backward_grad_x(grad_act, x, w_gate, w_up, offsets, row_index, round_per_projection=False):
    """grad_x of _gather_grouped_glu_backward as grouped_mm_cuda.cu computes it: both projections' row gradients
    added in opmath, a token's rows summed in opmath, one rounding; or, with round_per_projection, as before issue
    21: each projection's token gradient rounded, then the two added and rounded again."""
    N = row_index.numel()
    rows = _scatter_rows(x, row_index, N)
    gate, up = _segment_mm(rows, w_gate, offsets), _segment_mm(rows, w_up, offsets)
    grad_gate, grad_up = _glu_grads(grad_act, gate, up)
    p_gate = _segment_mm(grad_gate, w_gate.transpose(1, 2), offsets)
    p_up = _segment_mm(grad_up, w_up.transpose(1, 2), offsets)
    if round_per_projection:
        return _gather_rows(p_gate, row_index) + _gather_rows(p_up, row_index)
    summed = p_gate.to(_opmath(x.dtype)) + p_up
    return _gather_rows(summed, row_index).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_glu_backward_rounding_matches_the_cpu_kernel(dtype):
    g, x, w_gate, w_up, _, row_index, offsets = _fused_case(dtype)
    grad_act = torch.randn(row_index.numel(), w_gate.shape[2], generator=g, dtype=torch.float64).to(dtype)
    _, gate, up = torch.ops.torch_moe.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, "silu")
    cpu = torch.ops.torch_moe._gather_grouped_glu_backward(grad_act, x, w_gate, w_up, gate, up, offsets, row_index,
                                                           "silu")[0]
    new = _cuda_glu_backward_grad_x(grad_act, x, w_gate, w_up, offsets, row_index)
    old = _cuda_glu_backward_grad_x(grad_act, x, w_gate, w_up, offsets, row_index, round_per_projection=True)
    # The CPU rounds once more (its per-row sum of the two projections is stored in the activation dtype): within
    # that dtype's rounding of each other, relative to the largest value (a sum of rounded terms errs with the size
    # of its terms).
    rtol = ref.tolerance(dtype)["rtol"]
    torch.testing.assert_close(new, cpu, rtol=rtol, atol=rtol * float(cpu.abs().max()))
    # Against the same algorithm in float64 on the same inputs, one rounding is closer on average than three.
    exact = _cuda_glu_backward_grad_x(grad_act.double(), x.double(), w_gate.double(), w_up.double(), offsets,
                                      row_index)
    new_error = (new.double() - exact).abs().mean()
    old_error = (old.double() - exact).abs().mean()
    assert new_error < old_error, (new_error, old_error)

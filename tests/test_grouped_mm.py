"""Tests of torch_moe.ops.grouped_mm (dropless expert GEMMs): reference, opcheck, gradcheck, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reference as ref
from torch_moe import ops

GROUPED_MM = torch.ops.torch_moe.grouped_mm.default

# (segment sizes per expert, trailing padding rows, K, M): empty experts, one expert, padding rows, N = 0,
# and segments large enough to take the one-GEMM-at-a-time path.
CASES = [
    ([3, 0, 5, 1], 0, 6, 4),
    ([0, 0, 0], 0, 5, 3),
    ([4], 2, 3, 7),
    ([2, 3, 0, 1, 4, 2], 3, 8, 5),
    ([300, 260], 0, 16, 8),
]


def _inputs(sizes, padding, K, M, dtype, device, gen, requires_grad=False):
    E = len(sizes)
    N = sum(sizes) + padding
    offsets = torch.tensor([0] + sizes).cumsum(0)
    a = torch.randn(N, K, generator=gen, dtype=torch.float64).to(dtype).to(device)
    b = (torch.randn(E, K, M, generator=gen, dtype=torch.float64) / K**0.5).to(dtype).to(device)
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad), offsets.to(device)


@pytest.mark.parametrize("sizes,padding,K,M", CASES)
def test_matches_reference(device, dtype, gen, sizes, padding, K, M):
    a, b, offsets = _inputs(sizes, padding, K, M, dtype, device, gen)
    out = ops.grouped_mm(a, b, offsets)
    assert out.shape == (a.shape[0], M) and out.dtype == dtype and out.device == a.device
    tol = ref.tolerance(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        tol = dict(rtol=2e-2, atol=2e-2)  # the GEMM itself accumulates in the low dtype's kernels
    torch.testing.assert_close(out.cpu().double(), ref.grouped_mm(a, b, offsets.cpu()), **tol)
    if padding:
        assert torch.equal(out[sum(sizes):].cpu(), torch.zeros(padding, M, dtype=dtype))


@pytest.mark.parametrize("sizes,padding,K,M", CASES)
def test_gradients_match_per_expert_matmuls(device, gen, sizes, padding, K, M):
    a, b, offsets = _inputs(sizes, padding, K, M, torch.float64, device, gen, requires_grad=True)
    grad = torch.randn(a.shape[0], M, generator=gen, dtype=torch.float64).to(device)
    grad_a, grad_b = torch.autograd.grad(ops.grouped_mm(a, b, offsets), (a, b), grad)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    bounds = offsets.tolist()
    pieces = [a2[bounds[e]:bounds[e + 1]] @ b2[e] for e in range(len(sizes))]
    pieces.append(a2[bounds[-1]:] @ torch.zeros(K, M, dtype=torch.float64, device=device))
    ref_a, ref_b = torch.autograd.grad(torch.cat(pieces), (a2, b2), grad)
    torch.testing.assert_close(grad_a, ref_a)
    torch.testing.assert_close(grad_b, ref_b)
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(grad_b[e], torch.zeros_like(grad_b[e]))


@pytest.mark.parametrize("sizes,padding,K,M", CASES[:4])
def test_opcheck(device, gen, sizes, padding, K, M):
    a, b, offsets = _inputs(sizes, padding, K, M, torch.float32, device, gen, requires_grad=True)
    torch.library.opcheck(GROUPED_MM, (a, b, offsets))


@pytest.mark.parametrize("sizes,padding,K,M", CASES[:4])
def test_gradcheck(device, gen, sizes, padding, K, M):
    a, b, offsets = _inputs(sizes, padding, K, M, torch.float64, device, gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, offsets), (a, b))


def test_double_backward_is_refused(gen):
    a, b, offsets = _inputs([2, 3], 0, 4, 3, torch.float64, "cpu", gen, requires_grad=True)
    (grad_a,) = torch.autograd.grad(ops.grouped_mm(a, b, offsets).sum(), (a,), create_graph=True)
    with pytest.raises(RuntimeError, match="_grouped_mm_backward"):
        grad_a.sum().backward()


def test_bad_input(gen):
    a, b, offsets = _inputs([2, 3], 1, 4, 3, torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match="'offsets' must be int64"):
        ops.grouped_mm(a, b, offsets.int())
    with pytest.raises(RuntimeError, match=r"'offsets' must have size 3"):
        ops.grouped_mm(a, b, offsets[:2])
    with pytest.raises(RuntimeError, match="'offsets' must be non-decreasing"):
        ops.grouped_mm(a, b, torch.tensor([0, 4, 3]))
    with pytest.raises(RuntimeError, match="'offsets' ends at 9 but 'a' has only 6 rows"):
        ops.grouped_mm(a, b, torch.tensor([0, 4, 9]))
    with pytest.raises(RuntimeError, match="'offsets' must start at 0"):
        ops.grouped_mm(a, b, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="'a' and 'b' must share a dtype"):
        ops.grouped_mm(a, b.double(), offsets)
    with pytest.raises(RuntimeError, match=r"'b' must have size 4 \(columns of a\)"):
        ops.grouped_mm(a, b[:, :3], offsets)
    with pytest.raises(RuntimeError, match="'a' must be a 2-D tensor"):
        ops.grouped_mm(a[0], b, offsets)


# ------------------------------------------------------------------ fused dropless ops (permute_plan, gather, unpermute)

GATHER_GROUPED_MM = torch.ops.torch_moe.gather_grouped_mm.default
GROUPED_MM_UNPERMUTE = torch.ops.torch_moe.grouped_mm_unpermute.default
PERMUTE_PLAN = torch.ops.torch_moe.permute_plan.default

# (T, E, k, K, M, masked): T = 0, k = E, E not a power of two, padding tokens, empty experts.
FUSED_CASES = [(9, 6, 2, 5, 3, False), (8, 4, 4, 3, 6, True), (0, 3, 2, 4, 2, False), (5, 8, 2, 4, 3, True)]


def _fused_inputs(T, E, k, K, M, masked, dtype, device, gen, requires_grad=False):
    ids, valid, row_index, offsets = ref.random_row_plan(T, E, k, masked, gen)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64).to(dtype)
    b = (torch.randn(E, K, M, generator=gen, dtype=torch.float64) / K**0.5).to(dtype)
    h = torch.randn(T * k, K, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype))
    tensors = [t.to(device).requires_grad_(requires_grad) for t in (x, b, h, weights)]
    return (*tensors, row_index.to(device), offsets.to(device), ids, valid)


@pytest.mark.parametrize("T,E,k,K,M,masked", FUSED_CASES)
def test_permute_plan_matches_permute(device, gen, T, E, k, K, M, masked):
    # The inputs' plan comes from the reference permute; permute_plan and permute must both give it.
    x, _, _, _, row_index, offsets, ids, valid = _fused_inputs(T, E, k, K, M, masked, torch.float64, device, gen)
    valid_d = None if valid is None else valid.to(device)
    plan_row_index, plan_offsets = ops.permute_plan(ids.to(device), E, valid_d)
    expected = ops.permute(x, ids.to(device), E, valid_d)
    assert torch.equal(plan_row_index, row_index) and torch.equal(plan_offsets, offsets)
    assert torch.equal(row_index, expected.row_index) and torch.equal(offsets, expected.offsets)


@pytest.mark.parametrize("T,E,k,K,M,masked", FUSED_CASES)
def test_fused_ops_match_reference(device, dtype, gen, T, E, k, K, M, masked):
    x, b, h, weights, row_index, offsets, ids, valid = _fused_inputs(T, E, k, K, M, masked, dtype, device, gen)
    tol = ref.tolerance(dtype) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    rows, _, _ = ref.permute(x.cpu(), ids, E, valid)
    expected = ref.grouped_mm(rows, b.cpu(), offsets.cpu())
    torch.testing.assert_close(ops.gather_grouped_mm(x, b, offsets, row_index).cpu().double(), expected, **tol)
    expected_y = ref.unpermute(ref.grouped_mm(h.cpu(), b.cpu(), offsets.cpu()), weights.cpu(), row_index.cpu())
    y = ops.grouped_mm_unpermute(h, b, offsets, weights, row_index)
    assert y.shape == (T, M) and y.dtype == dtype
    torch.testing.assert_close(y.cpu().double(), expected_y, **tol)


@pytest.mark.parametrize("T,E,k,K,M,masked", FUSED_CASES)
def test_fused_ops_opcheck(device, gen, T, E, k, K, M, masked):
    x, b, h, weights, row_index, offsets, ids, valid = _fused_inputs(
        T, E, k, K, M, masked, torch.float32, device, gen, requires_grad=True)
    torch.library.opcheck(GATHER_GROUPED_MM, (x, b, offsets, row_index))
    torch.library.opcheck(GROUPED_MM_UNPERMUTE, (h, b, offsets, weights, row_index))
    torch.library.opcheck(PERMUTE_PLAN, (ids.to(device), E, None if valid is None else valid.to(device)))


@pytest.mark.parametrize("T,E,k,K,M,masked", FUSED_CASES)
def test_fused_ops_gradcheck(device, gen, T, E, k, K, M, masked):
    x, b, h, weights, row_index, offsets, _, _ = _fused_inputs(
        T, E, k, K, M, masked, torch.float64, device, gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ops.gather_grouped_mm(x, b, offsets, row_index), (x, b))
    assert torch.autograd.gradcheck(
        lambda h, b, w: ops.grouped_mm_unpermute(h, b, offsets, w, row_index), (h, b, weights))


def test_fused_ops_bad_input(gen):
    x, b, h, weights, row_index, offsets, _, _ = _fused_inputs(6, 3, 2, 4, 2, False, torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match="'row_index' must have size 5 \\(tokens\\) in dim 0, got shape \\[6, 2\\]"):
        ops.gather_grouped_mm(x[:5], b, offsets, row_index)
    with pytest.raises(RuntimeError, match="'row_index' gives assignments"):
        ops.grouped_mm_unpermute(h, b, offsets, weights, torch.zeros_like(row_index))
    with pytest.raises(RuntimeError, match="'row_index' must hold values in \\[-1, 12\\)"):
        ops.grouped_mm_unpermute(h, b, offsets, weights, row_index + 12)
    with pytest.raises(RuntimeError, match="'weights' must have the shape of 'row_index'"):
        ops.grouped_mm_unpermute(h, b, offsets, weights[:, :1], row_index)
    with pytest.raises(RuntimeError, match="'expert_ids' must hold values in \\[0, 3\\)"):
        ops.permute_plan(torch.tensor([[0, 3]]), 3)
    # grad_y of the backward: the shared check the CUDA kernel runs too (a short grad_y once read past its end there).
    unpermute_backward = torch.ops.torch_moe._grouped_mm_unpermute_backward
    grad_y = torch.randn(6, b.shape[2])
    with pytest.raises(RuntimeError, match="_grouped_mm_unpermute_backward: argument 'grad_y' must have size 6 \\(tokens\\) "
                                           "in dim 0, got shape \\[5, 2\\]"):
        unpermute_backward(grad_y[:5], h, b, offsets, weights, row_index)
    with pytest.raises(RuntimeError, match="argument 'grad_y' must have size 2 \\(columns of b\\) in dim 1"):
        unpermute_backward(grad_y[:, :1], h, b, offsets, weights, row_index)
    with pytest.raises(RuntimeError, match="argument 'grad_y' must be a 2-D tensor \\[T, M\\]"):
        unpermute_backward(grad_y.reshape(-1), h, b, offsets, weights, row_index)


# ------------------------------------------------------------------ CPU schedules of the fused ops and unusual plans

def _fused_reference(x, b, h, weights, row_index, offsets):
    """float64 (gather_grouped_mm, grouped_mm_unpermute) of any row plan, from the ops' definitions."""
    N = row_index.numel()
    rows = torch.zeros(N, x.shape[1], dtype=torch.float64)
    for t in range(row_index.shape[0]):
        for j in range(row_index.shape[1]):
            if row_index[t, j] >= 0:
                rows[row_index[t, j]] = x[t].double()
    gathered = ref.grouped_mm(rows, b, offsets)
    return gathered, ref.unpermute(ref.grouped_mm(h, b, offsets), weights, row_index)


# Many small experts run side by side (one range of experts per thread); a few large ones one after the other.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,E,k,K,M", [(40, 16, 3, 8, 6), (300, 3, 2, 96, 80)])
def test_fused_ops_every_schedule_matches_reference(gen, threads, T, E, k, K, M):
    x, b, h, weights, row_index, offsets, _, _ = _fused_inputs(T, E, k, K, M, True, torch.float64, "cpu", gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gathered = ops.gather_grouped_mm(x, b, offsets, row_index)
        y = ops.grouped_mm_unpermute(h, b, offsets, weights, row_index)
        xg, bg, hg, wg = (t.clone().requires_grad_() for t in (x, b, h, weights))
        grads = torch.autograd.grad(
            (ops.gather_grouped_mm(xg, bg, offsets, row_index) ** 2).sum()
            + (ops.grouped_mm_unpermute(hg, bg, offsets, wg, row_index) ** 2).sum(), (xg, bg, hg, wg))
    finally:
        torch.set_num_threads(previous)
    expected_gathered, expected_y = _fused_reference(x, b, h, weights, row_index, offsets)
    torch.testing.assert_close(gathered, expected_gathered, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, expected_y, rtol=1e-10, atol=1e-12)
    xr, br, hr, wr = (t.clone().requires_grad_() for t in (x, b, h, weights))
    rows = torch.zeros(T * k, K, dtype=torch.float64).index_copy(
        0, row_index[row_index >= 0], xr[(row_index >= 0).nonzero()[:, 0]])
    expected_grads = torch.autograd.grad(
        (_grouped_mm_autograd(rows, br, offsets) ** 2).sum()
        + (_unpermute_autograd(_grouped_mm_autograd(hr, br, offsets), wr, row_index) ** 2).sum(), (xr, br, hr, wr))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _grouped_mm_autograd(a, b, offsets):
    """Differentiable float64 grouped GEMM built from torch ops: the reference for gradients."""
    bounds = offsets.tolist()
    pieces = [a[bounds[e]:bounds[e + 1]] @ b[e] for e in range(b.shape[0])]
    pieces.append(a.new_zeros(a.shape[0] - bounds[-1], b.shape[2]))
    return torch.cat(pieces)


def _unpermute_autograd(rows, weights, row_index):
    used = row_index >= 0
    picked = rows[row_index.clamp(min=0)] * (weights * used).unsqueeze(-1)
    return picked.sum(1)


def test_fused_ops_plan_with_a_token_twice_in_one_segment(gen):
    # Not what permute_plan makes (a token's experts are distinct), but a valid plan: both of token 0's rows sit
    # in expert 0's segment, row 3 is in a segment but unassigned, and row 5 lies past offsets[E].
    row_index = torch.tensor([[0, 1], [2, -1], [4, -1]])
    offsets = torch.tensor([0, 3, 5])
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    expected_gathered, expected_y = _fused_reference(x, b, h, weights, row_index, offsets)
    gathered = ops.gather_grouped_mm(x, b, offsets, row_index)
    torch.testing.assert_close(gathered, expected_gathered)
    assert torch.equal(gathered[3], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(ops.grouped_mm_unpermute(h, b, offsets, weights, row_index), expected_y)
    assert torch.autograd.gradcheck(lambda x, b: ops.gather_grouped_mm(x, b, offsets, row_index), (x, b))
    assert torch.autograd.gradcheck(
        lambda h, b, w: ops.grouped_mm_unpermute(h, b, offsets, w, row_index), (h, b, weights))


# ------------------------------------------------------------------ output masks of the backward ops

def _backward_cases(gen):
    """(backward op, its arguments without the mask, number of outputs) for every grouped_mm-family backward."""
    x, b, h, weights, row_index, offsets, _, _ = _fused_inputs(9, 6, 2, 5, 3, True, torch.float64, "cpu", gen)
    a = torch.randn(row_index.numel(), 5, generator=gen, dtype=torch.float64)
    w_up = torch.randn_like(b)
    _, gate, up = torch.ops.torch_moe.gather_grouped_glu(x, b, w_up, offsets, row_index)
    grad_rows = torch.randn(row_index.numel(), 3, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    tm = torch.ops.torch_moe
    return [
        (tm._grouped_mm_backward.default, (grad_rows, a, b, offsets), 2),
        (tm._gather_grouped_mm_backward.default, (grad_rows, x, b, offsets, row_index), 2),
        (tm._gather_grouped_glu_backward.default, (grad_rows, x, b, w_up, gate, up, offsets, row_index, "silu"), 3),
        (tm._grouped_mm_unpermute_backward.default, (grad_y, h, b, offsets, weights, row_index), 3),
    ]


def test_backward_output_masks_compute_only_what_is_asked(device, gen):
    # Every mask against the full CPU call: the outputs asked for are the same, the others None.
    for op, args, n in _backward_cases(gen):
        full = op(*args)
        assert all(t is not None for t in full)
        on_device = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        for mask in itertools.product([True, False], repeat=n):
            got = op(*on_device, list(mask))
            for wanted, g, f in zip(mask, got, full):
                if wanted:
                    torch.testing.assert_close(g.cpu(), f, rtol=1e-12, atol=1e-14, msg=lambda m: f"{op} {mask}: {m}")
                else:
                    assert g is None, f"{op} {mask}: an output not asked for came back"
            torch.library.opcheck(op, (*on_device, list(mask)), test_utils=("test_schema", "test_faketensor"))


class _RecordOutputMasks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("torch_moe::_") and name.endswith("_backward"):
            self.masks[name.split("::")[1]] = list(args[-1])
        return func(*args, **(kwargs or {}))


def test_frozen_experts_skip_their_weight_gradients(gen):
    # With the expert weights frozen, autograd asks the backward ops for the token gradients only: the weight
    # gradients (E times the dense FFN's) are neither computed nor allocated.
    x, b, h, weights, row_index, offsets, _, _ = _fused_inputs(9, 6, 2, 5, 3, True, torch.float64, "cpu", gen)
    w_up = torch.randn_like(b)
    x.requires_grad_()
    b2 = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    with _RecordOutputMasks() as recorded:
        act = ops.gather_grouped_glu(x, b, w_up, offsets, row_index)
        y = ops.grouped_mm_unpermute(act + ops.gather_grouped_mm(x, b, offsets, row_index), b2, offsets, weights,
                                     row_index)
        (grad_x,) = torch.autograd.grad(y.sum(), (x,))
    assert recorded.masks == {
        "_grouped_mm_unpermute_backward": [True, False, False],
        "_gather_grouped_mm_backward": [True, False],
        "_gather_grouped_glu_backward": [True, False, False],
    }
    xr = x.detach().clone().requires_grad_()
    act_r = ops.gather_grouped_glu(xr, b.clone().requires_grad_(), w_up.clone().requires_grad_(), offsets, row_index)
    y_r = ops.grouped_mm_unpermute(act_r + ops.gather_grouped_mm(xr, b.clone().requires_grad_(), offsets, row_index),
                                   b2.clone().requires_grad_(), offsets, weights.clone().requires_grad_(), row_index)
    (grad_x_full,) = torch.autograd.grad(y_r.sum(), (xr,))
    torch.testing.assert_close(grad_x, grad_x_full, rtol=1e-12, atol=1e-14)

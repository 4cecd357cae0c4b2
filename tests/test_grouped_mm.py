"""Tests of torch_moe.ops.grouped_mm (dropless expert GEMMs): reference, opcheck, gradcheck, bad input."""

from __future__ import annotations

import pytest
import torch

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

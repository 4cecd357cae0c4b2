"""Tests of torch_moe.ops.glu (the gated activation f(gate) * up on whole tensors): reference, opcheck, gradcheck,
output masks, the CPU chunking across threads, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from torch_moe import ops

GLU = torch.ops.torch_moe.glu.default
GLU_BACKWARD = torch.ops.torch_moe._glu_backward.default
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}

# Shapes: empty, one row, [N, M] rows of experts' projections, a 3-D batch; the CPU kernel works in chunks of
# 65536 elements, so (700, 200) spans three chunks with a short last one.
SHAPES = [(0, 4), (1, 7), (37, 5), (3, 4, 6), (700, 200)]


def _inputs(shape, dtype, device, gen, requires_grad=False):
    gate = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    up = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).to(device).requires_grad_(requires_grad) for t in (gate, up))


def _reference(gate, up, activation):
    """f(gate) * up in float64, differentiable."""
    return ACTIVATIONS[activation](gate.double()) * up.double()


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, gen, activation, shape):
    gate, up = _inputs(shape, dtype, device, gen)
    act = ops.glu(gate, up, activation)
    assert act.shape == gate.shape and act.dtype == dtype and act.device == gate.device and act.is_contiguous()
    # float32: ATen's activation functions are accurate to a few ulp of their inputs (up to ~10 here), not of a
    # near-zero result.
    tol = {torch.float64: ref.tolerance(torch.float64), torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(
        dtype, dict(rtol=2e-2, atol=2e-2))
    torch.testing.assert_close(act.cpu().double(), _reference(gate.cpu(), up.cpu(), activation), **tol)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_same_numbers_as_the_unfused_aten_ops(gen, activation, shape):
    # The layer swapped f(gate) * up for this op, which runs the same ATen math in chunks: values and both gradients
    # agree with the ops it replaced to the last few bits (where an element falls in ATen's vector loop or its scalar
    # tail depends on how the tensor is split, and the two may round differently).
    gate, up = _inputs(shape, torch.float32, "cpu", gen, requires_grad=True)
    grad = torch.randn(shape, generator=gen)
    act = ops.glu(gate, up, activation)
    unfused = ACTIVATIONS[activation](gate) * up
    few_ulp = dict(rtol=5e-7, atol=1e-7)
    torch.testing.assert_close(act, unfused, **few_ulp)
    for got, want in zip(torch.autograd.grad(act, (gate, up), grad), torch.autograd.grad(unfused, (gate, up), grad)):
        torch.testing.assert_close(got, want, **few_ulp)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference(device, gen, activation, shape):
    gate, up = _inputs(shape, torch.float64, device, gen, requires_grad=True)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(ops.glu(gate, up, activation), (gate, up), grad.to(device))
    gr, ur = (t.detach().cpu().clone().requires_grad_() for t in (gate, up))
    want = torch.autograd.grad(_reference(gr, ur, activation), (gr, ur), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (False, False)])
def test_backward_output_mask(device, gen, output_mask):
    gate, up = _inputs((37, 5), torch.float64, device, gen)
    grad = torch.randn(37, 5, generator=gen, dtype=torch.float64).to(device)
    full = GLU_BACKWARD(grad, gate, up, "silu")
    masked = GLU_BACKWARD(grad, gate, up, "silu", list(output_mask))
    for wanted, got, want in zip(output_mask, masked, full):
        if wanted:
            assert torch.equal(got, want)
        else:
            assert got is None


def test_frozen_gate_asks_for_the_up_gradient_only(gen):
    gate, up = _inputs((37, 5), torch.float64, "cpu", gen)
    up.requires_grad_()
    (grad_up,) = torch.autograd.grad(ops.glu(gate, up).sum(), (up,))
    torch.testing.assert_close(grad_up, F.silu(gate), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_opcheck(device, gen, shape):
    gate, up = _inputs(shape, torch.float32, device, gen, requires_grad=True)
    torch.library.opcheck(GLU, (gate, up))
    torch.library.opcheck(GLU, (gate, up, "gelu_tanh"))
    grad = torch.randn(shape, generator=gen).to(device)
    torch.library.opcheck(GLU_BACKWARD, (grad, gate.detach(), up.detach(), "gelu"))
    torch.library.opcheck(GLU_BACKWARD, (grad, gate.detach(), up.detach(), "silu", [False, True]))


def test_opcheck_non_contiguous(gen):
    gate = torch.randn(6, 10, generator=gen).t()[:5].requires_grad_()  # [5, 6], column-major
    up = torch.randn(5, 12, generator=gen)[:, ::2].requires_grad_()  # [5, 6], every other column
    assert not gate.is_contiguous() and not up.is_contiguous()
    torch.library.opcheck(GLU, (gate, up))
    torch.testing.assert_close(ops.glu(gate, up).double(), _reference(gate, up, "silu"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_gradcheck(device, gen, activation):
    gate, up = _inputs((7, 5), torch.float64, device, gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: ops.glu(g, u, activation), (gate, up))


@pytest.mark.parametrize("threads", [1, 2])
def test_every_thread_count_matches_reference(gen, threads):
    gate, up = _inputs((1000, 300), torch.float64, "cpu", gen, requires_grad=True)
    grad = torch.randn(1000, 300, generator=gen, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        act = ops.glu(gate, up)
        grads = torch.autograd.grad(act, (gate, up), grad)
    finally:
        torch.set_num_threads(previous)
    gr, ur = (t.detach().clone().requires_grad_() for t in (gate, up))
    expected = _reference(gr, ur, "silu")
    torch.testing.assert_close(act, expected.detach(), rtol=1e-12, atol=1e-14)
    for got, want in zip(grads, torch.autograd.grad(expected, (gr, ur), grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_double_backward_is_refused(gen):
    gate, up = _inputs((7, 5), torch.float64, "cpu", gen, requires_grad=True)
    (grad_gate,) = torch.autograd.grad(ops.glu(gate, up).sum(), (gate,), create_graph=True)
    with pytest.raises(RuntimeError, match="_glu_backward"):
        grad_gate.sum().backward()


def test_bad_input(gen):
    gate, up = _inputs((6, 4), torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match="argument 'activation' must be \"silu\", \"gelu\" or \"gelu_tanh\", "
                                           "got \"relu\""):
        ops.glu(gate, up, "relu")
    with pytest.raises(RuntimeError, match="'up' must have the shape of 'gate'"):
        ops.glu(gate, up[:, :3])
    with pytest.raises(RuntimeError, match="arguments 'gate' and 'up' must share a dtype, got float32 and float64"):
        ops.glu(gate, up.double())
    with pytest.raises(RuntimeError, match="'gate' must be float32, float64, bfloat16 or float16, got int64"):
        ops.glu(gate.long(), up.long())
    with pytest.raises(RuntimeError, match="'grad_act' must have the shape of 'gate'"):
        GLU_BACKWARD(gate[:5], gate, up, "silu")
    with pytest.raises(RuntimeError, match="argument 'activation' must be"):
        GLU_BACKWARD(gate, gate, up, "tanh")


def test_every_op_has_a_cuda_kernel_exactly_when_cuda_is_built():
    # CUDA kernels are registered from CUDA-compiled sources only: a CPU-only build must refuse CUDA tensors (glu
    # once registered its CUDA kernel from a .cpp, so a CPU-only build ran it on whatever device came).
    import torch_moe

    with_cuda = torch_moe._C.with_cuda()
    names = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("torch_moe::")]
    assert "torch_moe::glu" in names and "torch_moe::_glu_backward" in names
    for name in names:
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        if has_cpu:  # a backend op (not a composite registered for every key)
            assert has_cuda == with_cuda, f"{name}: CUDA kernel {has_cuda}, CUDA build {with_cuda}"

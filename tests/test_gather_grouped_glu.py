"""Tests of torch_moe.ops.gather_grouped_glu (gated first half of a dropless SwiGLU/GeGLU expert): reference,
opcheck, gradcheck, every CPU schedule, unusual plans, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from torch_moe import ops

GATHER_GROUPED_GLU = torch.ops.torch_moe.gather_grouped_glu.default
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}

# (T, E, k, K, M, masked): T = 0, k = E, E not a power of two, padding tokens, empty experts.
CASES = [(9, 6, 2, 5, 3, False), (8, 4, 4, 3, 6, True), (0, 3, 2, 4, 2, False), (5, 8, 2, 4, 3, True)]


def _inputs(T, E, k, K, M, masked, dtype, device, gen, requires_grad=False):
    _, _, row_index, offsets = ref.random_row_plan(T, E, k, masked, gen)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64).to(dtype)
    w_gate = (torch.randn(E, K, M, generator=gen, dtype=torch.float64) / K**0.5).to(dtype)
    w_up = (torch.randn(E, K, M, generator=gen, dtype=torch.float64) / K**0.5).to(dtype)
    tensors = [t.to(device).requires_grad_(requires_grad) for t in (x, w_gate, w_up)]
    return (*tensors, row_index.to(device), offsets.to(device))


def _reference(x, w_gate, w_up, offsets, row_index, activation):
    """Differentiable float64 (act, gate, up) from the definition: rows[row_index[t, j]] = x[t] (zero rows where no
    assignment), each expert's segment times its matrices, act = f(gate) * up."""
    x, w_gate, w_up = (t.cpu() for t in (x, w_gate, w_up))
    offsets, row_index = offsets.cpu(), row_index.cpu()
    used = row_index >= 0
    rows = torch.zeros(row_index.numel(), x.shape[1], dtype=x.dtype).index_copy(
        0, row_index[used], x[used.nonzero()[:, 0]])
    bounds = offsets.tolist()

    def grouped(w):
        pieces = [rows[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])]
        pieces.append(rows.new_zeros(rows.shape[0] - bounds[-1], w.shape[2]))
        return torch.cat(pieces)

    gate, up = grouped(w_gate), grouped(w_up)
    return ACTIVATIONS[activation](gate) * up, gate, up


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("T,E,k,K,M,masked", CASES)
def test_matches_reference(device, dtype, gen, activation, T, E, k, K, M, masked):
    x, w_gate, w_up, row_index, offsets = _inputs(T, E, k, K, M, masked, dtype, device, gen)
    act, gate, up = torch.ops.torch_moe.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, activation)
    expected = _reference(x.double(), w_gate.double(), w_up.double(), offsets, row_index, activation)
    tol = ref.tolerance(dtype) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip((act, gate, up), expected):
        assert got.shape == (T * k, M) and got.dtype == dtype and got.device == x.device
        torch.testing.assert_close(got.cpu().double(), want, **tol)
    assert torch.equal(ops.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, activation), act)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("T,E,k,K,M,masked", CASES)
def test_gradients_match_reference(device, gen, activation, T, E, k, K, M, masked):
    x, w_gate, w_up, row_index, offsets = _inputs(T, E, k, K, M, masked, torch.float64, device, gen,
                                                  requires_grad=True)
    grad = torch.randn(T * k, M, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(ops.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, activation),
                              (x, w_gate, w_up), grad.to(device))
    xr, wgr, wur = (t.detach().cpu().clone().requires_grad_() for t in (x, w_gate, w_up))
    want = torch.autograd.grad(_reference(xr, wgr, wur, offsets, row_index, activation)[0], (xr, wgr, wur), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("T,E,k,K,M,masked", CASES)
def test_opcheck(device, gen, T, E, k, K, M, masked):
    x, w_gate, w_up, row_index, offsets = _inputs(T, E, k, K, M, masked, torch.float32, device, gen,
                                                  requires_grad=True)
    torch.library.opcheck(GATHER_GROUPED_GLU, (x, w_gate, w_up, offsets, row_index))
    torch.library.opcheck(GATHER_GROUPED_GLU, (x, w_gate, w_up, offsets, row_index, "gelu"))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("T,E,k,K,M,masked", CASES[:2])
def test_gradcheck(device, gen, activation, T, E, k, K, M, masked):
    x, w_gate, w_up, row_index, offsets = _inputs(T, E, k, K, M, masked, torch.float64, device, gen,
                                                  requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, wg, wu: ops.gather_grouped_glu(x, wg, wu, offsets, row_index, activation), (x, w_gate, w_up))


def test_gate_and_up_are_not_differentiable(gen):
    x, w_gate, w_up, row_index, offsets = _inputs(9, 6, 2, 5, 3, False, torch.float64, "cpu", gen,
                                                  requires_grad=True)
    act, gate, up = torch.ops.torch_moe.gather_grouped_glu(x, w_gate, w_up, offsets, row_index)
    assert act.requires_grad and not gate.requires_grad and not up.requires_grad


def test_double_backward_is_refused(gen):
    x, w_gate, w_up, row_index, offsets = _inputs(9, 6, 2, 5, 3, False, torch.float64, "cpu", gen,
                                                  requires_grad=True)
    (grad_x,) = torch.autograd.grad(ops.gather_grouped_glu(x, w_gate, w_up, offsets, row_index).sum(), (x,),
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="_gather_grouped_glu_backward"):
        grad_x.sum().backward()


# Many small experts run side by side (one range of experts per thread); a few large ones one after the other.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,E,k,K,M", [(40, 16, 3, 8, 6), (300, 3, 2, 96, 80)])
def test_every_schedule_matches_reference(gen, threads, T, E, k, K, M):
    x, w_gate, w_up, row_index, offsets = _inputs(T, E, k, K, M, True, torch.float64, "cpu", gen,
                                                  requires_grad=True)
    grad = torch.randn(T * k, M, generator=gen, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        act = ops.gather_grouped_glu(x, w_gate, w_up, offsets, row_index)
        grads = torch.autograd.grad(act, (x, w_gate, w_up), grad)
    finally:
        torch.set_num_threads(previous)
    xr, wgr, wur = (t.detach().clone().requires_grad_() for t in (x, w_gate, w_up))
    expected_act = _reference(xr, wgr, wur, offsets, row_index, "silu")[0]
    torch.testing.assert_close(act, expected_act.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected_act, (xr, wgr, wur), grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_plan_with_a_token_twice_in_one_segment(gen):
    # Not what permute_plan makes (a token's experts are distinct), but a valid plan: both of token 0's rows sit
    # in expert 0's segment, row 3 is in a segment but unassigned, and row 5 lies past offsets[E].
    row_index = torch.tensor([[0, 1], [2, -1], [4, -1]])
    offsets = torch.tensor([0, 3, 5])
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w_gate = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    act, gate, up = torch.ops.torch_moe.gather_grouped_glu(x, w_gate, w_up, offsets, row_index)
    for got, want in zip((act, gate, up), _reference(x, w_gate, w_up, offsets, row_index, "silu")):
        torch.testing.assert_close(got, want)
    for t in (act, gate, up):
        assert torch.equal(t[3], torch.zeros(3, dtype=torch.float64))
        assert torch.equal(t[5], torch.zeros(3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x, wg, wu: ops.gather_grouped_glu(x, wg, wu, offsets, row_index), (x, w_gate, w_up))


def test_matches_the_two_gathered_projections(gen):
    # The op is the fusion of gather_grouped_mm twice and the activation: same values, same gradients.
    x, w_gate, w_up, row_index, offsets = _inputs(40, 16, 3, 8, 6, True, torch.float64, "cpu", gen,
                                                  requires_grad=True)
    act = ops.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, "gelu")
    unfused = F.gelu(ops.gather_grouped_mm(x, w_gate, offsets, row_index)) * ops.gather_grouped_mm(
        x, w_up, offsets, row_index)
    torch.testing.assert_close(act, unfused, rtol=1e-12, atol=1e-14)
    grad = torch.randn_like(act)
    for got, want in zip(torch.autograd.grad(act, (x, w_gate, w_up), grad),
                         torch.autograd.grad(unfused, (x, w_gate, w_up), grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bad_input(gen):
    x, w_gate, w_up, row_index, offsets = _inputs(6, 3, 2, 4, 2, False, torch.float32, "cpu", gen)
    with pytest.raises(RuntimeError, match="argument 'activation' must be \"silu\", \"gelu\" or \"gelu_tanh\", "
                                           "got \"relu\""):
        ops.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, "relu")
    with pytest.raises(RuntimeError, match="'w_up' must have the shape of 'w_gate'"):
        ops.gather_grouped_glu(x, w_gate, w_up[:, :, :1], offsets, row_index)
    with pytest.raises(RuntimeError, match="arguments 'w_gate' and 'w_up' must share a dtype, got float32 and float64"):
        ops.gather_grouped_glu(x, w_gate, w_up.double(), offsets, row_index)
    with pytest.raises(RuntimeError, match="arguments 'x' and 'w_gate' must share a dtype, got float64 and float32"):
        ops.gather_grouped_glu(x.double(), w_gate, w_up, offsets, row_index)
    with pytest.raises(RuntimeError, match="'w_gate' must have size 3 \\(columns of x\\) in dim 1, got shape \\[3, 4, 2\\]"):
        ops.gather_grouped_glu(x[:, :3], w_gate, w_up, offsets, row_index)
    with pytest.raises(RuntimeError, match="'row_index' must have size 5 \\(tokens\\) in dim 0, got shape \\[6, 2\\]"):
        ops.gather_grouped_glu(x[:5], w_gate, w_up, offsets, row_index)
    with pytest.raises(RuntimeError, match="'offsets' must be non-decreasing, got offsets\\[1\\] = 5 > offsets\\[2\\] = 4"):
        ops.gather_grouped_glu(x, w_gate, w_up, torch.tensor([0, 5, 4, 12]), row_index)
    act, gate, up = torch.ops.torch_moe.gather_grouped_glu(x, w_gate, w_up, offsets, row_index)
    backward = torch.ops.torch_moe._gather_grouped_glu_backward
    with pytest.raises(RuntimeError, match="'gate' must have size 12 \\(rows of the plan\\) in dim 0"):
        backward(act, x, w_gate, w_up, gate[1:], up, offsets, row_index, "silu")
    with pytest.raises(RuntimeError, match="'grad_act' must have size 2 \\(columns of w_gate\\) in dim 1"):
        backward(act[:, :1], x, w_gate, w_up, gate, up, offsets, row_index, "silu")

"""Tests of torch_moe.ops.dispatch and combine (capacity mode): reference, opcheck, gradcheck, bad input, determinism."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from torch_moe import ops

DISPATCH = torch.ops.torch_moe.dispatch.default
COMBINE = torch.ops.torch_moe.combine.default

# (T, E, k, C, d): drops, no drops, k = E, T = 0, capacity 0, one expert.
SHAPES = [(32, 6, 2, 4, 8), (24, 4, 2, 12, 16), (12, 6, 6, 5, 4), (0, 6, 2, 3, 8), (10, 4, 2, 0, 4), (7, 1, 1, 3, 5)]


def _routing(T, E, k, C, gen, masked=False):
    """(expert_ids, slots) from the reference plan: distinct experts per token, position policy."""
    ids = ref.distinct_expert_ids(T, E, k, gen)
    valid = None
    if masked and T > 0:
        valid = torch.rand(T, generator=gen) < 0.7
        valid[0] = False
    slots, _, _ = ref.capacity_plan(ids, E, C, "position", None, valid)
    return ids, slots


def _randn(shape, gen, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,C,d", SHAPES)
def test_dispatch_matches_reference(device, dtype, gen, T, E, k, C, d, masked):
    ids, slots = _routing(T, E, k, C, gen, masked)
    x = _randn((T, d), gen, dtype, device)
    buffer = ops.dispatch(x, ids.to(device), slots.to(device), E, C)
    assert buffer.shape == (E, C, d) and buffer.dtype == dtype and buffer.device == x.device
    # A copy: exact in every dtype; empty slots are zero.
    assert torch.equal(buffer.cpu().to(torch.float64), ref.dispatch(x, ids, slots, E, C))


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k,C,d", SHAPES)
def test_combine_matches_reference(device, dtype, gen, T, E, k, C, d, masked):
    ids, slots = _routing(T, E, k, C, gen, masked)
    buffer = _randn((E, C, d), gen, dtype, device)  # non-zero in unused slots too: they must not leak in
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
    y = ops.combine(buffer, weights, ids.to(device), slots.to(device))
    assert y.shape == (T, d) and y.dtype == dtype and y.device == buffer.device
    torch.testing.assert_close(y.cpu().to(torch.float64), ref.combine(buffer, weights, ids, slots), **ref.tolerance(dtype))


def test_dispatch_then_combine_round_trip(device, dtype, gen):
    T, E, k, C, d = 40, 6, 2, 8, 16
    ids, slots = _routing(T, E, k, C, gen)
    x = _randn((T, d), gen, dtype, device)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
    y = ops.combine(ops.dispatch(x, ids.to(device), slots.to(device), E, C), weights, ids.to(device), slots.to(device))
    kept_weight = (weights.cpu().to(torch.float64) * (slots >= 0)).sum(dim=1, keepdim=True)
    assert bool((slots < 0).any()), "this case is meant to drop some assignments"
    torch.testing.assert_close(y.cpu().to(torch.float64), kept_weight * x.cpu().to(torch.float64), **ref.tolerance(dtype))


def test_noncontiguous_inputs(device, gen):
    T, E, k, C, d = 20, 6, 2, 5, 8
    ids, slots = _routing(T, E, k, C, gen)
    x = _randn((d, T), gen, torch.float32, device).t()
    buffer = _randn((d, C, E), gen, torch.float32, device).permute(2, 1, 0)
    weights = torch.rand(k, T, generator=gen).to(device).t()
    ids_nc, slots_nc = ids.t().contiguous().t().to(device), slots.t().contiguous().t().to(device)
    assert not (x.is_contiguous() or buffer.is_contiguous() or weights.is_contiguous() or ids_nc.is_contiguous())
    assert torch.equal(ops.dispatch(x, ids_nc, slots_nc, E, C).cpu().double(), ref.dispatch(x, ids, slots, E, C))
    torch.testing.assert_close(
        ops.combine(buffer, weights, ids_nc, slots_nc).cpu().double(),
        ref.combine(buffer, weights, ids, slots),
        **ref.tolerance(torch.float32),
    )


# ---------------------------------------------------------------------------------------------- semantics


def test_combine_is_deterministic(device, dtype, gen):
    T, E, k, C, d = 64, 6, 6, 64, 16
    ids, slots = _routing(T, E, k, C, gen)
    buffer = _randn((E, C, d), gen, dtype, device) * 100
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
    ids, slots = ids.to(device), slots.to(device)
    first = ops.combine(buffer, weights, ids, slots)
    for _ in range(3):
        assert torch.equal(ops.combine(buffer, weights, ids, slots), first)


def test_combine_accumulates_in_increasing_choice_order(device):
    # Float32 addition is not associative: (2^24 + 1) + 1 == 2^24 (each +1 rounds away, ties to even), but
    # (1 + 1) + 2^24 == 2^24 + 2. Token 0 sums its choices as big, 1, 1 and token 1 as 1, 1, big.
    big = float(2**24)
    buffer = torch.tensor([[[big], [big]], [[1.0], [1.0]], [[1.0], [1.0]]], dtype=torch.float32, device=device)
    weights = torch.ones(2, 3, dtype=torch.float32, device=device)
    ids = torch.tensor([[0, 1, 2], [1, 2, 0]], device=device)
    slots = torch.tensor([[0, 0, 0], [1, 1, 1]], device=device)
    y = ops.combine(buffer, weights, ids, slots)
    assert y.cpu().tolist() == [[big], [big + 2.0]]


def test_combine_of_fully_dropped_token_is_zero(device, dtype):
    buffer = torch.full((2, 1, 3), 7.0, dtype=dtype, device=device)
    weights = torch.ones(2, 2, dtype=ref.router_dtype(dtype), device=device)
    ids = torch.tensor([[0, 1], [1, 0]], device=device)
    slots = torch.tensor([[-1, -1], [0, -1]], device=device)
    y = ops.combine(buffer, weights, ids, slots)
    assert y.cpu().to(torch.float64).tolist() == [[0.0] * 3, [7.0] * 3]


def test_dispatch_fills_unused_slots_with_zero(device, dtype):
    x = torch.full((3, 2), 5.0, dtype=dtype, device=device)
    ids = torch.tensor([[1], [1], [0]], device=device)
    slots = torch.tensor([[2], [-1], [0]], device=device)
    buffer = ops.dispatch(x, ids, slots, 2, 3)
    expected = torch.zeros(2, 3, 2, dtype=torch.float64)
    expected[1, 2] = 5.0
    expected[0, 0] = 5.0
    assert torch.equal(buffer.cpu().to(torch.float64), expected)


# ---------------------------------------------------------------------------------------------- opcheck


def _cases(device, dtype, gen):
    """(x, buffer, weights, ids, slots, E, C) for several shapes: drops, T = 0, k = E, E = 6, padding."""
    out = []
    for T, E, k, C, d, masked in [
        (16, 6, 2, 3, 8, False),
        (0, 6, 2, 3, 8, False),
        (6, 6, 6, 4, 4, False),
        (10, 6, 2, 8, 4, True),
        (9, 5, 3, 0, 4, False),
    ]:
        ids, slots = _routing(T, E, k, C, gen, masked)
        x = _randn((T, d), gen, dtype, device).requires_grad_()
        buffer = _randn((E, C, d), gen, dtype, device).requires_grad_()
        weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(ref.router_dtype(dtype)).to(device)
        out.append((x, buffer, weights.requires_grad_(), ids.to(device), slots.to(device), E, C))
    return out


def test_opcheck_dispatch(device, dtype, gen):
    for x, _, _, ids, slots, E, C in _cases(device, dtype, gen):
        torch.library.opcheck(DISPATCH, (x, ids, slots, E, C))


def test_opcheck_combine(device, dtype, gen):
    for _, buffer, weights, ids, slots, _, _ in _cases(device, dtype, gen):
        torch.library.opcheck(COMBINE, (buffer, weights, ids, slots))


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("T,E,k,C,d", [(12, 4, 2, 3, 3), (6, 6, 6, 6, 2), (5, 3, 1, 1, 4)])
def test_gradcheck_dispatch(device, gen, T, E, k, C, d):
    ids, slots = _routing(T, E, k, C, gen)
    x = _randn((T, d), gen, torch.float64, device).requires_grad_()
    ids, slots = ids.to(device), slots.to(device)
    assert torch.autograd.gradcheck(lambda x: ops.dispatch(x, ids, slots, E, C), (x,))


@pytest.mark.parametrize("T,E,k,C,d", [(12, 4, 2, 3, 3), (6, 6, 6, 6, 2), (5, 3, 1, 1, 4)])
def test_gradcheck_combine(device, gen, T, E, k, C, d):
    ids, slots = _routing(T, E, k, C, gen)
    buffer = _randn((E, C, d), gen, torch.float64, device).requires_grad_()
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    ids, slots = ids.to(device), slots.to(device)
    assert torch.autograd.gradcheck(lambda b, w: ops.combine(b, w, ids, slots), (buffer, weights))


def test_combine_gradients_match_reference(device, gen):
    T, E, k, C, d = 20, 6, 2, 4, 5
    ids, slots = _routing(T, E, k, C, gen)
    buffer = _randn((E, C, d), gen, torch.float32, device).requires_grad_()
    weights = torch.rand(T, k, generator=gen).to(device).requires_grad_()
    grad_y = torch.randn(T, d, generator=gen).to(device)
    ops.combine(buffer, weights, ids.to(device), slots.to(device)).backward(grad_y)
    b64 = buffer.detach().cpu().double()
    w64 = weights.detach().cpu().double()
    expected_grad_buffer = torch.zeros_like(b64)
    expected_grad_weights = torch.zeros_like(w64)
    for t in range(T):
        for j in range(k):
            if slots[t, j] >= 0:
                e, s = int(ids[t, j]), int(slots[t, j])
                expected_grad_buffer[e, s] += w64[t, j] * grad_y[t].cpu().double()
                expected_grad_weights[t, j] = (grad_y[t].cpu().double() * b64[e, s]).sum()
    tol = ref.tolerance(torch.float32)
    torch.testing.assert_close(buffer.grad.cpu().double(), expected_grad_buffer, **tol)
    torch.testing.assert_close(weights.grad.cpu().double(), expected_grad_weights, **tol)
    assert buffer.grad.dtype == buffer.dtype and weights.grad.dtype == weights.dtype


# ---------------------------------------------------------------------------------------------- bad input


def _good(device):
    """A valid (x, buffer, weights, ids, slots, E, C) to break one argument at a time."""
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], device=device)
    slots = torch.tensor([[0, 0], [1, 0], [1, 1], [2, -1]], device=device)
    x = torch.randn(4, 3, device=device)
    buffer = torch.randn(3, 3, 3, device=device)
    weights = torch.rand(4, 2, device=device)
    return x, buffer, weights, ids, slots, 3, 3


def test_dispatch_good_input_is_accepted(device):
    x, _, _, ids, slots, E, C = _good(device)
    ops.dispatch(x, ids, slots, E, C)  # the base of every bad-input case below must itself be fine


def test_dispatch_bad_x(device):
    x, _, _, ids, slots, E, C = _good(device)
    with pytest.raises(RuntimeError, match="'x'"):
        ops.dispatch(x.to(torch.int64), ids, slots, E, C)
    with pytest.raises(RuntimeError, match="'x'"):
        ops.dispatch(x.reshape(-1), ids, slots, E, C)
    with pytest.raises(RuntimeError, match="'x'|expert_ids"):
        ops.dispatch(x[:3], ids, slots, E, C)


def test_dispatch_bad_expert_ids(device):
    x, _, _, ids, slots, E, C = _good(device)
    with pytest.raises(RuntimeError, match=r"expert_ids.*int64|int64.*expert_ids"):
        ops.dispatch(x, ids.to(torch.int32), slots, E, C)
    for bad in (3, -1, 99):
        bad_ids = ids.clone()
        bad_ids[1, 0] = bad  # a kept assignment
        with pytest.raises(RuntimeError, match=r"expert_ids.*\[0, "):
            ops.dispatch(x, bad_ids, slots, E, C)


def test_dispatch_bad_slots(device):
    x, _, _, ids, slots, E, C = _good(device)
    with pytest.raises(RuntimeError, match="'slots'"):
        ops.dispatch(x, ids, slots[:, :1], E, C)
    with pytest.raises(RuntimeError, match="'slots'"):
        ops.dispatch(x, ids, slots.to(torch.int32), E, C)
    for bad in (3, -2):
        bad_slots = slots.clone()
        bad_slots[2, 1] = bad
        with pytest.raises(RuntimeError, match="'slots'"):
            ops.dispatch(x, ids, bad_slots, E, C)


def test_dispatch_duplicate_slots(device):
    x, _, _, ids, slots, E, C = _good(device)
    dup = slots.clone()
    dup[3, 0] = 0  # token 3 choice 0 is expert 0, whose slot 0 token 0 already holds
    with pytest.raises(RuntimeError, match="'slots'"):
        ops.dispatch(x, ids, dup, E, C)


def test_dispatch_bad_sizes(device):
    x, _, _, ids, slots, E, C = _good(device)
    with pytest.raises(RuntimeError, match="capacity"):
        ops.dispatch(x, ids, slots, E, -1)
    with pytest.raises(RuntimeError, match=r"expert_ids|num_experts"):
        ops.dispatch(x, ids, slots, 2, C)  # expert 2 is out of range for two experts


def test_combine_good_input_is_accepted(device):
    _, buffer, weights, ids, slots, _, _ = _good(device)
    ops.combine(buffer, weights, ids, slots)


def test_combine_bad_buffer(device):
    _, buffer, weights, ids, slots, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'buffer'"):
        ops.combine(buffer.to(torch.int64), weights, ids, slots)
    with pytest.raises(RuntimeError, match="'buffer'"):
        ops.combine(buffer[0], weights, ids, slots)


def test_combine_bad_weights(device):
    _, buffer, weights, ids, slots, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'weights'"):
        ops.combine(buffer, weights[:, :1], ids, slots)
    with pytest.raises(RuntimeError, match="'weights'"):
        ops.combine(buffer, weights.to(torch.int64), ids, slots)


def test_combine_bad_expert_ids_and_slots(device):
    _, buffer, weights, ids, slots, _, _ = _good(device)
    with pytest.raises(RuntimeError, match=r"expert_ids.*int64|int64.*expert_ids"):
        ops.combine(buffer, weights, ids.to(torch.int32), slots)
    bad_ids = ids.clone()
    bad_ids[0, 1] = 3  # buffer holds experts [0, 3)
    with pytest.raises(RuntimeError, match=r"expert_ids.*\[0, "):
        ops.combine(buffer, weights, bad_ids, slots)
    with pytest.raises(RuntimeError, match="'slots'"):
        ops.combine(buffer, weights, ids, slots[:3])
    bad_slots = slots.clone()
    bad_slots[0, 0] = 3  # buffer holds slots [0, 3)
    with pytest.raises(RuntimeError, match="'slots'"):
        ops.combine(buffer, weights, ids, bad_slots)


def test_mixed_devices(cuda_device):
    x, buffer, weights, ids, slots, E, C = _good(cuda_device)
    with pytest.raises(RuntimeError, match="device"):
        ops.dispatch(x, ids.cpu(), slots, E, C)
    with pytest.raises(RuntimeError, match="device"):
        ops.combine(buffer, weights.cpu(), ids, slots)

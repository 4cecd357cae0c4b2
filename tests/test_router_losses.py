"""Tests of torch_moe.ops.router_losses: reference values and gradients, opcheck, gradcheck, bad input, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from torch_moe import ops

OP = torch.ops.torch_moe.router_losses.default

# (T, E, k): E not a power of two, k = E, one token, one expert.
SHAPES = [(32, 6, 2), (64, 8, 1), (12, 6, 6), (1, 5, 3), (7, 1, 1)]


def _valid_mask(T, gen, masked):
    if not masked:
        return None
    mask = torch.rand(T, generator=gen) < 0.6
    mask[-1] = True
    if T > 1:
        mask[0] = False
    return mask


def _inputs(T, E, k, gen, dtype, masked=False):
    logits = (torch.randn(T, E, generator=gen, dtype=torch.float64) * 2).to(dtype)
    # Choices biased towards the high-logit experts, as a router would make them, but not exactly the top-k.
    ids = (logits.double() + torch.rand(T, E, generator=gen, dtype=torch.float64)).argsort(dim=1, descending=True)
    return logits, ids[:, :k].contiguous(), _valid_mask(T, gen, masked)


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _value_tolerance(out_dtype):
    # Values are computed in at least float32; only the final rounding depends on the output dtype.
    return ref.tolerance(out_dtype if out_dtype in (torch.float64, torch.bfloat16, torch.float16) else torch.float32)


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_matches_reference(device, dtype, gen, T, E, k, masked):
    logits, ids, valid = _inputs(T, E, k, gen, dtype, masked)
    out = ops.router_losses(*_to(device, logits, ids, valid))
    expected = ref.router_losses(logits, ids, valid)
    for got, want, name in zip(out, expected, out._fields):
        assert got.dim() == 0 and got.is_floating_point() and got.device.type == device, name
        if dtype in (torch.float32, torch.float64):
            assert got.dtype == dtype, name
        torch.testing.assert_close(
            got.cpu().double(), want.detach(), **_value_tolerance(got.dtype), msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gradients_match_reference(device, gen, float_dtype, masked):
    T, E, k = 24, 6, 2
    logits, ids, valid = _inputs(T, E, k, gen, float_dtype, masked)
    x = logits.clone().to(device).requires_grad_()
    out = ops.router_losses(x, *_to(device, ids, valid))
    g_lb, g_z = 0.75, -1.25
    (out.load_balancing_loss * g_lb + out.z_loss * g_z).backward()
    x_ref = logits.double().clone().requires_grad_()
    lb, z, _ = ref.router_losses(x_ref, ids, valid)
    (lb * g_lb + z * g_z).backward()
    assert x.grad.dtype == float_dtype
    torch.testing.assert_close(x.grad.cpu().double(), x_ref.grad, **ref.tolerance(float_dtype))
    if valid is not None:
        assert bool((x.grad[~valid.to(device)] == 0).all()), "padding tokens must get no gradient"


# ---------------------------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_uniform_probs_give_load_balancing_exactly_one(device, float_dtype, gen):
    T, E, k = 16, 4, 2  # powers of two: every step of the loss is exact
    logits = torch.zeros(T, E, dtype=float_dtype, device=device)
    ids = ref.distinct_expert_ids(T, E, k, gen).to(device)
    out = ops.router_losses(logits, ids)
    assert out.load_balancing_loss.item() == 1.0
    tol = _value_tolerance(float_dtype)
    torch.testing.assert_close(out.z_loss.cpu().double(), torch.tensor(math.log(E) ** 2, dtype=torch.float64), **tol)
    torch.testing.assert_close(out.router_entropy.cpu().double(), torch.tensor(math.log(E), dtype=torch.float64), **tol)


def test_uniform_probs_any_routing(device, dtype, gen):
    # With p uniform, E * sum_i f_i / E = 1 whatever the routing and the mask.
    T, E, k = 30, 6, 3
    ids = ref.distinct_expert_ids(T, E, k, gen)
    ids[:10] = torch.tensor([0, 1, 2])  # a skewed routing
    valid = _valid_mask(T, gen, True)
    out = ops.router_losses(*_to(device, torch.zeros(T, E, dtype=dtype), ids, valid))
    torch.testing.assert_close(out.load_balancing_loss.cpu().double(), torch.tensor(1.0, dtype=torch.float64),
                               **_value_tolerance(out.load_balancing_loss.dtype))


def test_collapsed_router_gives_load_balancing_near_e(device):
    T, E = 20, 6
    logits = torch.full((T, E), -30.0, device=device)
    logits[:, 2] = 30.0
    ids = torch.full((T, 1), 2, dtype=torch.int64, device=device)
    out = ops.router_losses(logits, ids)
    torch.testing.assert_close(out.load_balancing_loss.cpu().double(), torch.tensor(float(E), dtype=torch.float64))


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_minus_inf_logit_is_an_expert_never_chosen(device, gen, float_dtype):
    # An expert masked out with a -inf logit has prob 0: every loss stays finite, and the entropy is that of the
    # other experts' softmax (p log p -> 0, never 0 * inf).
    T, E, k = 16, 5, 2
    logits, _, _ = _inputs(T, E, k, gen, float_dtype)
    logits[:, 3] = -math.inf
    ids = logits.argsort(dim=1, descending=True)[:, :k].contiguous()
    out = ops.router_losses(*_to(device, logits, ids))
    expected = ref.router_losses(logits, ids)
    for got, want, name in zip(out, expected, out._fields):
        assert torch.isfinite(got).item(), name
        torch.testing.assert_close(got.cpu().double(), want, **_value_tolerance(float_dtype), msg=name)
    kept = torch.cat([logits[:, :3], logits[:, 4:]], dim=1).double()
    without = -(kept.softmax(1) * kept.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(out.router_entropy.cpu().double(), without, **_value_tolerance(float_dtype))


@pytest.mark.parametrize("case", ["no_tokens", "all_masked"])
def test_no_valid_tokens_give_zero(device, dtype, case):
    E, k = 6, 2
    if case == "no_tokens":
        logits = torch.zeros(0, E, dtype=dtype, device=device)
        ids = torch.zeros(0, k, dtype=torch.int64, device=device)
        valid = None
    else:
        logits = torch.randn(5, E, device=device).to(dtype)
        ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0], [3, 2]], device=device)
        valid = torch.zeros(5, dtype=torch.bool, device=device)
    logits.requires_grad_()
    out = ops.router_losses(logits, ids, valid)
    for value, name in zip(out, out._fields):
        assert value.item() == 0.0, f"{name} = {value.item()}"
    (out.load_balancing_loss + out.z_loss).backward()
    assert logits.grad.shape == logits.shape
    assert bool(torch.isfinite(logits.grad).all()) and bool((logits.grad == 0).all())


def test_padding_tokens_do_not_matter(device, gen):
    T, E, k = 16, 6, 2
    logits, ids, valid = _inputs(T, E, k, gen, torch.float64, masked=True)
    base = ops.router_losses(*_to(device, logits, ids, valid))
    logits2, ids2 = logits.clone(), ids.clone()
    logits2[~valid] = 50.0 * torch.randn(int((~valid).sum()), E, generator=gen, dtype=torch.float64)
    ids2[~valid] = torch.tensor([5, 4])
    changed = ops.router_losses(*_to(device, logits2, ids2, valid))
    subset = ops.router_losses(*_to(device, logits[valid], ids[valid]))
    for a, b, c in zip(base, changed, subset):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_router_entropy_does_not_require_grad(device):
    logits = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0], [3, 2]], device=device)
    out = ops.router_losses(logits, ids)
    assert out.load_balancing_loss.requires_grad and out.z_loss.requires_grad
    assert not out.router_entropy.requires_grad


# ---------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases(device, dtype, gen):
    cases = []
    for T, E, k, masked in [(16, 6, 2, False), (0, 6, 2, False), (6, 6, 6, False), (12, 6, 2, True), (5, 3, 1, False)]:
        logits, ids, valid = _to(device, *_inputs(T, E, k, gen, dtype, masked))
        cases.append(((logits.requires_grad_(), ids), {"valid_mask": valid}))
    logits, ids, _ = _to(device, *_inputs(4, 6, 2, gen, dtype))
    cases.append(((logits.requires_grad_(), ids, torch.zeros(4, dtype=torch.bool, device=device)), {}))
    return cases


def test_opcheck(device, dtype, gen):
    for args, kwargs in _opcheck_cases(device, dtype, gen):
        torch.library.opcheck(OP, args, kwargs)


# ---------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("T,E,k", [(8, 6, 2), (5, 4, 4), (6, 3, 1)])
@pytest.mark.parametrize("which", ["load_balancing", "z_loss", "both"])
def test_gradcheck(device, gen, T, E, k, masked, which):
    logits, ids, valid = _to(device, *_inputs(T, E, k, gen, torch.float64, masked))
    logits.requires_grad_()

    def fn(x):
        out = ops.router_losses(x, ids, valid)
        if which == "load_balancing":
            return out.load_balancing_loss
        if which == "z_loss":
            return out.z_loss
        return out.load_balancing_loss, out.z_loss

    assert torch.autograd.gradcheck(fn, (logits,))


# ---------------------------------------------------------------------------------------------- bad input


def _good(device):
    logits = torch.randn(4, 3, device=device)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], device=device)
    return logits, ids


def test_good_input_is_accepted(device):
    ops.router_losses(*_good(device))


def test_bad_logits(device):
    logits, ids = _good(device)
    with pytest.raises(RuntimeError, match="'logits'"):
        ops.router_losses(logits.to(torch.int64), ids)
    with pytest.raises(RuntimeError, match="'logits'"):
        ops.router_losses(logits.reshape(-1), ids)


def test_bad_expert_ids(device):
    logits, ids = _good(device)
    with pytest.raises(RuntimeError, match=r"expert_ids.*int64|int64.*expert_ids"):
        ops.router_losses(logits, ids.to(torch.int32))
    for bad in (3, -1):
        bad_ids = ids.clone()
        bad_ids[1, 0] = bad
        with pytest.raises(RuntimeError, match=r"expert_ids.*\[0, "):
            ops.router_losses(logits, bad_ids)
    with pytest.raises(RuntimeError, match="expert_ids"):
        ops.router_losses(logits, ids[:3])
    with pytest.raises(RuntimeError, match="expert_ids"):
        ops.router_losses(logits, ids.reshape(-1))


def test_bad_valid_mask(device):
    logits, ids = _good(device)
    with pytest.raises(RuntimeError, match="valid_mask"):
        ops.router_losses(logits, ids, torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="valid_mask"):
        ops.router_losses(logits, ids, torch.ones(4, dtype=torch.int64, device=device))


def test_mixed_devices(cuda_device):
    logits, ids = _good(cuda_device)
    with pytest.raises(RuntimeError, match="device"):
        ops.router_losses(logits, ids.cpu())

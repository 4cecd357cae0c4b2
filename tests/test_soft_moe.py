"""Tests of torch_moe.SoftMoE against the per-sequence reference of Puigcerver et al.'s Algorithm 1."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import reference_routing as rr
import torch_moe
from reference_layer import ReferenceMoE

D, FF = 8, 12
F64 = torch.float64
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def expert_fn(layer):
    ref = ReferenceMoE(D, FF, layer.num_experts, 1, expert=layer.experts.expert)
    for name in ref.params:
        if name.startswith("experts."):
            ref.params[name] = getattr(layer.experts, name.split(".")[1]).detach().cpu().to(F64)
    return ref.expert_forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_experts,slots,expert", [(4, 1, "swiglu"), (3, 2, "mlp"), (1, 3, "geglu")])
def test_matches_reference(device, num_experts, slots, expert):
    layer = torch_moe.SoftMoE(D, FF, num_experts, slots, expert=expert, dtype=F64, device=device)
    x = torch.randn(2, 5, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    x_dev = x.clone().to(device).requires_grad_()
    y = layer(x_dev)
    x_ref = x.clone().requires_grad_()
    phi = layer.phi.detach().cpu().clone().requires_grad_()
    expected = rr.soft_moe(x_ref, phi, expert_fn(layer), num_experts, slots)
    assert_close(y.detach().cpu(), expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(expected)
    (y * upstream.to(device)).sum().backward()
    (expected * upstream).sum().backward()
    assert_close(x_dev.grad.cpu(), x_ref.grad, rtol=1e-9, atol=1e-12)
    assert_close(layer.phi.grad.cpu(), phi.grad, rtol=1e-9, atol=1e-12)


def test_permutation_equivariant_over_tokens():
    layer = torch_moe.SoftMoE(D, FF, 4, 2, dtype=F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, D, dtype=F64, generator=g)
    perm = torch.randperm(7, generator=g)
    assert_close(layer(x[:, perm]), layer(x)[:, perm], rtol=1e-10, atol=1e-12)


def test_padding_is_left_out():
    layer = torch_moe.SoftMoE(D, FF, 3, 1, dtype=F64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, D, dtype=F64, generator=g)
    padded = torch.cat([x, torch.full((1, 3, D), float("nan"), dtype=F64)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    y = layer(padded, mask)
    assert_close(y[:, :4], layer(x), rtol=1e-10, atol=1e-12)
    assert y[:, 4:].eq(0).all()
    all_padding = layer(padded[:, 4:], torch.zeros(1, 3, dtype=torch.bool))
    assert all_padding.eq(0).all()


def test_trains_and_keeps_every_token():
    torch.manual_seed(0)
    layer = torch_moe.SoftMoE(D, FF, 4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x, target = torch.randn(4, 6, D), torch.randn(4, 6, D)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.phi.grad is not None and layer.experts.w1.grad.abs().sum() > 0


def test_bad_input():
    with pytest.raises(ValueError, match="slots_per_expert must be a positive int"):
        torch_moe.SoftMoE(D, FF, 4, 0)
    with pytest.raises(ValueError, match="expert must be one of"):
        torch_moe.SoftMoE(D, FF, 4, expert="moe")
    layer = torch_moe.SoftMoE(D, FF, 2)
    with pytest.raises(ValueError, match=r"x must be \[B, N, d_model=8\]"):
        layer(torch.randn(5, D))
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        layer(torch.randn(1, 5, D), torch.ones(1, 4, dtype=torch.bool))

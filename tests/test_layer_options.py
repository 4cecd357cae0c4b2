"""The parity options of MoE that Hugging Face families need: routed_scaling_factor, shared_expert_d_ff and
shared_expert_gate, each against a plain-PyTorch computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_moe

D, FF, E = 8, 12, 6


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "noisy_topk"])
@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_routed_scaling_factor_scales_the_routed_output(router, capacity_factor):
    torch.manual_seed(0)
    plain = torch_moe.MoE(D, FF, E, 2, router=router, capacity_factor=capacity_factor, dtype=torch.float64).eval()
    scaled = torch_moe.MoE(D, FF, E, 2, router=router, capacity_factor=capacity_factor, routed_scaling_factor=2.5,
                           dtype=torch.float64).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.testing.assert_close(scaled(x), 2.5 * plain(x), rtol=1e-12, atol=1e-12)


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def test_gated_shared_expert_of_its_own_width():
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, FF, E, 2, capacity_factor=None, num_shared_experts=1, shared_expert_d_ff=20,
                          shared_expert_gate=True, dtype=torch.float64)
    plain = torch_moe.MoE(D, FF, E, 2, capacity_factor=None, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    assert layer.shared_experts.w1.shape == (1, D, 20)
    x = torch.randn(7, D, dtype=torch.float64)
    s = layer.shared_experts
    expected = plain(x) + torch.sigmoid(x @ layer.shared_expert_gate.weight.t()) * _swiglu(x, s.w1[0], s.w3[0], s.w2[0])
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    mask = torch.tensor([True, True, False, True, True, True, False])
    x_nan = x.clone()
    x_nan[~mask] = float("nan")
    got = layer(x_nan, mask)
    assert got[~mask].eq(0).all()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be a number > 0"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor must be a number > 0"),
    (dict(router="hash", routed_scaling_factor=2.0), "routed_scaling_factor applies to router="),
    (dict(shared_expert_gate=True), "need num_shared_experts >= 1"),
    (dict(shared_expert_d_ff=16), "need num_shared_experts >= 1"),
    (dict(num_shared_experts=1, shared_expert_d_ff=0), "shared_expert_d_ff must be a positive int"),
])
def test_bad_options(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        torch_moe.MoE(D, FF, E, 2, **kwargs)

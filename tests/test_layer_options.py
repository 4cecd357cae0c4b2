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


def _expert_reference(layer, x):
    """y[t] = sum_j weight[t, j] * expert_{id[t, j]}(x[t]) with every bias, in plain PyTorch (no drops)."""
    routing = layer.router(x)
    ex = layer.experts
    act = {"swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": lambda h: F.gelu(h, approximate="tanh")}[ex.expert]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.expert_ids.shape[1]):
            e = int(routing.expert_ids[t, j])
            gate = x[t] @ ex.w1[e] + (ex.b1[e] if ex.b1 is not None else 0)
            up = x[t] @ ex.w3[e] + (ex.b3[e] if ex.b3 is not None else 0)
            y[t] += routing.weights[t, j] * ((act(gate) * up) @ ex.w2[e] + (ex.b2[e] if ex.b2 is not None else 0))
    return y


@pytest.mark.parametrize("expert", ["swiglu", "geglu_tanh"])
@pytest.mark.parametrize("bias,up_bias", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("capacity_factor", [None, 8.0])  # 8.0: C >= T*k, nothing dropped
@pytest.mark.parametrize("grad", [True, False])  # no grad: the fused gather_grouped_glu inference path
def test_tanh_gelu_experts_and_up_bias_against_plain_pytorch(expert, bias, up_bias, capacity_factor, grad):
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, FF, E, 2, expert=expert, bias=bias, up_bias=up_bias, capacity_factor=capacity_factor,
                          dtype=torch.float64)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(9, D, dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        got = layer(x)
    expected = _expert_reference(layer, x.detach())
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-10, atol=1e-10)
    if grad:
        got.square().sum().backward()
        b3 = layer.experts.b3
        grads = [p.grad.clone() for p in (b3, layer.experts.w3, x) if p is not None]
        for p in (b3, layer.experts.w3):
            if p is not None:
                p.grad = None
        x_ref = x.detach().clone().requires_grad_()
        _expert_reference(layer, x_ref).square().sum().backward()
        expected_grads = [p.grad for p in (b3, layer.experts.w3, x_ref) if p is not None]
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_up_bias_needs_a_gated_expert():
    with pytest.raises(ValueError, match="up_bias .* needs a gated expert type"):
        torch_moe.MoE(D, FF, E, 2, expert="mlp", up_bias=True)


def test_grouped_path_with_up_bias_matches_the_batched_path():
    """Experts.forward_grouped (the expert-parallel dropless path) against Experts.forward on the same rows."""
    torch.manual_seed(0)
    experts = torch_moe.Experts(D, FF, 3, expert="geglu_tanh", bias=True, up_bias=True, dtype=torch.float64)
    counts = [2, 0, 3]
    rows = torch.randn(sum(counts), D, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 2, 5])
    got = experts.forward_grouped(rows, offsets)
    for e in range(3):
        segment = rows[offsets[e]:offsets[e + 1]]
        buffer = torch.zeros(3, max(len(segment), 1), D, dtype=torch.float64)
        buffer[e, :len(segment)] = segment
        torch.testing.assert_close(got[offsets[e]:offsets[e + 1]], experts(buffer)[e, :len(segment)],
                                   rtol=1e-12, atol=1e-12)

"""Gating dropout (Liu et al. 2022) and expert dropout (Fedus et al. 2021) of the MoE layer."""

from __future__ import annotations

import pytest
import torch

from reference_adaptive import layer_params, swiglu_expert
from torch_moe import MoE

F64 = torch.float64
D, D_FF, E, K = 8, 16, 4, 2


def _layer(**options) -> MoE:
    torch.manual_seed(5)
    return MoE(D, D_FF, E, K, dtype=F64, **options)


def _pair(**options) -> tuple[MoE, MoE]:
    """(a layer with ``options``, the plain layer with the same parameters)."""
    layer, plain = _layer(**options), _layer(capacity_factor=options.get("capacity_factor", 1.25))
    plain.load_state_dict(layer.state_dict())
    return layer, plain


def _tokens(T: int = 30, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    return torch.randn(2, T // 2, D, generator=g, dtype=F64).requires_grad_(requires_grad)


def _run(layer: MoE, x: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    return y, x.grad


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("option", ["gating_dropout", "expert_dropout"])
def test_rate_zero_is_bitwise_the_plain_layer(capacity_factor, option):
    layer, plain = _pair(capacity_factor=capacity_factor, **{option: 0.0})
    x = _tokens()
    y, grad = _run(layer, x)
    y_plain, grad_plain = _run(plain, x)
    assert torch.equal(y, y_plain) and torch.equal(grad, grad_plain)
    for (name, p), q in zip(layer.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
@pytest.mark.parametrize("option", ["gating_dropout", "expert_dropout"])
def test_eval_is_unaffected(capacity_factor, option):
    layer, plain = _pair(capacity_factor=capacity_factor, **{option: 1.0 if option == "gating_dropout" else 0.9})
    layer.eval(), plain.eval()
    x = _tokens()
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_gating_dropout_one_sends_every_token_to_its_local_expert(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor, gating_dropout=1.0, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = _tokens(requires_grad=True)
    y = layer(x)
    tokens = x.detach().reshape(-1, D).clone().requires_grad_()
    T = tokens.shape[0]
    params = layer_params(layer)
    # Without expert parallelism the T tokens form E contiguous blocks, block b going to expert b, weight 1.
    y_ref = torch.stack([swiglu_expert(params, t * E // T, tokens[t]) for t in range(T)])
    torch.testing.assert_close(y.reshape(-1, D), y_ref)
    expected_load = torch.bincount(torch.arange(T) * E // T, minlength=E)
    assert torch.equal(layer.stats.tokens_per_expert, expected_load)
    assert layer.stats.experts_per_token.item() == 1.0
    assert layer.stats.dropped_fraction.item() == 0.0
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out.reshape(-1, D)).sum().backward()
    torch.testing.assert_close(x.grad.reshape(-1, D), tokens.grad)
    assert layer.router.weight.grad is None or not layer.router.weight.grad.any()  # the gate was skipped
    torch.testing.assert_close(layer.experts.w1.grad, params["experts.w1"].grad)


def test_gating_dropout_drops_about_p_of_the_forwards():
    layer = _layer(capacity_factor=1.25, gating_dropout=0.3)
    x = _tokens(T=8).detach()
    torch.manual_seed(8)
    dropped = 0
    with torch.no_grad():
        for _ in range(200):
            layer(x)
            dropped += int(layer.stats.experts_per_token == 1)  # one local expert instead of the router's top-2
    assert 0.22 < dropped / 200 < 0.38  # 0.3 ± 2.5 standard deviations (seeded, so deterministic)


@pytest.mark.parametrize("mode", ["capacity", "dropless", "dropless_no_grad"])
def test_expert_dropout_mask_statistics(mode):
    p = 0.3
    layer = _layer(capacity_factor=1.25 if mode == "capacity" else None, expert_dropout=p)
    seen = []
    layer.experts.dropout.register_forward_hook(lambda module, args, out: seen.append((args[0].detach(), out.detach())))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(512, D, generator=g, dtype=F64)
    torch.manual_seed(10)
    with torch.set_grad_enabled(mode != "dropless_no_grad"):
        layer(x)
    (h, out), = seen
    assert h.shape[-1] == D_FF
    nonzero = h != 0
    dropped = (out == 0) & nonzero
    fraction = dropped.sum().item() / nonzero.sum().item()
    assert abs(fraction - p) < 0.02, fraction
    kept = ~dropped & nonzero
    torch.testing.assert_close(out[kept], h[kept] / (1 - p))


def test_expert_dropout_changes_the_training_output():
    layer, plain = _pair(capacity_factor=None, expert_dropout=0.5)
    x = _tokens()
    assert not torch.allclose(_run(layer, x)[0], _run(plain, x)[0])


@pytest.mark.parametrize("option", ["gating_dropout", "expert_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1"])
def test_dropout_rates_are_checked(option, value):
    with pytest.raises(ValueError, match=f"{option} must be a probability in \\[0, 1\\]"):
        MoE(D, D_FF, E, K, **{option: value})


def test_gating_dropout_needs_token_choice():
    with pytest.raises(ValueError, match="gating_dropout needs token-choice routing"):
        MoE(D, D_FF, E, K, router="expert_choice", gating_dropout=0.1)

"""MoE++ zero-computation experts (Jin et al. 2024): zero, copy and constant experts against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from reference_adaptive import layer_params, swiglu_expert
from torch_moe import MoE

F64 = torch.float64
D, D_FF, E, K = 8, 16, 4, 3
ZERO, COPY, CONSTANT = 1, 1, 2


def _layer(**options) -> MoE:
    torch.manual_seed(2)
    options.setdefault("capacity_factor", None)
    return MoE(D, D_FF, E, K, num_zero_experts=ZERO, num_copy_experts=COPY, num_constant_experts=CONSTANT, dtype=F64,
               **options)


def _tokens(T: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(T, D, generator=g, dtype=F64).requires_grad_()


def _reference(params: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """y[t] = Σ over the token's top-k of E + N experts of normalised prob · expert output."""
    probs = torch.softmax(x @ params["router.weight"].t(), -1)
    rows, chosen = [], []
    for t in range(x.shape[0]):
        row = probs[t].detach().tolist()
        ids = sorted(range(len(row)), key=lambda e: (-row[e], e))[:K]
        weights = probs[t, ids] / probs[t, ids].sum()
        y = x.new_zeros(D)
        for w, e in zip(weights, ids):
            if e < E:
                out = swiglu_expert(params, e, x[t])
            elif e < E + ZERO:
                out = torch.zeros_like(x[t])
            elif e < E + ZERO + COPY:
                out = x[t]
            else:
                c = e - E - ZERO - COPY
                alpha = torch.softmax(params["null_experts.constant_gate.weight"][2 * c:2 * c + 2] @ x[t], 0)
                out = alpha[0] * x[t] + alpha[1] * params["null_experts.constant_vectors"][c]
            y = y + w * out
        rows.append(y)
        chosen.append(ids)
    return torch.stack(rows), chosen


@pytest.mark.parametrize("capacity_factor", [None, 8.0])
def test_null_experts_output_and_gradients_match_reference(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = _tokens()
    y = layer(x)
    params = layer_params(layer)
    x_ref = x.detach().clone().requires_grad_()
    y_ref, chosen = _reference(params, x_ref)
    torch.testing.assert_close(y, y_ref)
    kinds = {min(e, E) for ids in chosen for e in ids}
    assert kinds == set(range(E + 1)) and any(e >= E + ZERO + COPY for ids in chosen for e in ids), \
        "every kind of expert should be chosen somewhere"
    ffn_counts = torch.zeros(E, dtype=torch.int64)
    for ids in chosen:
        for e in ids:
            if e < E:
                ffn_counts[e] += 1
    assert torch.equal(layer.stats.tokens_per_expert, ffn_counts)
    assert layer.stats.experts_per_token.item() == pytest.approx(ffn_counts.sum().item() / x.shape[0])
    assert layer.stats.dropped_fraction.item() == 0.0

    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    named = dict(layer.named_parameters())
    assert set(named) == set(params)
    for name in named:
        torch.testing.assert_close(named[name].grad, params[name].grad, msg=name)


def test_null_choices_take_no_ffn_rows(monkeypatch):
    layer = _layer()
    seen = {}
    forward_dropless = layer.experts.forward_dropless

    def spy(x, weights, row_index, offsets):
        seen["rows"] = offsets[-1].item()
        return forward_dropless(x, weights, row_index, offsets)

    monkeypatch.setattr(layer.experts, "forward_dropless", spy)
    x = _tokens()
    layer(x)
    ids = layer.router(x).expert_ids
    ffn = int((ids < E).sum())
    assert 0 < ffn < ids.numel()
    assert seen["rows"] == ffn


def test_null_choices_take_no_capacity_slots():
    layer = _layer(capacity_factor=1.0)
    x = _tokens()
    routing = layer.router(x)
    ffn_routing = layer._ffn_routing(routing, x.shape[0], False)
    load = layer.dispatcher.plan(ffn_routing, None, layer.capacity(x.shape[0]))
    null = routing.expert_ids >= E
    assert null.any() and (load.slots[null] == -1).all()
    assert load.tokens_per_expert.sum().item() == int((~null).sum())


def test_load_adapting_router_sees_null_experts():
    torch.manual_seed(4)
    layer = MoE(D, D_FF, E, K, router="sigmoid", bias_update_rate=1.0, num_copy_experts=2, capacity_factor=None,
                dtype=F64)
    x = _tokens().detach()
    with torch.no_grad():  # no graph: the bias update is applied at once
        routing = layer.router(x)  # the choice the layer's forward makes, before the update
        layer(x)
    load = torch.zeros(E + 2, dtype=F64).index_add_(0, routing.expert_ids.reshape(-1),
                                                    torch.ones(routing.expert_ids.numel(), dtype=F64))
    assert layer.router.expert_bias.shape == (E + 2,)
    torch.testing.assert_close(layer.router.expert_bias, torch.sign(load.mean() - load).float())


@pytest.mark.parametrize("name", ["num_zero_experts", "num_copy_experts", "num_constant_experts"])
@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_null_expert_counts_are_checked(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 0"):
        MoE(D, D_FF, E, 2, **{name: value})


def test_null_experts_need_token_choice():
    with pytest.raises(ValueError, match="null experts .* need token-choice routing"):
        MoE(D, D_FF, E, 2, router="expert_choice", num_zero_experts=1)


def test_null_experts_refuse_global_load_balancing():
    with pytest.raises(ValueError, match="global_load_balancing counts top_k FFN assignments .* null experts"):
        MoE(D, D_FF, E, 2, num_copy_experts=1, global_load_balancing=True)


def test_repr_names_the_null_experts_and_dropouts():
    layer = MoE(D, D_FF, E, 2, num_zero_experts=1, num_constant_experts=1, gating_dropout=0.1, expert_dropout=0.2)
    text = repr(layer)
    assert "num_zero=1, num_copy=0, num_constant=1" in text
    assert "gating_dropout=0.1" in text and "hidden_dropout=0.2" in text

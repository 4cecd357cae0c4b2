"""Top-p routing (Huang et al. 2024) and DS-MoE (Pan et al. 2024) against float64 references."""

from __future__ import annotations

import pytest
import torch

from reference_adaptive import (entropy, layer_params, mixture, mutual_information_loss, top_p_balance_loss,
                                top_p_choice)
from torch_moe import MoE
from torch_moe.routing import TopPRouter

F64 = torch.float64
D, D_FF, E = 8, 16, 6


def _tokens(T: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(T, D, generator=g, dtype=F64)).requires_grad_()


def _top_p_layer(threshold: float, top_k: int = 4, **options) -> MoE:
    torch.manual_seed(1)
    options.setdefault("capacity_factor", None)
    return MoE(D, D_FF, E, top_k, router="top_p", top_p_threshold=threshold, dtype=F64, **options)


# ------------------------------------------------------------------------------------------------------------
# top-p


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("normalize", [False, True])
def test_top_p_router_matches_reference(threshold, normalize):
    torch.manual_seed(0)
    router = TopPRouter(D, E, 4, top_p_threshold=threshold, normalize_weights=normalize, dtype=F64)
    x = _tokens()
    routing = router(x)
    probs = torch.softmax(x.detach() @ router.weight.detach().t(), -1)
    chosen = top_p_choice(probs, threshold, 4)
    for t, experts in enumerate(chosen):
        n = len(experts)
        assert routing.active[t].tolist() == [True] * n + [False] * (4 - n)
        assert routing.expert_ids[t, :n].tolist() == experts
        expected = probs[t, experts]
        expected = expected / expected.sum() if normalize else expected
        torch.testing.assert_close(routing.weights[t, :n].detach(), expected)
        assert (routing.weights[t, n:] == 0).all()
    assert {len(c) for c in chosen} != {1}, "the thresholds should give some tokens several experts"


def test_top_p_near_zero_is_top_1():
    layer = _top_p_layer(1e-9)
    plain = MoE(D, D_FF, E, 1, router="softmax", normalize_weights=False, capacity_factor=None, dtype=F64)
    plain.load_state_dict(layer.state_dict())
    x = _tokens()
    y = layer(x)
    torch.testing.assert_close(y, plain(x))
    assert layer.stats.experts_per_token.item() == 1.0
    torch.testing.assert_close(layer.stats.tokens_per_expert, plain.stats.tokens_per_expert)


def test_top_p_one_uses_every_expert():
    layer = _top_p_layer(1.0, top_k=E)
    x = _tokens()
    y = layer(x)
    assert layer.stats.experts_per_token.item() == E
    assert layer.stats.tokens_per_expert.tolist() == [x.shape[0]] * E
    params = layer_params(layer)
    probs = torch.softmax(x.detach() @ params["router.weight"].t(), -1)
    dense = mixture(params, x.detach(), [list(range(E))] * x.shape[0], list(probs))
    torch.testing.assert_close(y, dense)


@pytest.mark.parametrize("capacity_factor", [None, 8.0])
def test_top_p_layer_output_gradients_and_losses_match_reference(capacity_factor):
    threshold = 0.6
    layer = _top_p_layer(threshold, capacity_factor=capacity_factor, dynamic_loss_coef=0.5, aux_loss_coef=0.25,
                         z_loss_coef=0.0)
    x = _tokens()
    y = layer(x)
    assert layer.stats.dropped_fraction.item() == 0.0  # capacity 8.0: nothing drops, so the reference needs none
    params = layer_params(layer)
    x_ref = x.detach().clone().requires_grad_()
    logits = x_ref @ params["router.weight"].t()
    probs = torch.softmax(logits, -1)
    chosen = top_p_choice(probs.detach(), threshold, 4)
    y_ref = mixture(params, x_ref, chosen, [probs[t, c] for t, c in enumerate(chosen)])
    torch.testing.assert_close(y, y_ref)

    dynamic = entropy(probs).mean()
    balance = top_p_balance_loss(probs, chosen)
    torch.testing.assert_close(layer.stats.losses["dynamic"], dynamic.detach())
    torch.testing.assert_close(layer.stats.load_balancing_loss, balance.detach())
    expected_per_token = sum(len(c) for c in chosen) / len(chosen)
    assert layer.stats.experts_per_token.item() == pytest.approx(expected_per_token)

    grad_out = torch.randn_like(y)
    ((y * grad_out).sum() + layer.aux_loss).backward()
    ((y_ref * grad_out).sum() + 0.25 * balance + 0.5 * dynamic).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    named = dict(layer.named_parameters())
    for name in ("router.weight", "experts.w1", "experts.w2", "experts.w3"):
        torch.testing.assert_close(named[name].grad, params[name].grad, msg=name)


def test_top_p_dropless_rows_are_the_active_assignments(monkeypatch):
    layer = _top_p_layer(0.6)
    seen = {}
    forward_dropless = layer.experts.forward_dropless

    def spy(x, weights, row_index, offsets):
        seen["rows"] = offsets[-1].item()  # rows the grouped GEMMs compute: offsets [E + 1]
        seen["experts"] = offsets.shape[0] - 1
        return forward_dropless(x, weights, row_index, offsets)

    monkeypatch.setattr(layer.experts, "forward_dropless", spy)
    x = _tokens()
    layer(x)
    routing = layer.router(x)
    active = int(routing.active.sum())
    assert active < routing.active.numel()  # some slots unused, else the test proves nothing
    assert seen == {"rows": active, "experts": E}
    assert layer.stats.tokens_per_expert.sum().item() == active


def test_top_p_unused_slots_take_no_capacity():
    layer = _top_p_layer(0.6, capacity_factor=0.5, min_capacity=1)
    x = _tokens()
    routing = layer.router(x)
    capacity = layer.capacity(x.shape[0])
    load = layer.dispatcher.plan(routing, None, capacity)
    # GShard's position order over the active assignments only: every token's 1st choice, then 2nd, ...
    used, expected = [0] * E, torch.full(routing.expert_ids.shape, -1)
    for j in range(routing.expert_ids.shape[1]):
        for t in range(x.shape[0]):
            e = int(routing.expert_ids[t, j])
            if routing.active[t, j] and used[e] < capacity:
                expected[t, j] = used[e]
                used[e] += 1
    assert torch.equal(load.slots, expected)
    assert (expected[~routing.active] == -1).all() and (expected[routing.active] == -1).any()  # some drops
    counts = torch.zeros(E, dtype=torch.int64).index_add_(0, routing.expert_ids[routing.active],
                                                          torch.ones(int(routing.active.sum()), dtype=torch.int64))
    assert torch.equal(load.tokens_per_expert, counts)


def test_top_p_padding_tokens_are_left_out():
    layer = _top_p_layer(0.6, capacity_factor=4.0)
    x = _tokens(T=12).detach()
    mask = torch.tensor([True, False] * 6)
    y = layer(x.unsqueeze(0), mask.unsqueeze(0)).squeeze(0)
    assert (y[~mask] == 0).all()
    full = layer(x[mask])
    torch.testing.assert_close(y[mask], full)


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_top_p_threshold_is_checked(threshold):
    with pytest.raises(ValueError, match="top_p_threshold must be a number in"):
        MoE(D, D_FF, E, 2, router="top_p", top_p_threshold=threshold)


def test_top_p_options_belong_to_top_p():
    with pytest.raises(ValueError, match="top_p_threshold applies to router='top_p' only"):
        MoE(D, D_FF, E, 2, router="softmax", top_p_threshold=0.5)
    with pytest.raises(ValueError, match="dynamic_loss_coef must be a number >= 0"):
        MoE(D, D_FF, E, 2, router="top_p", dynamic_loss_coef=-1.0)


def test_fixed_top_k_reports_k_experts_per_token():
    layer = MoE(D, D_FF, E, 3, capacity_factor=1.0, dtype=F64)
    layer(_tokens())
    assert layer.stats.experts_per_token.item() == 3.0


# ------------------------------------------------------------------------------------------------------------
# DS-MoE


def _ds_layer(top_k: int = 2, **options) -> MoE:
    torch.manual_seed(3)
    options.setdefault("capacity_factor", None)
    return MoE(D, D_FF, E, top_k, router="ds_moe", dtype=F64, **options)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_ds_moe_training_is_the_dense_mixture(capacity_factor):
    layer = _ds_layer(capacity_factor=capacity_factor, mutual_information_loss_coef=0.5, aux_loss_coef=0.0,
                      z_loss_coef=0.0)
    x = _tokens()
    y = layer(x)
    params = layer_params(layer)
    x_ref = x.detach().clone().requires_grad_()
    probs = torch.softmax(x_ref @ params["router.weight"].t(), -1)
    y_ref = mixture(params, x_ref, [list(range(E))] * x.shape[0], list(probs))
    torch.testing.assert_close(y, y_ref)
    mi = mutual_information_loss(probs)
    torch.testing.assert_close(layer.stats.losses["mutual_information"], mi.detach())
    assert layer.stats.experts_per_token.item() == E
    assert layer.stats.tokens_per_expert.tolist() == [x.shape[0]] * E
    assert layer.stats.dropped_fraction.item() == 0.0

    grad_out = torch.randn_like(y)
    ((y * grad_out).sum() + layer.aux_loss).backward()
    ((y_ref * grad_out).sum() + 0.5 * mi).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    named = dict(layer.named_parameters())
    for name in ("router.weight", "experts.w1", "experts.w2", "experts.w3"):
        torch.testing.assert_close(named[name].grad, params[name].grad, msg=name)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_ds_moe_eval_is_top_k_routing_of_the_same_router(capacity_factor, normalize):
    layer = _ds_layer(capacity_factor=capacity_factor, normalize_weights=normalize)
    plain = MoE(D, D_FF, E, 2, router="softmax", normalize_weights=normalize, capacity_factor=capacity_factor,
                dtype=F64)
    plain.load_state_dict(layer.state_dict())
    layer.eval(), plain.eval()
    x = _tokens().detach()
    assert torch.equal(layer(x), plain(x))
    assert torch.equal(layer.stats.tokens_per_expert, plain.stats.tokens_per_expert)
    assert layer.stats.experts_per_token.item() == 2.0


def test_ds_moe_mutual_information_loss_skips_padding():
    layer = _ds_layer()
    x = _tokens(T=10).detach()
    mask = torch.tensor([True, True, False, True, False, True, True, True, False, True])
    layer(x.unsqueeze(0), mask.unsqueeze(0))
    probs = torch.softmax(x[mask] @ layer.router.weight.detach().t(), -1)
    torch.testing.assert_close(layer.stats.losses["mutual_information"], mutual_information_loss(probs))
    assert layer.stats.experts_per_token.item() == E


def test_ds_moe_options_are_checked():
    with pytest.raises(ValueError, match="mutual_information_loss_coef must be a number >= 0"):
        MoE(D, D_FF, E, 2, router="ds_moe", capacity_factor=None, mutual_information_loss_coef=float("inf"))
    with pytest.raises(ValueError, match="mutual_information_loss_coef applies to router='ds_moe' only"):
        MoE(D, D_FF, E, 2, mutual_information_loss_coef=0.1)


# ------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("options", [
    dict(router="top_p", top_k=3, top_p_threshold=0.5, capacity_factor=1.5),
    dict(router="ds_moe", capacity_factor=1.5),
    dict(num_zero_experts=1, num_copy_experts=1, num_constant_experts=1, capacity_factor=1.5),
], ids=["top_p", "ds_moe", "null_experts"])
def test_compile_fullgraph_matches_eager_in_training(options):
    torch.manual_seed(0)
    options = dict(options)
    layer = MoE(D, D_FF, E, options.pop("top_k", 2), **options)
    x = torch.randn(2, 6, D)
    eager = layer(x)
    eager_aux = layer.aux_loss
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.aux_loss, eager_aux, rtol=1e-5, atol=1e-6)


def test_top_p_refuses_losses_that_count_top_k_per_token():
    with pytest.raises(ValueError, match="seq_balance_loss_coef counts top_k assignments per token"):
        MoE(D, D_FF, E, 2, router="top_p", seq_balance_loss_coef=0.1)
    with pytest.raises(ValueError, match="global_load_balancing counts top_k FFN assignments"):
        MoE(D, D_FF, E, 2, router="top_p", global_load_balancing=True)


@pytest.mark.parametrize("capacity_factor", [None, 8.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_ds_moe_threshold_inference_matches_reference(capacity_factor, normalize):
    threshold = 0.2
    layer = _ds_layer(top_k=4, capacity_factor=capacity_factor, normalize_weights=normalize,
                      sparse_inference_threshold=threshold)
    layer.eval()
    x = _tokens().detach()
    y = layer(x)
    params = layer_params(layer)
    probs = torch.softmax(x @ params["router.weight"].detach().t(), -1)
    chosen, weights = [], []
    for row in probs:
        top = sorted(range(E), key=lambda e: (-float(row[e]), e))[:4]
        kept = [top[0]] + [e for e in top[1:] if row[e] >= threshold]
        w = row[kept] / (row[kept].sum() if normalize else 1.0)
        chosen.append(kept)
        weights.append(w)
    with torch.no_grad():
        y_ref = mixture({n: p.detach() for n, p in params.items()}, x, chosen, weights)
    torch.testing.assert_close(y, y_ref)
    lengths = [len(c) for c in chosen]
    assert min(lengths) == 1 and max(lengths) > 1, "the threshold should keep 1 expert for some tokens, more for others"
    assert layer.stats.experts_per_token.item() == pytest.approx(sum(lengths) / len(lengths))
    assert layer.stats.dropped_fraction.item() == 0.0
    torch.testing.assert_close(layer.stats.load_balancing_loss, top_p_balance_loss(probs, chosen))


def test_ds_moe_threshold_zero_is_top_k_and_training_ignores_it():
    layer = _ds_layer(top_k=2, sparse_inference_threshold=0.0)
    plain = _ds_layer(top_k=2)
    x = _tokens().detach()
    torch.testing.assert_close(layer(x), plain(x))  # training: dense either way
    layer.eval(), plain.eval()
    torch.testing.assert_close(layer(x), plain(x))
    assert layer.stats.experts_per_token.item() == 2.0


@pytest.mark.parametrize("threshold", [-0.1, 1.0, float("nan")])
def test_ds_moe_threshold_is_checked(threshold):
    with pytest.raises(ValueError, match="sparse_inference_threshold must be a number in \\[0, 1\\)"):
        MoE(D, D_FF, E, 2, router="ds_moe", sparse_inference_threshold=threshold)
    with pytest.raises(ValueError, match="sparse_inference_threshold applies to router='ds_moe' only"):
        MoE(D, D_FF, E, 2, sparse_inference_threshold=0.1)

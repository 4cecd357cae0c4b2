"""Routing override (MoE.forward(expert_ids=..., routing_weights=...)) against a plain-PyTorch reference, and
torch_moe.replay.RoutingRecorder: replay reproduces the recorded step bit for bit, under activation checkpointing
too, and through the MoEFeedForward wrappers of a converted HF model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import torch_moe
import tiny_hf
from reference_layer import ReferenceMoE
from torch_moe.replay import RoutingRecorder

D, FF, E, K = 8, 12, 6, 2


def _layer(**kwargs):
    torch.manual_seed(0)
    return torch_moe.MoE(D, FF, E, K, dtype=torch.float64, **kwargs)


def _reference_override(layer, x, expert_ids, weights=None):
    """y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]), w the softmax router's normalised probabilities of the given
    ids unless ``weights`` are given; loops over tokens, float64."""
    ref = ReferenceMoE.from_layer(layer, d_model=D, d_ff=FF, num_experts=E, top_k=K, capacity_factor=None)
    xt = x.reshape(-1, D)
    ids = expert_ids.reshape(-1, expert_ids.shape[-1])
    rows = []
    for t in range(xt.shape[0]):
        probs = torch.softmax(xt[t] @ ref.params["router.weight"].T, dim=-1)
        chosen = probs[ids[t]]
        w = chosen / chosen.sum() if weights is None else weights.reshape(ids.shape)[t]
        rows.append(sum(w[j] * ref.expert_forward(int(ids[t, j]), xt[t]) for j in range(ids.shape[1])))
    return torch.stack(rows).reshape(x.shape), ref


def _random_ids(shape, k, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(int(torch.tensor(shape).prod()))]).reshape(
        *shape, k)


@pytest.mark.parametrize("capacity_factor", [None, 100.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_override_against_the_reference(capacity_factor, k):
    layer = _layer(capacity_factor=capacity_factor)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    ids = _random_ids((2, 5), k)
    y = layer(x, expert_ids=ids)
    expected, ref = _reference_override(layer, x, ids)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    # Gradients reach the router through the weights of the given ids.
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, ref.params["router.weight"].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.experts.w1.grad, ref.params["experts.w1"].grad, rtol=1e-9, atol=1e-12)


def test_override_with_weights_is_straight_through():
    layer = _layer(capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    ids = _random_ids((2, 5), K)
    given = torch.rand(2, 5, K, dtype=torch.float64, requires_grad=True)
    y = layer(x, expert_ids=ids, routing_weights=given)
    expected, ref = _reference_override(layer, x, ids, weights=given.detach())
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    y.square().sum().backward()
    # The router's gradient is that of its own weights of these ids, given the upstream gradient of the weights.
    own_weights = []
    router_weight = ref.params["router.weight"]
    for t, xt in enumerate(x.reshape(-1, D)):
        probs = torch.softmax(xt @ router_weight.T, dim=-1)[ids.reshape(-1, K)[t]]
        own_weights.append(probs / probs.sum())
    own = torch.stack(own_weights)
    straight = given.detach().reshape(-1, K) + (own - own.detach())
    rows = [sum(straight[t, j] * ref.expert_forward(int(ids.reshape(-1, K)[t, j]), xt) for j in range(K))
            for t, xt in enumerate(x.reshape(-1, D))]
    torch.stack(rows).square().sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, router_weight.grad, rtol=1e-9, atol=1e-12)
    assert given.grad is not None and given.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "noisy_topk"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_override_by_the_routers_own_choice_changes_nothing(router, capacity_factor):
    layer = _layer(router=router, capacity_factor=capacity_factor, jitter_eps=0.1)
    x = torch.randn(3, 4, D, dtype=torch.float64)
    state = copy.deepcopy(layer.state_dict())
    torch.manual_seed(1)
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    recorded = RoutingRecorder()
    layer.load_state_dict(state)
    layer.zero_grad()
    torch.manual_seed(1)
    with recorded.record(layer):
        ids = None
        y_again = layer(x)
    assert torch.equal(y_again, y)
    ids = recorded.routing[""][0]["expert_ids"].reshape(3, 4, K)
    layer.load_state_dict(state)
    layer.zero_grad()
    torch.manual_seed(1)
    y2 = layer(x, expert_ids=ids)
    (y2.square().sum() + layer.aux_loss).backward()
    assert torch.equal(y2, y)
    for name, p in layer.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


class _Block(nn.Module):
    def __init__(self, checkpoint=None, **moe):
        super().__init__()
        self.norm = nn.LayerNorm(D, dtype=torch.float64)
        self.moe = torch_moe.MoE(D, FF, E, K, dtype=torch.float64, **moe)
        self.checkpoint = checkpoint

    def _body(self, x):
        return x + self.moe(self.norm(x))

    def forward(self, x):
        if self.checkpoint is None:
            return self._body(x)
        return torch.utils.checkpoint.checkpoint(self._body, x, use_reentrant=self.checkpoint == "reentrant")


def _model(checkpoint=None, **moe):
    torch.manual_seed(0)
    return nn.Sequential(*[_Block(checkpoint, **moe) for _ in range(3)])


def _step(model, x, seed):
    torch.manual_seed(seed)
    y = model(x)
    loss = y.square().mean() + torch_moe.aux_loss(model)
    loss.backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


ROUTERS = [dict(router="softmax"), dict(router="softmax", jitter_eps=0.2), dict(router="noisy_topk"),
           dict(router="sigmoid", bias_update_rate=1e-2), dict(router="softmax", capacity_factor=None)]


@pytest.mark.parametrize("moe", ROUTERS, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("checkpoint", [None, "non-reentrant", "reentrant"])
def test_replay_reproduces_the_recorded_step(moe, checkpoint):
    if checkpoint == "reentrant" and moe.get("router") == "sigmoid":
        pytest.skip("the sigmoid router with bias updates refuses reentrant checkpointing (tested in test_routers)")
    # Reentrant checkpointing runs the original forward without a graph, so the aux losses give no gradient
    # there: its recorded step is checkpointed the same way. The other cases record without checkpointing.
    recorded_model = _model("reentrant" if checkpoint == "reentrant" else None, **moe)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)  # reentrant checkpointing needs it
    state = copy.deepcopy(recorded_model.state_dict())
    recorder = RoutingRecorder()
    with recorder.record(recorded_model):
        y, grads = _step(recorded_model, x, seed=1)
    assert sorted(recorder.routing) == ["0.moe", "1.moe", "2.moe"]
    assert all(len(entries) == 1 for entries in recorder.routing.values())

    model = _model(checkpoint, **moe)
    model.load_state_dict(state)
    with recorder.replay(model):
        y_replayed, grads_replayed = _step(model, x, seed=1)
    assert torch.equal(y_replayed, y)
    for name in grads:
        assert torch.equal(grads_replayed[name], grads[name]), name


@pytest.mark.parametrize("moe", [dict(router="noisy_topk"), dict(router="softmax", jitter_eps=0.3)],
                         ids=["noisy_topk", "jitter"])
@pytest.mark.parametrize("checkpoint", [None, "non-reentrant"])
def test_replay_with_other_noise_routes_by_the_recorded_ids(moe, checkpoint):
    # Other noise or jitter would choose other experts: the recorded ids are what replay fixes. With the weights
    # recorded too, the outputs are those of the recorded step bit for bit, and so are the gradients of the last
    # layer's experts (earlier layers also get gradient through later routers' logits, which the noise changes).
    recorded_model = _model(**moe)
    x = torch.randn(2, 8, D, dtype=torch.float64)
    state = copy.deepcopy(recorded_model.state_dict())
    recorder = RoutingRecorder(record_weights=True)
    with recorder.record(recorded_model):
        y, grads = _step(recorded_model, x, seed=1)

    fresh = _model(checkpoint, **moe)
    fresh.load_state_dict(state)
    y_free, _ = _step(fresh, x, seed=2)
    assert not torch.equal(y_free, y)  # other noise: other routing

    model = _model(checkpoint, **moe)
    model.load_state_dict(state)
    seen = RoutingRecorder()
    with recorder.replay(model), seen.record(model):
        y_replayed, grads_replayed = _step(model, x, seed=2)
    for name in recorder.routing:
        assert torch.equal(seen.routing[name][0]["expert_ids"], recorder.routing[name][0]["expert_ids"])
    assert torch.equal(y_replayed, y)
    expert_grads = [name for name in grads if name.startswith("2.moe.experts.")]
    assert expert_grads
    for name in expert_grads:
        assert torch.equal(grads_replayed[name], grads[name]), name
    assert grads_replayed["0.moe.router.weight"].abs().sum() > 0  # the router still learns


def test_replay_errors():
    model = _model()
    recorder = RoutingRecorder()
    with pytest.raises(ValueError, match=r"nothing recorded for MoE layer\(s\) \['0.moe', '1.moe', '2.moe'\]"):
        with recorder.replay(model):
            pass
    with pytest.raises(ValueError, match="holds no torch_moe.MoE layer"):
        with recorder.record(nn.Linear(2, 2)):
            pass
    with recorder.record(model):
        model(torch.randn(2, 5, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="given expert_ids are for 10 tokens .* this forward has 12 tokens"):
        with recorder.replay(model):
            model(torch.randn(2, 6, D, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="runs more often than in the recorded pass"):
        with recorder.replay(model):
            model(torch.randn(2, 5, D, dtype=torch.float64))
            model(torch.randn(2, 5, D, dtype=torch.float64))
    # Outside the blocks the hooks are gone: other token counts route freely.
    model(torch.randn(3, 3, D, dtype=torch.float64))


def test_override_bad_arguments():
    layer = _layer()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expert_ids must be an integer tensor of shape \(2, 5, 'k'\)"):
        layer(x, expert_ids=torch.zeros(10, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="expert_ids must be an integer tensor"):
        layer(x, expert_ids=torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="routing_weights needs expert_ids"):
        layer(x, routing_weights=torch.ones(2, 5, 2))
    with pytest.raises(ValueError, match=r"routing_weights must be a float tensor of expert_ids' shape \(2, 5, 2\)"):
        layer(x, expert_ids=torch.zeros(2, 5, 2, dtype=torch.int64), routing_weights=torch.ones(2, 5, 3))
    with pytest.raises(ValueError, match="between 1 and num_experts=6 experts per token, got 7"):
        layer(x, expert_ids=torch.zeros(2, 5, 7, dtype=torch.int64))
    expert_choice = _layer(router="expert_choice")
    with pytest.raises(ValueError, match="needs token-choice routing"):
        expert_choice(x, expert_ids=torch.zeros(2, 5, 2, dtype=torch.int64))


def test_override_of_the_hash_router_weights_equally():
    layer = _layer(router="hash", capacity_factor=None)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    ids = _random_ids((2, 5), 3)
    y = layer(x, token_ids=torch.arange(10).reshape(2, 5), expert_ids=ids)
    ref = ReferenceMoE.from_layer(layer.__class__(D, FF, E, K, dtype=torch.float64), d_model=D, d_ff=FF,
                                  num_experts=E, top_k=K, capacity_factor=None)
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        ref.params[name] = dict(layer.named_parameters())[name].detach()
    expected = torch.stack([sum(ref.expert_forward(int(e), xt) for e in ids.reshape(-1, 3)[t]) / 3
                            for t, xt in enumerate(x.reshape(-1, D))]).reshape(x.shape)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


def _converted(gradient_checkpointing=False):
    from torch_moe.convert import moefy

    model = tiny_hf.make_model("llama", dtype=torch.float64, seed=0)
    torch.manual_seed(0)
    moefy(model, 4, top_k=2, capacity_factor=1.0, jitter_eps=0.1)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_replay_through_a_converted_hf_model(gradient_checkpointing):
    pytest.importorskip("transformers")
    ids = tiny_hf.input_ids(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    model = _converted()
    state = copy.deepcopy(model.state_dict())

    def step(m, seed):
        torch.manual_seed(seed)
        loss = tiny_hf.lm_loss(m, ids, mask) + torch_moe.aux_loss(m)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    recorder = RoutingRecorder()
    with recorder.record(model):
        loss, grads = step(model, seed=1)
    assert len(recorder.routing) == tiny_hf.num_layers(model)

    replayed = _converted(gradient_checkpointing)
    replayed.load_state_dict(state)
    with recorder.replay(replayed):
        loss_replayed, grads_replayed = step(replayed, seed=1)
    assert torch.equal(loss_replayed, loss)
    assert grads_replayed.keys() == grads.keys()
    for name in grads:
        assert torch.equal(grads_replayed[name], grads[name]), name

    # Router weights moved (as after an RL update): replay still routes by the recorded ids.
    moved = _converted(gradient_checkpointing)
    moved.load_state_dict(state)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name.endswith("router.weight"):
                p.add_(torch.randn_like(p))
    seen = RoutingRecorder()
    with seen.record(moved):
        step(moved, seed=1)
    assert any(not torch.equal(seen.routing[n][0]["expert_ids"], recorder.routing[n][0]["expert_ids"])
               for n in recorder.routing)
    with recorder.replay(moved), seen.record(moved):
        step(moved, seed=1)
    for name in recorder.routing:
        assert torch.equal(seen.routing[name][0]["expert_ids"], recorder.routing[name][0]["expert_ids"])

"""MoE(eval_capacity_factor=..., eval_top_k=...): eval-mode overrides of the capacity and of k, training untouched;
against the plain-PyTorch ReferenceMoE and against a layer built with those values; greedy generation of a
converted HF model with and without KV cache."""

from __future__ import annotations

import pytest
import torch

import torch_moe
import tiny_hf
from reference_layer import ReferenceMoE

D, FF, E = 8, 12, 6


def _pair(router="softmax", **overrides):
    torch.manual_seed(0)
    plain = torch_moe.MoE(D, FF, E, 2, router=router, capacity_factor=1.0, min_capacity=1, jitter_eps=0.1,
                          dtype=torch.float64)
    torch.manual_seed(0)
    with_overrides = torch_moe.MoE(D, FF, E, 2, router=router, capacity_factor=1.0, min_capacity=1, jitter_eps=0.1,
                                   dtype=torch.float64, **overrides)
    return plain, with_overrides


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "noisy_topk"])
@pytest.mark.parametrize("overrides", [{"eval_capacity_factor": "dropless"}, {"eval_top_k": 1},
                                       {"eval_capacity_factor": 3.0, "eval_top_k": 3}])
def test_training_is_bitwise_untouched(router, overrides):
    plain, with_overrides = _pair(router, **overrides)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    results = []
    for layer in (plain, with_overrides):
        layer.train()
        torch.manual_seed(1)  # the same jitter and noise in both
        y = layer(x)
        (y.square().sum() + layer.aux_loss).backward()
        results.append((y, layer.aux_loss, {n: p.grad for n, p in layer.named_parameters()}))
    (y0, aux0, grads0), (y1, aux1, grads1) = results
    assert torch.equal(y0, y1) and torch.equal(aux0, aux1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "noisy_topk", "random"])
@pytest.mark.parametrize("eval_capacity_factor, eval_top_k", [("dropless", None), (0.5, None), (None, 1),
                                                              ("dropless", 3), (2.0, 1)])
def test_eval_equals_a_layer_built_with_those_values(router, eval_capacity_factor, eval_top_k):
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, FF, E, 2, router=router, capacity_factor=1.0, min_capacity=1, dtype=torch.float64,
                          eval_capacity_factor=eval_capacity_factor, eval_top_k=eval_top_k)
    capacity_factor = {None: 1.0, "dropless": None}.get(eval_capacity_factor, eval_capacity_factor)
    built = torch_moe.MoE(D, FF, E, eval_top_k or 2, router=router, capacity_factor=capacity_factor, min_capacity=1,
                          normalize_weights=layer.normalize_weights, dtype=torch.float64)
    built.load_state_dict(layer.state_dict())
    x = torch.randn(4, 9, D, dtype=torch.float64)
    layer.eval(), built.eval()
    y = layer(x)
    assert torch.equal(y, built(x))
    assert torch.equal(layer.stats.tokens_per_expert, built.stats.tokens_per_expert)
    assert torch.equal(layer.aux_loss, built.aux_loss)
    if eval_capacity_factor == "dropless":
        assert float(layer.stats.dropped_fraction) == 0.0


@pytest.mark.parametrize("eval_capacity_factor, eval_top_k", [("dropless", None), (0.5, 1), (None, 3)])
def test_eval_against_the_plain_reference(eval_capacity_factor, eval_top_k):
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, FF, E, 2, capacity_factor=1.0, min_capacity=1, dtype=torch.float64,
                          eval_capacity_factor=eval_capacity_factor, eval_top_k=eval_top_k).eval()
    capacity_factor = {None: 1.0, "dropless": None}.get(eval_capacity_factor, eval_capacity_factor)
    ref = ReferenceMoE.from_layer(layer, d_model=D, d_ff=FF, num_experts=E, top_k=eval_top_k or 2,
                                  capacity_factor=capacity_factor, min_capacity=1, normalize_weights=True)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-10, atol=1e-12)
    # Back to training: the training capacity and k again.
    layer.train()
    train_ref = ReferenceMoE.from_layer(layer, d_model=D, d_ff=FF, num_experts=E, top_k=2, capacity_factor=1.0,
                                        min_capacity=1)
    torch.testing.assert_close(layer(x), train_ref(x), rtol=1e-10, atol=1e-12)


def test_eval_overrides_scale_with_granularity():
    torch.manual_seed(0)
    layer = torch_moe.MoE(D, FF, 3, 2, expert_granularity=2, eval_top_k=1, eval_capacity_factor="dropless",
                          dtype=torch.float64).eval()
    assert layer.eval_top_k == 2 and layer.router.active_top_k == 2
    layer.train()
    assert layer.router.active_top_k == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"router": "hash", "eval_top_k": 1}, "eval_top_k applies to token-choice routers"),
    ({"router": "expert_choice", "eval_top_k": 1}, "eval_top_k applies to token-choice routers"),
    ({"router": "expert_choice", "eval_capacity_factor": 2.0}, "eval_capacity_factor applies to token-choice"),
    ({"eval_top_k": 0}, r"eval_top_k must be an int in \[1, num_experts=6\], got 0"),
    ({"eval_top_k": 7}, r"eval_top_k must be an int in \[1, num_experts=6\], got 7"),
    ({"eval_top_k": 1.0}, "eval_top_k must be an int"),
    ({"eval_capacity_factor": 0}, "eval_capacity_factor must be a number > 0 and finite, 'dropless' or None"),
    ({"eval_capacity_factor": float("inf")}, "eval_capacity_factor must be a number > 0 and finite"),
    ({"eval_capacity_factor": "none"}, "eval_capacity_factor must be a number > 0"),
    ({"eval_top_k": 4, "n_groups": 3, "topk_groups": 1}, "eval_top_k=4 does not fit the groups: MoE: top_k=4 is larger"),
    ({"eval_capacity_factor": "dropless", "expert_parallel_group": object()},
     "not supported with expert_parallel_group yet"),
])
def test_bad_eval_overrides(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torch_moe.MoE(D, FF, E, 2, **kwargs)


def test_eval_capacity_factor_property():
    assert torch_moe.MoE(D, FF, E, 2).eval_capacity_factor is None
    layer = torch_moe.MoE(D, FF, E, 2, eval_capacity_factor="dropless")
    assert layer.eval_capacity_factor == "dropless" and layer.capacity_factor == 1.25 and not layer.dropless


def _generate(model, ids, use_cache):
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)


def test_dropless_eval_makes_greedy_generation_independent_of_the_kv_cache():
    # Capacity depends on the tokens of each call: the prompt pass without cache sees more tokens than a decoding
    # step with cache, so drops (and tokens) may differ. Dropless eval routes each token on its own.
    from torch_moe.convert import moefy

    ids = tiny_hf.input_ids(2, 6, seed=3)
    outputs = {}
    for eval_capacity_factor in (None, "dropless"):
        model = tiny_hf.make_model("llama", dtype=torch.float64, seed=0)
        torch.manual_seed(0)
        moefy(model, 4, top_k=2, capacity_factor=0.5, min_capacity=0, eval_capacity_factor=eval_capacity_factor)
        model.eval()
        outputs[eval_capacity_factor] = (_generate(model, ids, True), _generate(model, ids, False))
    cached, uncached = outputs["dropless"]
    assert torch.equal(cached, uncached)
    # The same model in capacity mode at eval: the two generations disagree (this is what the override fixes).
    cached, uncached = outputs[None]
    assert not torch.equal(cached, uncached)

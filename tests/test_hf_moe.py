"""from_hf_moe: HF sparse MoE blocks replaced by torch_moe layers compute what the originals did."""

from __future__ import annotations

import copy

import pytest
import torch

import torch_moe

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")
from test_hf_experts import AVAILABLE, input_ids, make_config  # noqa: E402  (the tiny configs of every family)
from torch_moe.integrations.hf_moe import from_hf_moe  # noqa: E402

SUPPORTED = list(AVAILABLE)
# PhiMoE's sparsemixer threshold: test_hf_experts turns it off (both weights are then 1); here a wide one, so that
# the masked softmaxes give weights below 1 and the router gets gradients.
CONFIG_OVERRIDES = {"phimoe": dict(router_jitter_noise=0.2)}


def make_pair(family: str, seed: int = 0, config_overrides=None, **overrides):
    config = make_config(family)
    for key, value in {**CONFIG_OVERRIDES.get(family, {}), **(config_overrides or {})}.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    original = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    original = original.float().eval()
    converted = from_hf_moe(copy.deepcopy(original), **overrides)
    return original, converted


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, torch_moe.MoE)]


def _split_gate_up(experts, t):
    """HF's [..., 2f] gate/up tensor as (gate, up): interleaved (GPT-OSS) or concatenated."""
    if getattr(experts, "is_concatenated", True):
        return t.chunk(2, dim=-1)
    return t[..., 0::2], t[..., 1::2]


def expert_grads(model):
    """Every expert parameter's gradient in torch_moe's layout, per layer: gate [E, d, f], up [E, d, f],
    down [E, f, d], then the biases gate [E, f], up [E, f], down [E, d] where the experts have them."""
    out = []
    for m in model.modules():
        if isinstance(m, torch_moe.MoE):
            e = m.experts
            out += [e.w1.grad, e.w3.grad, e.w2.grad] + [b.grad for b in (e.b1, e.b3, e.b2) if b is not None]
        elif hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
            gate_up, down = m.gate_up_proj.grad, m.down_proj.grad
            if not getattr(m, "is_transposed", False):
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            out += [*_split_gate_up(m, gate_up), down]
            if getattr(m, "has_bias", False):
                out += [*_split_gate_up(m, m.gate_up_proj_bias.grad), m.down_proj_bias.grad]
    return out


def router_grads(model):
    out = []
    for m in model.modules():
        if isinstance(m, torch_moe.MoE):
            router = m.router
        elif type(m).__name__.endswith(("TopKRouter", "TopkRouter")):
            router = m
        else:
            continue
        out.append(router.weight.grad)
        if isinstance(getattr(router, "bias", None), torch.Tensor):
            out.append(router.bias.grad)
    return out


@pytest.mark.parametrize("family", SUPPORTED)
def test_logits_and_gradients_equal_the_original(family):
    original, converted = make_pair(family)
    layers = moe_layers(converted)
    assert layers and all(layer.dropless for layer in layers)
    ids = input_ids(2, 9)
    out_o = original(input_ids=ids, labels=ids)
    out_c = converted(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_c.logits, out_o.logits, rtol=1e-5, atol=1e-5)
    # output_router_logits (on in these configs): HF's own aux loss from the converted layers' router logits
    assert len(out_c.router_logits) == len(out_o.router_logits) == len(layers)
    if getattr(out_o, "aux_loss", None) is not None:
        torch.testing.assert_close(out_c.aux_loss, out_o.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_c.loss, out_o.loss, rtol=1e-5, atol=1e-5)
    out_o.logits.square().mean().backward()
    out_c.logits.square().mean().backward()
    for got, expected in zip(expert_grads(converted), expert_grads(original), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for got, expected in zip(router_grads(converted), router_grads(original), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", SUPPORTED)
def test_padding_and_generate(family):
    original, converted = make_pair(family, seed=3)
    ids = input_ids(2, 8, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generate uses
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).logits
        got = converted(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens_o = original.generate(ids[:1], **generate)
        tokens_c = converted.generate(ids[:1], **generate)
    assert torch.equal(tokens_c, tokens_o)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "phimoe"])
def test_overrides_and_a_training_step(family):
    if family not in SUPPORTED:
        pytest.skip(f"{family} is not in this transformers")
    _, converted = make_pair(family, capacity_factor=1.25, aux_loss_coef=0.1)
    assert all(layer.capacity_factor == 1.25 for layer in moe_layers(converted))
    converted.train()
    ids = input_ids(2, 9)
    loss = converted(input_ids=ids, labels=ids).loss + torch_moe.aux_loss(converted)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.router.weight.grad is not None for layer in moe_layers(converted))
    _, other = make_pair(family, router="expert_choice", capacity_factor=1.0)
    assert all(layer.router_name == "expert_choice" for layer in moe_layers(other))
    other(input_ids=ids)


def test_deepseek_routing_options_are_carried():
    if "deepseek_v3" not in SUPPORTED:
        pytest.skip("no DeepSeek-V3 in this transformers")
    original, converted = make_pair("deepseek_v3")
    hf_router = next(m for m in original.modules() if type(m).__name__ == "DeepseekV3TopkRouter")
    layer = moe_layers(converted)[0]
    assert layer.router_name == "sigmoid" and layer.router.bias_update_rate == 0.0
    assert layer.router.n_groups == hf_router.num_group and layer.router.topk_groups == hf_router.topk_group
    assert layer.num_shared_experts == 1
    # the dense first layer stays dense
    assert len(moe_layers(converted)) == converted.config.num_hidden_layers - converted.config.first_k_dense_replace


def test_experts_without_a_torch_moe_type_say_so():
    config = make_config("mixtral")
    config.hidden_act = "relu"  # a gated ReLU: no torch_moe expert type computes it
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match="activation ReLU has no torch_moe expert type"):
        from_hf_moe(model)
    assert not moe_layers(model), "nothing is replaced when a block cannot be"


def test_no_moe_block():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                                   num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="found no sparse MoE block"):
        from_hf_moe(model)


def test_hf_aux_loss_is_top_k_times_torch_moe_on_one_layer():
    """The documented scale relation: for one MoE layer HF's load-balancing value is top_k x torch_moe's."""
    config = make_config("mixtral")
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = from_hf_moe(transformers.AutoModelForCausalLM.from_config(config).float().eval())
    # Not the pad token 0: its zero embedding gives all-equal logits, where torch_moe breaks the tie to the lower
    # expert ids and torch.topk (HF's count) to any.
    ids = input_ids(2, 9).clamp(min=1)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    (layer,) = moe_layers(model)
    torch.testing.assert_close(out.aux_loss, layer.top_k * layer.stats.load_balancing_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", [f for f in ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "phimoe")
                                    if f in SUPPORTED])
def test_save_and_reload_with_convert_from_pretrained(tmp_path, family):
    _, converted = make_pair(family, capacity_factor=1.25)
    ids = input_ids(2, 9)
    with torch.no_grad():
        expected = converted(input_ids=ids).logits
    converted.save_pretrained(tmp_path)
    again = torch_moe.convert.from_pretrained(tmp_path, attn_implementation="eager")
    assert [m.capacity_factor for m in moe_layers(again)] == [1.25] * len(moe_layers(converted))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert torch_moe.convert.from_hf_moe is from_hf_moe


def _needs(family):
    if family not in SUPPORTED:
        pytest.skip(f"no {family} in this transformers")


@pytest.mark.parametrize("family", ["gpt_oss", "phimoe"])
def test_capacity_mode_without_drops_equals_the_original(family):
    """Capacity mode (the [E, C, d] batched path of the experts) with room for every assignment: HF's logits."""
    _needs(family)
    original, converted = make_pair(family, capacity_factor=8.0, min_capacity=64)
    assert all(not layer.dropless for layer in moe_layers(converted))
    ids = input_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, original(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert all(float(layer.stats.dropped_fraction) == 0.0 for layer in moe_layers(converted))


def test_gpt_oss_options_are_carried():
    _needs("gpt_oss")
    original, converted = make_pair("gpt_oss")
    hf_experts = next(m for m in original.modules() if type(m).__name__ == "GptOssExperts")
    hf_router = next(m for m in original.modules() if type(m).__name__ == "GptOssTopKRouter")
    layer = moe_layers(converted)[0]
    assert layer.experts.expert == "swiglu_oss" and layer.normalize_weights
    assert layer.experts.swiglu_alpha == pytest.approx(hf_experts.alpha)
    assert layer.experts.swiglu_limit == pytest.approx(hf_experts.limit)
    torch.testing.assert_close(layer.router.bias, hf_router.bias, rtol=0, atol=0)
    # GPT-OSS's layout: gate and up interleaved along the last dim of gate_up_proj [E, d, 2f], then the biases
    torch.testing.assert_close(layer.experts.w3, hf_experts.gate_up_proj[..., 1::2], rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.b1, hf_experts.gate_up_proj_bias[:, 0::2], rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.b2, hf_experts.down_proj_bias, rtol=0, atol=0)
    # the clamp is reached by these weights (swiglu_limit=0.5 in the tiny config), so the equality tests cover it
    x = torch.randn(20, hf_experts.hidden_size, generator=torch.Generator().manual_seed(0))
    gate_up = torch.einsum("td,edf->etf", x, hf_experts.gate_up_proj) + hf_experts.gate_up_proj_bias[:, None]
    assert bool((gate_up.abs() > hf_experts.limit).any())


def test_phimoe_options_are_carried():
    _needs("phimoe")
    original, converted = make_pair("phimoe", config_overrides=dict(num_experts_per_tok=3, input_jitter_noise=0.1))
    layer = moe_layers(converted)[0]
    assert layer.router_name == "sparsemixer" and not layer.normalize_weights
    assert layer.router.jitter_eps == pytest.approx(0.2)
    assert layer.top_k == 2, "HF's sparsemixer routes to two experts whatever num_experts_per_tok says"
    ffn = next(m for m in converted.modules() if isinstance(m, torch_moe.convert.MoEFeedForward))
    assert ffn.input_jitter == pytest.approx(0.1)
    ids = input_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, original(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_phimoe_training_mode_equals_the_original_under_one_seed():
    """Train mode: Gumbel sampling, Heun's estimator and the input jitter draw HF's random numbers in HF's order,
    so one seed gives HF's logits, loss and gradients of every router and expert parameter."""
    _needs("phimoe")
    original, converted = make_pair("phimoe", config_overrides=dict(input_jitter_noise=0.1))
    original.train()
    converted.train()
    ids = input_ids(2, 9)
    torch.manual_seed(123)
    out_o = original(input_ids=ids, labels=ids)
    torch.manual_seed(123)
    out_c = converted(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_c.logits, out_o.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_c.loss, out_o.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_c.aux_loss, out_o.aux_loss, rtol=1e-5, atol=1e-6)
    out_o.loss.backward()
    out_c.loss.backward()
    for got, expected in zip(expert_grads(converted), expert_grads(original), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grads = router_grads(converted)
    assert all(bool(g.abs().sum() > 0) for g in grads), "the estimator reaches the router"
    for got, expected in zip(grads, router_grads(original), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # another seed routes differently: the equality above is not that of a deterministic forward
    torch.manual_seed(7)
    with torch.no_grad():
        again = converted(input_ids=ids).logits
    assert not torch.allclose(again, out_c.logits)

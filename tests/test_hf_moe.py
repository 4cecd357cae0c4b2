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

SUPPORTED = [f for f in AVAILABLE if f not in ("phimoe", "gpt_oss")]
UNSUPPORTED = [f for f in AVAILABLE if f in ("phimoe", "gpt_oss")]


def make_pair(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    original = transformers.AutoModelForCausalLM.from_config(make_config(family), experts_implementation="eager")
    original = original.float().eval()
    converted = from_hf_moe(copy.deepcopy(original), **overrides)
    return original, converted


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, torch_moe.MoE)]


def expert_grads(model):
    """Every expert weight's gradient in torch_moe's layout [E, d_in, d_out], per layer, gate/up/down."""
    out = []
    for m in model.modules():
        if isinstance(m, torch_moe.MoE):
            out.append(torch.cat([m.experts.w1.grad, m.experts.w3.grad], dim=2))
            out.append(m.experts.w2.grad)
        elif hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
            out.append(m.gate_up_proj.grad.transpose(1, 2))
            out.append(m.down_proj.grad.transpose(1, 2))
    return out


def router_grads(model):
    out = []
    for m in model.modules():
        if isinstance(m, torch_moe.MoE):
            out.append(m.router.weight.grad)
        elif type(m).__name__.endswith(("TopKRouter", "TopkRouter")):
            out.append(m.weight.grad)
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


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
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


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_families_say_so(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family))
    with pytest.raises(NotImplementedError, match="hf_experts"):
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


@pytest.mark.parametrize("family", [f for f in ("mixtral", "qwen2_moe", "deepseek_v3") if f in SUPPORTED])
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

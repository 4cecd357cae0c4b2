"""moefy across Hugging Face architectures: exact sparse upcycling of 30 dense families, the adapter protocol for
other FFNs, existing MoE models left alone, and the errors for FFNs the experts cannot hold."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

pytest.importorskip("transformers")

import tiny_hf  # noqa: E402
import torch_moe  # noqa: E402
from torch_moe.convert import DenseFFN, MoEFeedForward, from_pretrained, moefy  # noqa: E402

NUM_EXPERTS = 4
LAYERS = 2

# architecture -> FFNs converted in a model of LAYERS layers (encoder-decoders and CLIP have two stacks).
CONVERTED = {
    "llama": LAYERS, "mistral": LAYERS, "qwen2": LAYERS, "qwen3": LAYERS, "smollm3": LAYERS, "granite": LAYERS,
    "olmo2": LAYERS, "stablelm": LAYERS, "cohere": LAYERS, "gpt2": LAYERS, "bert": LAYERS, "roberta": LAYERS,
    "phi3": LAYERS, "gpt_neox": LAYERS, "falcon": LAYERS, "bloom": LAYERS, "phi": LAYERS, "vit": LAYERS,
    "clip": 2 * LAYERS, "gptj": LAYERS, "modernbert": LAYERS, "distilbert": LAYERS, "t5": 2 * LAYERS,
    "opt": LAYERS, "whisper": 2 * LAYERS,
}
# Gated FFNs with a tanh-gelu gate (expert="geglu_tanh") and Llama with a bias on up_proj too (up_bias=True).
TANH_GATED = {"t5_gated": 2 * LAYERS, "gemma": LAYERS, "gemma2": LAYERS, "gemma3": LAYERS}
CONVERTED.update(TANH_GATED, llama_mlp_bias=LAYERS)
ALL_30 = tuple(CONVERTED)


def converted(model) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def test_the_list_is_the_thirty():
    assert len(set(ALL_30)) == 30


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_upcycled_architecture_equals_dense(name):
    model = tiny_hf.make_arch(name, layers=LAYERS)
    inputs = tiny_hf.arch_inputs(name)
    with torch.no_grad():
        dense_out = tiny_hf.arch_output(model, name, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropout is dropped in these configs, nothing is skipped
        moefy(model, NUM_EXPERTS, top_k=2, upcycle=True)
    assert len(converted(model)) == CONVERTED[name]
    assert len(converted(model)) == len([m for m in model.modules() if isinstance(m, torch_moe.MoE)])
    with torch.no_grad():
        out = tiny_hf.arch_output(model, name, inputs)
    assert_close(out, dense_out, rtol=0, atol=1e-10)
    # The routers are not trivial: tokens go to different experts.
    assert any((ffn.moe.stats.tokens_per_expert > 0).sum() >= 2 for ffn in converted(model))

    model.train()
    loss = tiny_hf.arch_output(model, name, inputs).square().mean() + torch_moe.aux_loss(model)
    loss.backward()
    for ffn in converted(model):
        assert ffn.moe.experts.w1.grad is not None and ffn.moe.experts.w1.grad.abs().sum() > 0
        assert ffn.moe.router.weight.grad is not None


def test_layer_types_of_the_gated_variants():
    gemma = moefy(tiny_hf.make_arch("gemma", layers=1), NUM_EXPERTS, upcycle=True)
    assert {f.moe.experts.expert for f in converted(gemma)} == {"geglu_tanh"}
    llama = moefy(tiny_hf.make_arch("llama_mlp_bias", layers=1), NUM_EXPERTS, upcycle=True)
    experts = converted(llama)[0].moe.experts
    assert experts.b1 is not None and experts.b2 is not None and experts.b3 is not None


def test_fused_gate_up_bias_is_split_into_b1_and_b3():
    modernbert = tiny_hf.make_arch("modernbert", layers=1)
    mlp = modernbert.model.layers[0].mlp
    mlp.Wi.bias = nn.Parameter(torch.randn(2 * tiny_hf.INTERMEDIATE, dtype=torch.float64))
    inputs = tiny_hf.arch_inputs("modernbert")
    with torch.no_grad():
        dense_out = tiny_hf.arch_output(modernbert, "modernbert", inputs)
    moefy(modernbert, NUM_EXPERTS, upcycle=True)
    experts = converted(modernbert)[0].moe.experts
    assert_close(experts.b1[0], mlp.Wi.bias[:tiny_hf.INTERMEDIATE], rtol=0, atol=0)
    assert_close(experts.b3[0], mlp.Wi.bias[tiny_hf.INTERMEDIATE:], rtol=0, atol=0)
    with torch.no_grad():
        assert_close(tiny_hf.arch_output(modernbert, "modernbert", inputs), dense_out, rtol=0, atol=1e-10)


def test_quick_gelu_becomes_scaled_silu_experts():
    model = tiny_hf.make_arch("clip", layers=1)
    mlp = model.text_model.encoder.layers[0].mlp
    fc1, fc2 = mlp.fc1.weight.detach().clone(), mlp.fc2.weight.detach().clone()
    moefy(model, NUM_EXPERTS, upcycle=True)
    experts = model.text_model.encoder.layers[0].mlp.moe.experts
    assert (experts.expert, experts.activation) == ("mlp", "silu")
    assert_close(experts.w1[0], 1.702 * fc1.t(), rtol=1e-15, atol=0)
    assert_close(experts.w2[0], fc2.t() / 1.702, rtol=1e-15, atol=0)


def test_inline_ffn_of_opt_and_whisper_layers():
    # OPT: fc1 and fc2 are used inside the decoder layer, on tokens flattened to [B*S, d].
    model = tiny_hf.make_arch("opt", layers=1)
    ids = tiny_hf.arch_inputs("opt")["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        dense_out = model(input_ids=ids, attention_mask=mask).logits
    moefy(model, NUM_EXPERTS, upcycle=True)
    layer = model.model.decoder.layers[0]
    assert isinstance(layer.fc1, MoEFeedForward)
    assert isinstance(layer.fc2, nn.Identity) and isinstance(layer.activation_fn, nn.Identity)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close(out[keep], dense_out[keep], rtol=0, atol=1e-10)
    assert int(layer.fc1.moe.stats.tokens_per_expert.sum()) == 2 * int(mask.sum())  # padding took no expert

    # Whisper's activation_dropout would fall on the MoE output: it is set to 0, with a warning.
    whisper = tiny_hf.make_arch("whisper", layers=1)
    whisper.model.encoder.layers[0].activation_dropout = 0.1
    with pytest.warns(UserWarning, match=r"dropout \(p=0.1\) between the two linears of WhisperEncoderLayer"):
        moefy(whisper, NUM_EXPERTS, upcycle=True)
    assert whisper.model.encoder.layers[0].activation_dropout == 0.0


def test_encoder_decoder_masks_reach_their_own_ffns():
    # T5: attention_mask is the encoder's; the decoder's FFNs must not take it as theirs.
    model = tiny_hf.make_arch("t5", layers=1)
    inputs = tiny_hf.arch_inputs("t5")
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, 3:] = 0
    with torch.no_grad():
        dense_out = model(**inputs, attention_mask=mask).logits
    moefy(model, NUM_EXPERTS, upcycle=True)
    with torch.no_grad():
        out = model(**inputs, attention_mask=mask).logits
    assert_close(out, dense_out, rtol=0, atol=1e-10)
    decoder_ffn = model.decoder.block[0].layer[-1].DenseReluDense
    assert decoder_ffn.attention_mask is None


def test_bloom_mlp_keeps_its_fused_dropout_add():
    model = tiny_hf.make_arch("bloom", layers=1)
    moefy(model, NUM_EXPERTS, upcycle=True)
    mlp = model.transformer.h[0].mlp
    assert type(mlp).__name__ == "BloomMLP"  # forward(hidden_states, residual) unchanged
    assert isinstance(mlp.dense_h_to_4h, MoEFeedForward) and isinstance(mlp.dense_4h_to_h, nn.Identity)


def test_converted_architecture_saves_and_reloads(tmp_path):
    model = moefy(tiny_hf.make_arch("opt", dtype=torch.float32, layers=1), NUM_EXPERTS, 2)
    inputs = tiny_hf.arch_inputs("opt")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


# --------------------------------------------------------------------------------------------------
# the adapter protocol


class OddFFN(nn.Module):
    """An FFN moefy does not know: odd names, the activation a function, the output scaled by a buffer."""

    def __init__(self, width=8, hidden=16):
        super().__init__()
        self.expand = nn.Linear(width, hidden)
        self.contract = nn.Linear(hidden, width)

    def forward(self, x):
        return self.contract(torch.relu(self.expand(x)))


class OddGLU(nn.Module):
    """A gated FFN whose forward takes an extra argument: the MoE goes inside it, not in its place."""

    def __init__(self, width=8, hidden=16):
        super().__init__()
        self.packed = nn.Parameter(torch.randn(2, width, hidden) / width**0.5)  # [gate, up], already x · w
        self.out = nn.Linear(hidden, width, bias=False)
        self.body = None  # the MoE, once converted

    def forward(self, x, scale):
        if self.body is not None:
            return scale * self.body(x)
        return scale * self.out(nn.functional.silu(x @ self.packed[0]) * (x @ self.packed[1]))


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = OddFFN()
        self.glu = OddGLU()

    def forward(self, x):
        return self.glu(x + self.ffn(x), 0.5)


def odd_adapter(name, module):
    if isinstance(module, OddFFN):
        return DenseFFN(w1=module.expand.weight.t(), w2=module.contract.weight.t(), activation="relu",
                        b1=module.expand.bias, b2=module.contract.bias)
    if isinstance(module, OddGLU):
        def install(glu, replacement):
            glu.body = replacement
            del glu.packed, glu.out
        return DenseFFN(w1=module.packed[0], w3=module.packed[1], w2=module.out.weight.t(),
                        activation=nn.functional.silu, install=install)
    return None


def test_adapter_converts_unknown_ffns_exactly():
    torch.manual_seed(0)
    model = OddModel().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        dense_out = model(x)
    moefy(model, NUM_EXPERTS, 2, upcycle=True, adapter=odd_adapter)
    assert isinstance(model.ffn, MoEFeedForward) and isinstance(model.glu.body, MoEFeedForward)
    assert model.ffn.moe.experts.expert == "mlp" and model.glu.body.moe.experts.expert == "swiglu"
    with torch.no_grad():
        assert_close(model(x), dense_out, rtol=0, atol=1e-12)
    (model(x).sum() + torch_moe.aux_loss(model)).backward()
    assert model.glu.body.moe.experts.w3.grad is not None


def test_adapter_with_select_and_errors():
    model = OddModel().double()
    moefy(model, NUM_EXPERTS, 2, adapter=odd_adapter, select="ffn")
    assert isinstance(model.ffn, MoEFeedForward) and model.glu.body is None
    with pytest.raises(ValueError, match="adapter must be a callable"):
        moefy(OddModel(), NUM_EXPERTS, adapter=3)
    with pytest.raises(ValueError, match=r"adapter\('ffn', OddFFN\) returned dict; it must return"):
        moefy(OddModel(), NUM_EXPERTS, adapter=lambda name, m: {} if isinstance(m, OddFFN) else None)
    bad_shape = lambda name, m: (DenseFFN(w1=m.expand.weight, w2=m.contract.weight.t(), activation="relu")
                                 if isinstance(m, OddFFN) else None)
    with pytest.raises(ValueError, match=r"w1 of shape \(16, 8\) = \[d_model, d_ff\], so w2 must have shape "
                                         r"\[8, 16\], got \(16, 8\)"):
        moefy(OddModel(), NUM_EXPERTS, adapter=bad_shape)
    b3 = lambda name, m: (DenseFFN(w1=m.packed[0], w3=m.packed[1], w2=m.out.weight.t(), activation="silu",
                                   b3=torch.zeros(16)) if isinstance(m, OddGLU) else None)
    with_b3 = moefy(OddModel(), NUM_EXPERTS, adapter=b3, select="glu")
    assert with_b3.glu.moe.experts.b3 is not None  # a gated FFN's up bias becomes the experts' up_bias
    with pytest.raises(ValueError, match="activation 'tanh' is not one moefy knows"):
        moefy(OddModel(), NUM_EXPERTS, select="ffn", adapter=lambda n, m: DenseFFN(
            w1=m.expand.weight.t(), w2=m.contract.weight.t(), activation="tanh"))


def test_adapter_conversion_reloads_only_with_the_adapter(tmp_path):
    model = tiny_hf.make_model("llama", dtype=torch.float32, layers=1)

    def llama_adapter(name, module):  # what the built-in matcher does, written as an adapter
        if type(module).__name__ != "LlamaMLP":
            return None
        return DenseFFN(w1=module.gate_proj.weight.t(), w3=module.up_proj.weight.t(),
                        w2=module.down_proj.weight.t(), activation=module.act_fn)

    moefy(model, NUM_EXPERTS, 2, adapter=llama_adapter)
    ids = tiny_hf.input_ids(2, 6)
    with torch.no_grad():
        expected = tiny_hf.logits(model, ids)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="converted with an adapter; pass the same adapter="):
        from_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = from_pretrained(tmp_path, adapter=llama_adapter, attn_implementation="eager")
        assert torch.equal(tiny_hf.logits(reloaded, ids), expected)


# --------------------------------------------------------------------------------------------------
# existing MoE models


@pytest.mark.parametrize("family", [f for f in tiny_hf.MOE_FAMILIES if f != "deepseek_v3"])
def test_moe_models_are_left_alone(family):
    model = tiny_hf.make_moe_family(family)
    with pytest.raises(ValueError, match=r"already is a mixture of experts: its MoE blocks \['model.layers.0.mlp'"):
        moefy(model, NUM_EXPERTS, upcycle=True)
    # Selecting inside the blocks (Qwen2-MoE's shared expert looks like a Llama MLP) converts nothing either.
    with pytest.raises(ValueError, match="already is a mixture of experts.*that select matched"):
        moefy(model, NUM_EXPERTS, select="*shared_expert*")
    assert not converted(model)


def test_deepseek_v3_dense_layers_convert_only_when_selected():
    model = tiny_hf.make_moe_family("deepseek_v3")
    with pytest.raises(ValueError, match=r"already has MoE blocks \['model.layers.1.mlp'\].*dense FFNs outside "
                                         r"them, \['model.layers.0.mlp'\].*pass select="):
        moefy(model, NUM_EXPERTS, upcycle=True)
    assert not converted(model)
    ids = tiny_hf.input_ids(2, 6)
    with torch.no_grad():
        dense_out = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match=r"left 1 existing MoE block\(s\) of DeepseekV3ForCausalLM alone.*"
                                         r"\['model.layers.1.mlp'\]"):
        moefy(model, NUM_EXPERTS, upcycle=True, select="model.layers.*.mlp")
    assert [n for n, m in model.named_modules() if isinstance(m, MoEFeedForward)] == ["model.layers.0.mlp"]
    assert type(model.model.layers[1].mlp.shared_experts).__name__ == "DeepseekV3MLP"
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, dense_out, rtol=1e-5, atol=1e-5)

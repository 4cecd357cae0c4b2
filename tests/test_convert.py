"""Tests of torch_moe.convert.moefy: recognising FFNs, sparse upcycling, training, checkpoints, compile, autocast."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

pytest.importorskip("transformers")

import torch_moe  # noqa: E402
import tiny_hf  # noqa: E402
from torch_moe.convert import UPCYCLE_ROUTER_STD, MoEFeedForward, moefy, padding_mask  # noqa: E402

NUM_EXPERTS = 4


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, torch_moe.MoE)]


def dense_ffn(width=8, hidden=16, act=None, bias=True, dropout=None):
    layers = [nn.Linear(width, hidden, bias=bias), act if act is not None else nn.GELU(),
              nn.Linear(hidden, width, bias=bias)]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class PlainBlock(nn.Module):
    """A plain PyTorch pre-norm block whose FFN is an nn.Sequential."""

    def __init__(self, width=8, act=None, bias=True):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ffn = dense_ffn(width, 2 * width, act, bias)

    def forward(self, x):
        return x + self.ffn(self.norm(x))


# --------------------------------------------------------------------------------------------------
# recognition and upcycling


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_upcycled_outputs_equal_dense(family):
    model = tiny_hf.make_model(family)
    ids = tiny_hf.input_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dense_out = tiny_hf.logits(model, ids, mask)

    moefy(model, NUM_EXPERTS, top_k=2, upcycle=True)
    assert len(moe_layers(model)) == tiny_hf.num_layers(model)
    out = tiny_hf.logits(model, ids, mask)
    keep = mask.bool()
    assert_close(out[keep], dense_out[keep], rtol=1e-12, atol=1e-12)
    # The routers are not trivial: tokens go to different experts.
    assert all((layer.stats.tokens_per_expert > 0).sum() >= 2 for layer in moe_layers(model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_upcycled_capacity_mode_without_drops_equals_dense(family):
    # capacity_factor = E / k: C >= T, so nothing can be dropped.
    model = tiny_hf.make_model(family)
    ids = tiny_hf.input_ids(2, 8)
    dense_out = tiny_hf.logits(model, ids)
    moefy(model, NUM_EXPERTS, top_k=2, upcycle=True, capacity_factor=NUM_EXPERTS / 2)
    assert all(layer.capacity_factor == NUM_EXPERTS / 2 for layer in moe_layers(model))
    assert_close(tiny_hf.logits(model, ids), dense_out, rtol=1e-12, atol=1e-12)
    assert all(layer.stats.dropped_fraction == 0 for layer in moe_layers(model))


def test_upcycled_top1_is_exact_with_normalised_weights():
    model = tiny_hf.make_model("llama")
    ids = tiny_hf.input_ids(2, 6)
    dense_out = tiny_hf.logits(model, ids)
    moefy(model, NUM_EXPERTS, top_k=1, upcycle=True)
    assert all(layer.normalize_weights for layer in moe_layers(model))
    assert_close(tiny_hf.logits(model, ids), dense_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("router", ["sigmoid", "random", "hash"])
def test_upcycled_outputs_equal_dense_with_other_routers(router):
    # Normalised top-k weights of identical experts sum to the dense FFN, whatever chose the experts. The hash
    # router gets its token ids from the model's input_ids through the same hook as the attention mask.
    model = tiny_hf.make_model("llama")
    ids = tiny_hf.input_ids(2, 7)
    dense_out = tiny_hf.logits(model, ids)
    moefy(model, NUM_EXPERTS, top_k=2, upcycle=True, router=router)
    assert all(layer.router_name == router for layer in moe_layers(model))
    assert_close(tiny_hf.logits(model, ids), dense_out, rtol=1e-12, atol=1e-12)
    assert_close(model(ids).logits, dense_out, rtol=1e-12, atol=1e-12)  # input_ids given positionally


def test_hash_router_routes_by_input_ids():
    model = moefy(tiny_hf.make_model("llama"), NUM_EXPERTS, top_k=1, router="hash")
    ids = torch.tensor([[3, 3, 5, 3], [5, 7, 7, 3]])
    tiny_hf.logits(model, ids)
    counts = moe_layers(model)[0].stats.tokens_per_expert
    assert int(counts.sum()) == 8 and int((counts > 0).sum()) <= 3  # three distinct ids, one expert each
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # decoding: the last input id only


@pytest.mark.parametrize(
    "family, expert, activation, bias",
    [("llama", "swiglu", None, False), ("qwen2", "swiglu", None, False), ("gpt2", "mlp", "gelu_tanh", True),
     ("bert", "mlp", "gelu", True)],
)
def test_expert_layout_follows_the_dense_ffn(family, expert, activation, bias):
    model = tiny_hf.make_model(family)
    moefy(model, NUM_EXPERTS, top_k=2)
    ffns = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(ffns) == tiny_hf.num_layers(model)
    for ffn in ffns:
        experts = ffn.moe.experts
        assert experts.expert == expert
        if activation is not None:
            assert experts.activation == activation
        assert (experts.b1 is not None) == bias
        assert experts.w1.shape == (NUM_EXPERTS, tiny_hf.HIDDEN, tiny_hf.INTERMEDIATE)
        assert ffn.moe.capacity_factor == 1.25  # the MoE default when not upcycling


def test_upcycled_experts_are_copies_of_the_dense_weights():
    model = tiny_hf.make_model("llama")
    mlp = model.model.layers[0].mlp
    gate, up, down = mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone(), mlp.down_proj.weight.clone()
    moefy(model, NUM_EXPERTS, top_k=2, upcycle=True)
    experts = model.model.layers[0].mlp.moe.experts
    for e in range(NUM_EXPERTS):
        assert torch.equal(experts.w1[e], gate.t())
        assert torch.equal(experts.w3[e], up.t())
        assert torch.equal(experts.w2[e], down.t())
    router = model.model.layers[0].mlp.moe.router.weight
    assert 0.3 * UPCYCLE_ROUTER_STD < router.std().item() < 3 * UPCYCLE_ROUTER_STD


def test_gpt2_conv1d_weights_are_not_transposed():
    model = tiny_hf.make_model("gpt2")
    mlp = model.transformer.h[1].mlp
    c_fc_w, c_fc_b, c_proj_w = mlp.c_fc.weight.clone(), mlp.c_fc.bias.clone(), mlp.c_proj.weight.clone()
    moefy(model, NUM_EXPERTS, upcycle=True)
    experts = model.transformer.h[1].mlp.moe.experts
    assert torch.equal(experts.w1[2], c_fc_w) and torch.equal(experts.b1[2], c_fc_b)
    assert torch.equal(experts.w2[3], c_proj_w)


def test_bert_keeps_output_dropout_residual_and_layernorm():
    model = tiny_hf.make_model("bert", hidden_dropout_prob=0.25)
    layer_norm_weight = model.bert.encoder.layer[0].output.LayerNorm.weight
    moefy(model, NUM_EXPERTS, upcycle=True)
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate, MoEFeedForward)
    assert isinstance(layer.output.dense, nn.Identity)
    assert layer.output.LayerNorm.weight is layer_norm_weight
    assert layer.output.dropout.p == 0.25
    keys = model.state_dict().keys()
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in keys
    assert "bert.encoder.layer.0.intermediate.moe.experts.w1" in keys
    assert not any(k.startswith("bert.encoder.layer.0.output.dense") for k in keys)
    # Dropout on the FFN output is still active in training mode.
    model.train()
    ids = tiny_hf.input_ids(2, 8)
    out_a, out_b = tiny_hf.logits(model, ids), tiny_hf.logits(model, ids)
    assert not torch.equal(out_a, out_b)


def test_upcycle_noise_makes_experts_differ_slightly():
    model = tiny_hf.make_model("llama")
    ids = tiny_hf.input_ids(2, 6)
    dense_out = tiny_hf.logits(model, ids)
    moefy(model, NUM_EXPERTS, upcycle=True, upcycle_noise=0.01)
    w1 = model.model.layers[0].mlp.moe.experts.w1
    assert not torch.equal(w1[0], w1[1])
    out = tiny_hf.logits(model, ids)
    assert not torch.equal(out, dense_out)
    assert_close(out, dense_out, rtol=0, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keeps_dtype_and_device(dtype):
    model = tiny_hf.make_model("gpt2", dtype=dtype)
    moefy(model, NUM_EXPERTS, upcycle=True)
    for name, p in model.named_parameters():
        assert p.dtype == dtype and p.device.type == "cpu", name
    out = tiny_hf.logits(model, tiny_hf.input_ids(2, 5))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_moe_kwargs_are_passed_on():
    model = tiny_hf.make_model("llama")
    moefy(model, 8, top_k=1, capacity_factor=2.0, drop_policy="probability", aux_loss_coef=0.5)
    for layer in moe_layers(model):
        assert (layer.num_experts, layer.top_k, layer.capacity_factor, layer.drop_policy, layer.aux_loss_coef) == (
            8, 1, 2.0, "probability", 0.5)


def test_overrides_without_upcycling():
    model = tiny_hf.make_model("gpt2")
    moefy(model, NUM_EXPERTS, d_ff=8, expert="swiglu", bias=False)
    experts = moe_layers(model)[0].experts
    assert experts.expert == "swiglu" and experts.w1.shape == (NUM_EXPERTS, tiny_hf.HIDDEN, 8) and experts.b1 is None


# --------------------------------------------------------------------------------------------------
# select and plain PyTorch models


@pytest.mark.parametrize("select", ["*.ffn", re.compile(r"blocks\.\d+\.ffn"), lambda name, m: name.endswith("ffn")],
                         ids=["glob", "regex", "predicate"])
def test_select_plain_sequential(select):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.blocks = nn.ModuleList([PlainBlock(act=nn.ReLU()), PlainBlock(act=nn.ReLU())])
    model = model.double()

    def run(m, x):
        for block in m.blocks:
            x = block(x)
        return x

    x = torch.randn(3, 5, 8, dtype=torch.float64)
    dense_out = run(model, x)
    moefy(model, NUM_EXPERTS, top_k=2, upcycle=True, select=select)
    assert all(isinstance(b.ffn, MoEFeedForward) for b in model.blocks)
    assert moe_layers(model)[0].experts.activation == "relu"
    assert_close(run(model, x), dense_out, rtol=1e-12, atol=1e-12)


def test_select_restricts_conversion():
    model = tiny_hf.make_model("llama", layers=3)
    moefy(model, NUM_EXPERTS, select="model.layers.1.mlp")
    converted = [isinstance(layer.mlp, MoEFeedForward) for layer in model.model.layers]
    assert converted == [False, True, False]


@pytest.mark.parametrize("act, name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                       (nn.SiLU(), "silu")])
def test_sequential_activation_recognised(act, name):
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 12), act, nn.Linear(12, 6), nn.Dropout(0.0))).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    dense_out = model(x)
    moefy(model, 3, top_k=2, upcycle=True, select="0")
    ffn = model[0]
    assert isinstance(ffn, MoEFeedForward) and isinstance(ffn.dropout, nn.Dropout)
    assert ffn.moe.experts.activation == name
    assert_close(model(x), dense_out, rtol=1e-12, atol=1e-12)


def test_sequential_without_bias():
    model = nn.Sequential(dense_ffn(bias=False)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    dense_out = model(x)
    moefy(model, 2, top_k=2, upcycle=True, select="0")
    assert model[0].moe.experts.b1 is None
    assert_close(model(x), dense_out, rtol=1e-12, atol=1e-12)


def test_padding_mask_context_for_plain_models():
    torch.manual_seed(0)
    model = nn.Sequential(dense_ffn()).double()
    moefy(model, NUM_EXPERTS, top_k=2, select="0")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with padding_mask(model, mask):
        y = model(x)
        assert int(model[0].moe.stats.tokens_per_expert.sum()) == 7 * 2
    assert model[0].padding_mask is None
    assert torch.equal(y[mask == 0], torch.zeros_like(y[mask == 0]))
    model(x)
    assert int(model[0].moe.stats.tokens_per_expert.sum()) == 10 * 2


# --------------------------------------------------------------------------------------------------
# errors


def test_no_ffn_found_names_what_it_looked_for():
    with pytest.raises(ValueError, match=r"found no FFN.*gate_proj.*Conv1D.*intermediate"):
        moefy(nn.Sequential(nn.Linear(4, 4)), NUM_EXPERTS)
    # A Sequential FFN is only converted when selected.
    with pytest.raises(ValueError, match="Pass select="):
        moefy(nn.Sequential(dense_ffn()), NUM_EXPERTS)
    with pytest.raises(ValueError, match=r"select matched \['0'\], none of them an FFN"):
        moefy(nn.Sequential(nn.Linear(4, 4)), NUM_EXPERTS, select="0")
    with pytest.raises(ValueError, match="select matched no module"):
        moefy(nn.Sequential(dense_ffn()), NUM_EXPERTS, select="nothing")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((NUM_EXPERTS, 5), {}, "top_k must be <= num_experts=4, got 5"),
        ((0,), {}, "num_experts must be a positive int, got 0"),
        ((NUM_EXPERTS, 0), {}, "top_k must be a positive int, got 0"),
        ((NUM_EXPERTS,), {"select": 3}, "select must be a name pattern"),
        ((NUM_EXPERTS,), {"dtype": torch.float32}, "dtype is taken from the dense FFN"),
        ((NUM_EXPERTS,), {"upcycle_noise": 0.1}, "upcycle_noise is only used with upcycle=True"),
        ((NUM_EXPERTS,), {"upcycle_noise": -1.0, "upcycle": True}, "upcycle_noise must be a float >= 0"),
        ((NUM_EXPERTS,), {"upcycle": True, "d_ff": 8}, "whose d_ff is 32; d_ff=8 cannot hold it"),
        ((NUM_EXPERTS,), {"upcycle": True, "num_shared_experts": 1}, "does not support num_shared_experts=1"),
        ((NUM_EXPERTS,), {"capacity_factor": -1.0}, "capacity_factor must be > 0"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    model = tiny_hf.make_model("llama")
    with pytest.raises(ValueError, match=re.escape(match) if "(" not in match else match):
        moefy(model, *args, **kwargs)


def test_unsupported_activation():
    model = nn.Sequential(dense_ffn(act=nn.Tanh()))
    with pytest.raises(ValueError, match="activation Tanh.*not one the MoE experts have"):
        moefy(model, NUM_EXPERTS, select="0")

    class Broken(nn.Module):
        def forward(self, h):
            raise RuntimeError("no")

    with pytest.raises(ValueError, match="could not evaluate the FFN's activation Broken"):
        moefy(nn.Sequential(dense_ffn(act=Broken())), NUM_EXPERTS, select="0")
    gated = tiny_hf.make_model("llama", hidden_act="relu")
    with pytest.raises(ValueError, match=r"expected silu \(SwiGLU\) or exact gelu \(GeGLU\)"):
        moefy(gated, NUM_EXPERTS)


def test_up_proj_bias_becomes_the_experts_up_bias():
    model = tiny_hf.make_model("llama", mlp_bias=True)
    ids = tiny_hf.input_ids(2, 6)
    with torch.no_grad():
        dense = tiny_hf.logits(model, ids)
    moefy(model, NUM_EXPERTS, upcycle=True)
    assert all(layer.experts.b3 is not None for layer in moe_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(model, ids), dense, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# training, aux losses, checkpoints


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_training_lowers_the_loss_and_counts_every_aux_loss(family):
    model = tiny_hf.make_model(family, dtype=torch.float32)
    moefy(model, NUM_EXPERTS, top_k=2, capacity_factor=1.5, min_capacity=2)
    model.train()
    ids = tiny_hf.input_ids(4, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        task = tiny_hf.lm_loss(model, ids)
        aux = torch_moe.aux_loss(model)
        layers = moe_layers(model)
        assert len(layers) == tiny_hf.num_layers(model)
        assert_close(aux, sum(layer.aux_loss for layer in layers))
        loss = task + aux
        optimizer.zero_grad()
        loss.backward()
        for layer in layers:  # every router gets the aux loss's gradient
            assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(task.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_aux_loss_gradient_reaches_every_layer():
    model = tiny_hf.make_model("llama", dtype=torch.float32, layers=3)
    moefy(model, NUM_EXPERTS)
    tiny_hf.logits(model, tiny_hf.input_ids(2, 6))
    torch_moe.aux_loss(model).backward()
    grads = [layer.router.weight.grad for layer in moe_layers(model)]
    assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_state_dict_round_trip(family, tmp_path):
    source = moefy(tiny_hf.make_model(family, seed=0), NUM_EXPERTS, upcycle=True, upcycle_noise=0.05)
    path = tmp_path / "moe.pt"
    torch.save(source.state_dict(), path)
    # The same layer configuration (upcycling defaults to dropless with normalised weights), other weights.
    target = moefy(tiny_hf.make_model(family, seed=1), NUM_EXPERTS, capacity_factor=None, normalize_weights=True)
    ids = tiny_hf.input_ids(2, 7)
    assert not torch.equal(tiny_hf.logits(target, ids), tiny_hf.logits(source, ids))
    result = target.load_state_dict(torch.load(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(tiny_hf.logits(target, ids), tiny_hf.logits(source, ids))


# --------------------------------------------------------------------------------------------------
# torch.compile and autocast


def test_compile_fullgraph_whole_llama_capacity_mode():
    # The whole moefied model, the attention-mask hook included, in one graph. aot_eager traces forward and
    # backward through the ops' fake kernels without inductor's compile time (test_layer covers inductor).
    torch._dynamo.reset()
    model = tiny_hf.make_model("llama", dtype=torch.float32)
    moefy(model, NUM_EXPERTS, top_k=2, capacity_factor=1.0, min_capacity=2)
    model.train()
    ids = tiny_hf.input_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def run(forward):
        model.zero_grad()
        out = forward(input_ids=ids, attention_mask=mask).logits
        loss = out.pow(2).mean() + torch_moe.aux_loss(model)
        loss.backward()
        stats = [layer.stats.tokens_per_expert.clone() for layer in moe_layers(model)]
        return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, stats

    out, loss, grads, stats = run(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c, loss_c, grads_c, stats_c = run(compiled)
    assert_close(out_c, out)
    assert_close(loss_c, loss)
    for name in grads:
        assert_close(grads_c[name], grads[name], msg=lambda m, name=name: f"grad of {name}: {m}")
    for a, b in zip(stats_c, stats):
        assert torch.equal(a, b)
    assert int(stats[0].sum()) == 13 * 2  # the padding reached the compiled MoE layers


def test_bf16_autocast_on_cpu():
    model = tiny_hf.make_model("llama", dtype=torch.float32)
    moefy(model, NUM_EXPERTS, top_k=2, upcycle=True, upcycle_noise=0.01)
    ids = tiny_hf.input_ids(2, 8)
    reference = tiny_hf.logits(model, ids)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_hf.logits(model, ids)
        loss = tiny_hf.lm_loss(model, ids) + torch_moe.aux_loss(model)
    loss.backward()
    assert torch.isfinite(out.float()).all()
    assert_close(out.float(), reference, rtol=0.1, atol=0.1)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert all(layer.router.weight.grad is not None for layer in moe_layers(model))

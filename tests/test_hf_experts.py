"""The "torch_moe" transformers experts implementation against HF's own eager experts, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")
hf_experts = pytest.importorskip("torch_moe.integrations.hf_experts")

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, use_experts_implementation  # noqa: E402

VOCAB, HIDDEN = 64, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.2, output_router_logits=True, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each family: its config class and the fields that make it tiny (E experts, top-k, expert width) and exercise the
# routing (normalised top-k, group-limited routing, GPT-OSS's clamp reached by the random weights).
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                         num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                                         num_experts_per_tok=3, norm_topk_prob=True, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=8, num_experts_per_tok=4)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                                             first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                                             num_key_value_heads=4)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                                    router_jitter_noise=0.0)),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, head_dim=8,
                                     swiglu_limit=0.5, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
}
AVAILABLE = [name for name, (config_cls, _) in FAMILIES.items() if hasattr(transformers, config_cls)]


def make_config(family: str):
    config_cls, fields = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **fields})
    config._attn_implementation = "eager"
    return config


def make_pair(family: str, seed: int = 0):
    """(eager model, torch_moe model) with the same weights, float32, eval mode (no dropout, no router jitter)."""
    config = make_config(family)
    torch.manual_seed(seed)
    eager = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").float().eval()
    fast = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), experts_implementation="torch_moe")
    fast = fast.float().eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "_is_expert_parallel")]


class CountCalls:
    """Counts calls of the registered "torch_moe" forward (proves the dispatch reaches it)."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self.saved = ExpertsInterface._global_mapping["torch_moe"]

        def counted(*args, **kwargs):
            self.calls += 1
            return self.saved(*args, **kwargs)

        ExpertsInterface._global_mapping["torch_moe"] = counted
        return self

    def __exit__(self, *exc):
        ExpertsInterface._global_mapping["torch_moe"] = self.saved


def test_registered():
    assert "torch_moe" in ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["torch_moe"] is hf_experts.torch_moe_experts_forward


@pytest.mark.parametrize("family", AVAILABLE)
def test_logits_and_router_outputs_match_eager(family):
    eager, fast = make_pair(family)
    assert fast.config._experts_implementation == "torch_moe"
    assert experts_modules(fast), "the family's experts class does not use the experts interface"
    ids = input_ids()
    with torch.no_grad():
        ref = eager(input_ids=ids, labels=ids, output_router_logits=True)
        with CountCalls() as counter:
            out = fast(input_ids=ids, labels=ids, output_router_logits=True)
    assert counter.calls == len(experts_modules(fast))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    for mine, theirs in zip(out.router_logits or (), ref.router_logits or ()):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", AVAILABLE)
def test_gradients_match_eager(family):
    eager, fast = make_pair(family)
    ids = input_ids(seed=2)
    for model in (eager, fast):
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        loss = out.loss  # includes router_aux_loss_coef * aux_loss where the family adds it
        loss.backward()
    grads = {name: p.grad for name, p in fast.named_parameters()}
    expert_params = [n for n, p in fast.named_parameters() if ".experts." in n and "shared" not in n]
    assert expert_params
    for name, p in eager.named_parameters():
        if p.grad is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for name in expert_params:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("family", AVAILABLE)
def test_greedy_generate_matches_eager(family):
    eager, fast = make_pair(family)
    ids = input_ids(batch=1, seq=5, seed=3)
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        ref = eager.generate(ids, **kwargs)
        out = fast.generate(ids, **kwargs)
    assert torch.equal(out, ref)


def test_set_experts_implementation_switches():
    family = AVAILABLE[0]
    eager, fast = make_pair(family)
    ids = input_ids(seed=4)
    with torch.no_grad():
        ref = eager(input_ids=ids).logits
        eager.set_experts_implementation("torch_moe")
        assert eager.config._experts_implementation == "torch_moe"
        with CountCalls() as counter:
            switched = eager(input_ids=ids).logits
        assert counter.calls > 0
        torch.testing.assert_close(switched, ref, atol=1e-5, rtol=1e-5)
        fast.set_experts_implementation("eager")
        with CountCalls() as counter:
            back = fast(input_ids=ids).logits
        assert counter.calls == 0
        torch.testing.assert_close(back, ref, atol=1e-5, rtol=1e-5)


def test_from_pretrained(tmp_path):
    eager, _ = make_pair("olmoe" if "olmoe" in AVAILABLE else AVAILABLE[0])
    eager.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="torch_moe",
                                                               attn_implementation="eager").float().eval()
    assert loaded.config._experts_implementation == "torch_moe"
    ids = input_ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# Artificial experts classes for the layouts and failures no tiny family above covers.

class _Config:
    _experts_implementation = "torch_moe"


def _experts_class(**flags):
    @use_experts_implementation(**flags)
    class ToyExperts(nn.Module):
        def __init__(self, config, weights):
            super().__init__()
            self.num_experts = weights["down_proj"].shape[0]
            self.act_fn = nn.GELU(approximate="tanh")
            for name, value in weights.items():
                setattr(self, name, nn.Parameter(value))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not used here")

    return ToyExperts


def _reference(x, ids, weights, w_first, w_down, first_bias, down_bias, gate, transposed):
    """Plain loops in float64: y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            a = w_first[e] if transposed else w_first[e].T
            h = x[t] @ a + (first_bias[e] if first_bias is not None else 0)
            h = gate(h)
            b = w_down[e] if transposed else w_down[e].T
            y[t] += weights[t, j] * (h @ b + (down_bias[e] if down_bias is not None else 0))
    return y


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("has_gate", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_toy_layouts_forward_and_backward(transposed, has_gate, has_bias):
    torch.manual_seed(0)
    E, d, f, T, k = 5, 6, 4, 9, 2
    first_out = 2 * f if has_gate else f
    first_name = "gate_up_proj" if has_gate else "up_proj"
    weights = {first_name: torch.randn(E, d, first_out) if transposed else torch.randn(E, first_out, d),
               "down_proj": torch.randn(E, f, d) if transposed else torch.randn(E, d, f)}
    if has_bias:
        weights[first_name + "_bias"] = torch.randn(E, first_out)
        weights["down_proj_bias"] = torch.randn(E, d)
    module = _experts_class(is_transposed=transposed, has_gate=has_gate, has_bias=has_bias)(_Config(), weights).double()
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    act = lambda h: torch.nn.functional.gelu(h, approximate="tanh")  # noqa: E731
    gate = (lambda h: act(h[:f]) * h[f:]) if has_gate else act

    params = dict(module.named_parameters())
    ref = _reference(x, ids, w, params[first_name], params["down_proj"], params.get(first_name + "_bias"),
                     params.get("down_proj_bias"), gate, transposed)
    out = module(x, ids, w)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(ref)
    inputs = [x, w, *params.values()]
    expected = torch.autograd.grad(ref, inputs, grad_out)
    actual = torch.autograd.grad(out, inputs, grad_out)
    for name, a, b in zip(["x", "weights", *params], actual, expected):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(module(x, ids, w), ref.detach())


def test_weights_used_in_place_and_never_stale():
    """No cached copy: an in-place update of HF's parameter shows in the next call."""
    torch.manual_seed(0)
    E, d, f = 4, 6, 5
    module = _experts_class()(_Config(), {"gate_up_proj": torch.randn(E, 2 * f, d), "down_proj": torch.randn(E, d, f)})
    module.act_fn = nn.SiLU()
    x, ids, w = torch.randn(7, d), torch.randint(0, E, (7, 1)), torch.rand(7, 1)
    with torch.no_grad():
        before = module(x, ids, w)
        module.down_proj.mul_(2.0)
        after = module(x, ids, w)
    torch.testing.assert_close(after, 2.0 * before)


def test_unsupported_layout_errors():
    E, d, f = 4, 6, 5
    x, ids, w = torch.randn(3, d), torch.randint(0, E, (3, 2)), torch.rand(3, 2)
    # Declared non-transposed, stored transposed: a shape that fits neither reading of the flags.
    bad = _experts_class()(_Config(), {"gate_up_proj": torch.randn(E, d, 2 * f), "down_proj": torch.randn(E, d, f)})
    with pytest.raises(ValueError, match=r"ToyExperts\.gate_up_proj.*declared layout"):
        bad(x, ids, w)
    # A bias the flags promise but the module lacks.
    no_bias = _experts_class(has_bias=True)(_Config(), {"gate_up_proj": torch.randn(E, 2 * f, d),
                                                         "down_proj": torch.randn(E, d, f)})
    with pytest.raises(ValueError, match=r"ToyExperts declares has_bias=True"):
        no_bias(x, ids, w)
    # Quantized (integer) weights.
    quant = _experts_class()(_Config(), {"gate_up_proj": torch.randn(E, 2 * f, d), "down_proj": torch.randn(E, d, f)})
    quant.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * f, d, dtype=torch.int8), requires_grad=False)
    with pytest.raises(NotImplementedError, match=r"ToyExperts\.gate_up_proj.*quantized"):
        quant(x, ids, w)
    # Expert parallelism (sentinel ids).
    ep = _experts_class()(_Config(), {"gate_up_proj": torch.randn(E, 2 * f, d), "down_proj": torch.randn(E, d, f)})
    ep._is_expert_parallel = True
    with pytest.raises(NotImplementedError, match=r"ToyExperts is expert-parallel"):
        ep(x, ids, w)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_default_gate_activations(activation):
    """HF's default gate act_fn(gate) * up: silu and exact gelu run on torch_moe's glu ops (fused in inference),
    other activations through the class's own _apply_gate; all match a float64 loop, with and without grad."""
    from transformers.activations import ACT2FN

    torch.manual_seed(1)
    E, d, f, T, k = 4, 6, 5, 8, 2
    module = _experts_class()(_Config(), {"gate_up_proj": torch.randn(E, 2 * f, d), "down_proj": torch.randn(E, d, f)})
    module.act_fn = ACT2FN[{"gelu_tanh": "gelu_pytorch_tanh"}.get(activation, activation)]
    module = module.double()
    assert (hf_experts._glu_activation(module) is None) == (activation == "gelu_tanh")
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    ids, w = torch.stack([torch.randperm(E)[:k] for _ in range(T)]), torch.rand(T, k, dtype=torch.float64)
    ref = _reference(x, ids, w, module.gate_up_proj, module.down_proj, None, None,
                     lambda h: module.act_fn(h[:f]) * h[f:], transposed=False)
    torch.testing.assert_close(module(x, ids, w), ref)
    with torch.no_grad():
        torch.testing.assert_close(module(x, ids, w), ref.detach())
    grad_out = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, [x, module.gate_up_proj, module.down_proj], grad_out)
    actual = torch.autograd.grad(module(x, ids, w), [x, module.gate_up_proj, module.down_proj], grad_out)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b)


def test_post_expert_norm():
    """has_post_expert_norm: the norm runs on each expert's output before the routing weight, as HF's forwards do."""
    torch.manual_seed(2)
    E, d, f, T, k = 4, 6, 5, 8, 2
    module = _experts_class(has_post_expert_norm=True)(
        _Config(), {"gate_up_proj": torch.randn(E, 2 * f, d), "down_proj": torch.randn(E, d, f)})
    module.post_expert_norm = nn.LayerNorm(d)
    with torch.no_grad():
        module.post_expert_norm.weight.uniform_(0.5, 1.5)
        module.post_expert_norm.bias.normal_()
    module = module.double()
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    ids, w = torch.stack([torch.randperm(E)[:k] for _ in range(T)]), torch.rand(T, k, dtype=torch.float64)
    ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            gate, up = (x[t] @ module.gate_up_proj[e].T).chunk(2)
            out = (module.act_fn(gate) * up) @ module.down_proj[e].T
            ref[t] += w[t, j] * module.post_expert_norm(out)
    torch.testing.assert_close(module(x, ids, w), ref)
    inputs = [x, *module.parameters()]
    grad_out = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(module(x, ids, w), inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(a, b)

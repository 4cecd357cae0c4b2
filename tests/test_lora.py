"""Mixture of LoRA experts (torch_moe.lora): MoLoRALinear against a float64 loop reference, molorafy on tiny Hugging
Face models (exactness at init, frozen base, padding, save and reload), gradcheck and bad input."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import tiny_hf
import torch_moe
from torch_moe.lora import MoLoRALinear, lora_parameters, molorafy

transformers = pytest.importorskip("transformers")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _layer(d_in=6, d_out=5, num_experts=4, top_k=2, rank=3, alpha=6.0, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    layer = MoLoRALinear(base, num_experts, top_k, rank, alpha, **kwargs)
    with torch.no_grad():  # B starts at zero; a random B makes every term of the output and its gradients count
        layer.lora_B.normal_()
    return layer


def _reference(layer: MoLoRALinear, x, A, B, router_weight, valid=None):
    """Plain float64 PyTorch, one token and one chosen expert at a time: (y [T, d_out], load-balancing, z-loss)."""
    W, b = layer.base.weight, layer.base.bias
    T, E, k = x.shape[0], layer.num_experts, layer.top_k
    logits = x @ router_weight.t()
    probs = torch.softmax(logits, dim=1)
    rows, counts = [], torch.zeros(E, dtype=torch.float64)
    valid = torch.ones(T, dtype=torch.bool) if valid is None else valid
    for t in range(T):
        y_t = x[t] @ W.t() + (b if b is not None else 0)
        if valid[t]:
            ids = sorted(range(E), key=lambda e: (-probs[t, e].item(), e))[:k]
            chosen = torch.stack([probs[t, e] for e in ids])
            weights = chosen / chosen.sum() if layer.normalize_weights else chosen
            for w, e in zip(weights, ids):
                y_t = y_t + w * layer.scaling * ((x[t] @ A[e]) @ B[e])
                counts[e] += 1
        rows.append(y_t)
    n_valid = int(valid.sum())
    fractions = counts / (n_valid * k)
    mean_probs = probs[valid].mean(0)
    load_balancing = E * (fractions * mean_probs).sum()
    z_loss = (torch.logsumexp(logits[valid], dim=1) ** 2).mean()
    return torch.stack(rows), load_balancing, z_loss


@pytest.mark.parametrize("top_k,normalize_weights,bias,masked", [
    (2, None, True, False), (1, False, False, False), (3, True, True, True), (2, None, False, True)])
def test_matches_the_loop_reference_in_values_and_gradients(top_k, normalize_weights, bias, masked):
    layer = _layer(top_k=top_k, bias=bias, normalize_weights=normalize_weights)
    T = 9
    x = torch.randn(T, layer.in_features, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, True, False, True, True, True, False, True, True]) if masked else None
    y = layer(x, padding_mask=valid)
    grad_out = torch.randn_like(y)
    loss = (y * grad_out).sum() + layer.aux_loss
    params = (x, layer.lora_A, layer.lora_B, layer.router.weight)
    grads = torch.autograd.grad(loss, params)

    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    y_ref, lb_ref, z_ref = _reference(layer, *leaves, valid=valid)
    loss_ref = (y_ref * grad_out).sum() + layer.aux_loss_coef * lb_ref + layer.z_loss_coef * z_ref
    grads_ref = torch.autograd.grad(loss_ref, leaves)

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.stats.load_balancing_loss, lb_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.stats.z_loss, z_ref.detach(), rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", "lora_A", "lora_B", "router.weight"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")
    n_valid = T if valid is None else int(valid.sum())
    assert int(layer.stats.tokens_per_expert.sum()) == n_valid * top_k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_devices_against_the_reference(device, dtype):
    layer = _layer(d_in=16, d_out=12, num_experts=6, top_k=2, rank=4)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(3)) > 0.2
    fast = MoLoRALinear(nn.Linear(16, 12, device=device, dtype=dtype), 6, 2, 4, layer.alpha)
    fast.load_state_dict({k: v.to(device, dtype) for k, v in layer.state_dict().items()})
    y = fast(x.to(device, dtype), padding_mask=mask.to(device))
    assert y.dtype == dtype and y.device.type == device
    # The reference on the rounded inputs and weights, so only the arithmetic's rounding differs.
    rounded = MoLoRALinear(nn.Linear(16, 12, dtype=torch.float64), 6, 2, 4, layer.alpha)
    rounded.load_state_dict({k: v.to(dtype).double() for k, v in layer.state_dict().items()})
    params = [p.detach().to(dtype).double() for p in (rounded.lora_A, rounded.lora_B, rounded.router.weight)]
    want, _, _ = _reference(rounded, x.to(dtype).double().reshape(-1, 16), *params, valid=mask.reshape(-1))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double().cpu().reshape(-1, 12), want, rtol=tol, atol=tol)


def test_padding_rows_get_the_base_output_and_reach_no_gradient():
    layer = _layer()
    x = torch.randn(2, 4, layer.in_features, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    x[~mask] = float("nan")
    x.requires_grad_(True)
    y = layer(x, padding_mask=mask)
    assert int(layer.stats.tokens_per_expert.sum()) == int(mask.sum()) * layer.top_k
    assert torch.isnan(y[~mask]).all()  # base(NaN), as the dense layer gives; the experts add nothing there
    alone = layer(x.detach()[mask])  # the valid tokens by themselves route and compute the same
    torch.testing.assert_close(y[mask], alone, rtol=0, atol=0)
    y[mask].sum().backward()
    for p in (x, layer.lora_A, layer.lora_B, layer.router.weight):
        assert torch.isfinite(p.grad[mask] if p is x else p.grad).all()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))


def test_gradcheck_float64():
    layer = _layer(d_in=4, d_out=3, num_experts=3, top_k=2, rank=2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    R = layer.router.weight.detach().clone().requires_grad_(True)

    def run(x, A, B, R):
        # The routing choice is piecewise constant: the check perturbs by 1e-6, far from any tie of these draws.
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B, "router.weight": R}, (x,))

    assert torch.autograd.gradcheck(run, (x, A, B, R), eps=1e-6, atol=1e-8)


def test_the_experts_run_as_one_grouped_gemm_pair(monkeypatch):
    """Two grouped-GEMM ops per forward whatever E is (no Python loop over the experts)."""
    calls = []
    for name in ("gather_grouped_mm", "grouped_mm_unpermute"):
        original = getattr(torch_moe.ops, name)
        monkeypatch.setattr(torch_moe.ops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    layer = _layer(num_experts=16, top_k=4)
    layer(torch.randn(11, layer.in_features, dtype=torch.float64))
    assert calls == ["gather_grouped_mm", "grouped_mm_unpermute"]


def test_empty_input():
    layer = _layer()
    y = layer(torch.zeros(0, layer.in_features, dtype=torch.float64, requires_grad=True))
    assert y.shape == (0, layer.out_features)
    y.sum().backward()
    assert float(layer.aux_loss.detach()) == 0.0


@pytest.mark.parametrize("router", ["sigmoid", "noisy_topk", "random"])
def test_other_token_choice_routers(router):
    layer = _layer(router=router).train()
    x = torch.randn(2, 7, layer.in_features, dtype=torch.float64)
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.lora_A.grad).all()
    assert int(layer.stats.tokens_per_expert.sum()) == 14 * layer.top_k
    if router == "random":
        assert not layer.router.weight.requires_grad
    else:
        assert layer.router.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# molorafy on Hugging Face models


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fresh_molora_model_is_the_dense_model_bitwise(family):
    model = tiny_hf.make_model(family, dtype=torch.float32)
    ids = tiny_hf.input_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = tiny_hf.logits(model, ids, mask)
    molorafy(model, 4, 2, rank=4, alpha=8)
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    assert len(layers) == (3 if family == "llama" else 2) * tiny_hf.num_layers(model)
    with torch.no_grad():
        converted = tiny_hf.logits(model, ids, mask)
    assert torch.equal(converted, dense)
    # The base weights are the very tensors they were, under the wrapper's "base." prefix.
    after = model.state_dict()
    for key, value in before.items():
        wrapped = re.sub(r"\.(\w+)\.(weight|bias)$", r".\1.base.\2", key)
        assert torch.equal(after[key] if key in after else after[wrapped], value), key


def test_a_training_step_moves_only_routers_and_adapters():
    model = molorafy(tiny_hf.make_model("llama", dtype=torch.float32), 4, 2, rank=2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.(lora_A|lora_B|router\.weight)$", n) for n in trainable)
    assert len(trainable) == 3 * 3 * tiny_hf.num_layers(model)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny_hf.input_ids(2, 12)
    loss = tiny_hf.lm_loss(model, ids) + torch_moe.aux_loss(model)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name


def test_aux_loss_sums_the_molora_layers():
    model = molorafy(tiny_hf.make_model("llama", dtype=torch.float64), 4, 2, rank=2, aux_loss_coef=0.1,
                     z_loss_coef=0.01)
    ids = tiny_hf.input_ids(2, 6)
    tiny_hf.logits(model, ids)
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    expected = sum(0.1 * m.stats.load_balancing_loss + 0.01 * m.stats.z_loss for m in layers)
    torch.testing.assert_close(torch_moe.aux_loss(model), expected, rtol=1e-12, atol=0)
    assert torch_moe.aux_loss(model).requires_grad


def test_the_attention_mask_reaches_every_molora_layer():
    model = molorafy(tiny_hf.make_model("llama", dtype=torch.float64), 4, 2, rank=2, target="*.q_proj")
    ids = tiny_hf.input_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        padded = tiny_hf.logits(model, ids, mask)
        alone = tiny_hf.logits(model, ids[:1, :5])  # right padding: the real tokens of row 0 by themselves
    torch.testing.assert_close(padded[0, :5], alone[0], rtol=1e-12, atol=1e-12)
    tiny_hf.logits(model, ids, mask)
    for m in model.modules():
        if isinstance(m, MoLoRALinear):
            assert int(m.stats.tokens_per_expert.sum()) == int(mask.sum()) * 2


def test_hash_router_takes_the_input_ids():
    model = molorafy(tiny_hf.make_model("llama", dtype=torch.float64), 4, 1, rank=2, target="*.v_proj",
                     router="hash")
    ids = tiny_hf.input_ids(1, 6)
    tiny_hf.logits(model, ids)
    layer = model.model.layers[0].self_attn.v_proj
    table = layer.router.table[ids.reshape(-1)]
    assert torch.equal(layer.stats.tokens_per_expert, torch.bincount(table.reshape(-1), minlength=4))


def test_targets():
    model = tiny_hf.make_model("llama", dtype=torch.float32)
    molorafy(model, 2, 1, rank=1, target="model.layers.0.mlp")  # a dense FFN: its three linears
    molorafy(model, 2, 1, rank=1, target=re.compile(r".*\.layers\.1\.self_attn\.(q|k)_proj"))
    molorafy(model, 2, 1, rank=1, target=lambda name, m: name.endswith("o_proj"))
    names = [n for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]
    assert len(model.config.torch_moe["conversions"]) == 3
    with pytest.raises(ValueError, match="target matched no nn.Linear"):
        molorafy(model, 2, 1, rank=1, target="*.q_proj.base")  # inside a MoLoRA layer: left alone


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_save_and_reload(tmp_path, router):
    model = molorafy(tiny_hf.make_model("llama", dtype=torch.float32), 4, 2, rank=3, alpha=6,
                     target=lambda name, m: name.endswith(("q_proj", "down_proj")), router=router).train()
    ids = tiny_hf.input_ids(2, 9)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    (tiny_hf.lm_loss(model, ids) + torch_moe.aux_loss(model)).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = tiny_hf.logits(model, ids)
    model.save_pretrained(tmp_path)
    again = torch_moe.convert.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(again, ids), expected, rtol=0, atol=0)
    assert ({n for n, p in again.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})
    layer = again.model.layers[1].mlp.down_proj
    assert isinstance(layer, MoLoRALinear) and (layer.rank, layer.scaling, layer.router_name) == (3, 2.0, router)


# --------------------------------------------------------------------------------------------------
# bad input


def test_bad_arguments():
    base = nn.Linear(4, 3)
    cases = [
        (dict(base=nn.Conv1d(4, 3, 1)), "base must be an nn.Linear, got Conv1d"),
        (dict(num_experts=0), "num_experts must be a positive int, got 0"),
        (dict(rank=2.0), "rank must be a positive int, got 2.0"),
        (dict(top_k=5), r"top_k must be an int in \[1, num_experts=4\], got 5"),
        (dict(alpha=-1.0), "alpha must be a number > 0 and finite"),
        (dict(aux_loss_coef=float("nan")), "aux_loss_coef must be a number >= 0 and finite"),
        (dict(router="expert_choice"), "router must be a token-choice router, got router='expert_choice'"),
        (dict(router="nope"), "router must be one of"),
    ]
    for overrides, message in cases:
        args = {**dict(base=base, num_experts=4, top_k=2, rank=2, alpha=None), **overrides}
        with pytest.raises(ValueError, match=message):
            MoLoRALinear(args.pop("base"), args.pop("num_experts"), args.pop("top_k"), args.pop("rank"),
                         args.pop("alpha"), **args)


def test_bad_forward_input():
    layer = MoLoRALinear(nn.Linear(4, 3), 4, 2, 2)
    with pytest.raises(ValueError, match=r"last dim of x must be in_features=4, got x of shape \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor of shape \(2,\)"):
        layer(torch.randn(2, 4), padding_mask=torch.ones(2))
    hashed = MoLoRALinear(nn.Linear(4, 3), 4, 1, 2, router="hash")
    with pytest.raises(ValueError, match=r"router='hash'\): token_ids must be an integer tensor of shape \(2,\)"):
        hashed(torch.randn(2, 4))


def test_molorafy_errors():
    model = tiny_hf.make_model("llama", dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown argument capacity_factor=1.0"):
        molorafy(model, 4, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="target matched no nn.Linear"):
        molorafy(model, 4, 2, target="*.nothing")
    with pytest.raises(ValueError, match="top_k must be an int in"):
        molorafy(model, 4, 8)
    assert not any(isinstance(m, MoLoRALinear) for m in model.modules())  # nothing installed after a failure
    assert all(p.requires_grad for p in model.parameters())
    gpt2 = tiny_hf.make_model("gpt2", dtype=torch.float32)  # Conv1D MLPs, no nn.Linear to wrap
    with pytest.raises(ValueError, match="no nn.Linear of a dense FFN it recognises in GPT2LMHeadModel"):
        molorafy(gpt2, 4, 2)


def test_plain_pytorch_model_takes_the_mask_from_the_context_manager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6)).double()
    molorafy(model, 3, 1, rank=2, target="*")
    assert [type(m).__name__ for m in model] == ["MoLoRALinear", "GELU", "MoLoRALinear"]
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with torch_moe.convert.padding_mask(model, mask):
        model(x)
    assert [int(m.stats.tokens_per_expert.sum()) for m in (model[0], model[2])] == [7, 7]
    model(x)  # outside the block: no mask
    assert int(model[0].stats.tokens_per_expert.sum()) == 10

"""LoRA through PEFT on every torch_moe layer kind: the fused [E, ...] expert weights (``target_parameters``), the
router weight, the nn.Linear parts (``target_modules``); unmerged equals merged, training moves only LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import torch_moe  # noqa: E402

D, F, E = 8, 12, 4
EXPERT_WEIGHTS = ["ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"]


class Block(nn.Module):
    """A residual block around one MoE-like layer, with a head, so that a loss has something to reach."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn
        self.head = nn.Linear(D, D)

    def forward(self, x):
        return self.head(x + self.ffn(x))


LAYERS = {
    "capacity": lambda: torch_moe.MoE(D, F, E, 2, capacity_factor=1.0, min_capacity=1),
    "dropless": lambda: torch_moe.MoE(D, F, E, 2, capacity_factor=None),
    "dropless_bias_mlp": lambda: torch_moe.MoE(D, F, E, 2, capacity_factor=None, expert="mlp", bias=True),
    "expert_choice": lambda: torch_moe.MoE(D, F, E, 2, router="expert_choice", capacity_factor=1.0),
    "sigmoid": lambda: torch_moe.MoE(D, F, E, 2, router="sigmoid", capacity_factor=None),
    "shared": lambda: torch_moe.MoE(D, F, E, 2, capacity_factor=None, num_shared_experts=1, shared_expert_gate=True),
    "fine_grained": lambda: torch_moe.MoE(D, F, E, 1, capacity_factor=None, expert_granularity=2),
    "soft_moe": lambda: torch_moe.SoftMoE(D, F, E, slots_per_expert=2),
}


def _targets(kind: str) -> list[str]:
    weights = EXPERT_WEIGHTS[:2] if kind == "dropless_bias_mlp" else list(EXPERT_WEIGHTS)  # mlp: no w3
    if kind == "soft_moe":
        return weights  # its router is the parameter phi of the layer itself, not a module
    if kind == "shared":
        weights += ["ffn.shared_experts.w1", "ffn.shared_experts.w2"]
    return weights + ["ffn.router.weight"]


def _model(kind: str, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block(LAYERS[kind]()).double()


def _peft(model: nn.Module, **config) -> nn.Module:
    # init_lora_weights=False: B is random too, so the adapters change the outputs from the first step.
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **config))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean() + torch_moe.aux_loss(model)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 6, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _lora_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if "lora_" in name]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_lora_unmerged_equals_merged(kind):
    """The unmerged adapters (weights substituted during the call) and merge_and_unload (weights added in place)
    give the same outputs and loss; the merged layer is a plain torch_moe layer again, with changed weights."""
    base = _model(kind)
    original = copy.deepcopy(base)
    model = _peft(base, target_parameters=_targets(kind)).eval()
    x = _x()
    with torch.no_grad():
        y_unmerged, loss_unmerged = model(x), _loss(model, x)
        y_original = original.eval()(x)
    assert not torch.allclose(y_unmerged, y_original, atol=1e-6), "the adapters must change the output"
    merged = model.merge_and_unload()
    assert isinstance(merged.ffn.experts, torch_moe.Experts)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y_unmerged, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_loss(merged, x), loss_unmerged, rtol=1e-10, atol=1e-12)
    # Independent of PEFT's bookkeeping: each expert's update is of rank <= r (2), in every targeted weight.
    for name in ("w1", "w2") + (("w3",) if original.ffn.experts.gated else ()):
        delta = getattr(merged.ffn.experts, name).detach() - getattr(original.ffn.experts, name)
        assert delta.abs().amax() > 0
        assert int(torch.linalg.matrix_rank(delta).max()) <= 2


@pytest.mark.parametrize("kind", ["capacity", "dropless", "expert_choice", "sigmoid", "shared", "soft_moe"])
def test_lora_training_step_changes_only_lora(kind):
    model = _peft(_model(kind), target_parameters=_targets(kind)).train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    # Every expert weight and the router got one LoRA pair: A and B per target.
    assert len(lora) == 2 * len(_targets(kind))
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model, _x()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if "lora_" in name}
    assert all(g is not None and g.abs().amax() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                             if g is None or g.abs().amax() == 0]
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, lora[name]), name


def test_router_lora_changes_routing_and_merges():
    """LoRA on the router alone (its weight [E, d_model]) moves the logits, and merging gives the same layer."""
    base = _model("dropless")
    original = copy.deepcopy(base).eval()
    model = _peft(base, target_parameters=["ffn.router.weight"]).eval()
    x = _x()
    with torch.no_grad():
        logits = model.base_model.model.ffn.router(x.reshape(-1, D)).logits
        logits_original = original.ffn.router(x.reshape(-1, D)).logits
        y = model(x)
    assert not torch.allclose(logits, logits_original)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged.ffn.router(x.reshape(-1, D)).logits, logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(merged(x), y, rtol=1e-10, atol=1e-12)
    delta = merged.ffn.router.weight.detach() - original.ffn.router.weight
    assert int(torch.linalg.matrix_rank(delta)) <= 2


def test_target_modules_on_linear_parts():
    """target_modules reaches the nn.Linear parts of a layer (here the shared-expert gate) beside target_parameters."""
    base = _model("shared")
    model = _peft(base, target_modules=["shared_expert_gate"], target_parameters=["ffn.experts.w1"]).eval()
    assert isinstance(model.base_model.model.ffn.shared_expert_gate, peft.tuners.lora.Linear)
    x = _x()
    with torch.no_grad():
        y = model(x)
    merged = model.merge_and_unload()
    assert isinstance(merged.ffn.shared_expert_gate, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y, rtol=1e-10, atol=1e-12)


def test_router_is_not_a_target_module():
    """The router returns a Routing, not a tensor, so it is no nn.Linear for PEFT: target_modules refuses it and
    the recipe is target_parameters=["router.weight"] (README, "LoRA with PEFT")."""
    with pytest.raises(ValueError, match="not supported"):
        _peft(_model("dropless"), target_modules=["router"])


def test_lora_on_moefied_hf_model():
    pytest.importorskip("transformers")
    import tiny_hf

    model = tiny_hf.make_model("llama")
    torch_moe.moefy(model, E, 2, upcycle=True)
    ids = tiny_hf.input_ids(2, 7)
    names = ["experts.w1", "experts.w2", "experts.w3", "router.weight"]
    lora_model = _peft(model, target_parameters=names, target_modules=["q_proj", "v_proj"]).train()
    assert len(_lora_names(lora_model)) == 2 * (len(names) + 2) * tiny_hf.num_layers(model)
    loss = tiny_hf.lm_loss(lora_model, ids)
    loss.backward()
    assert all(p.grad is not None for name, p in lora_model.named_parameters() if "lora_" in name)
    lora_model.eval()
    with torch.no_grad():
        logits = tiny_hf.logits(lora_model, ids)
    merged = lora_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(tiny_hf.logits(merged, ids), logits, rtol=1e-9, atol=1e-10)

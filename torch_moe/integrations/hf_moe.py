"""from_hf_moe: replace the sparse MoE blocks of a Hugging Face MoE model by torch_moe layers with the same weights.

The converted model computes what the original did (dropless, the defaults), and every torch_moe option applies
to it: capacity and drop policies, every router for ablation, ``stats``, ``MoETracker``, expert parallelism.
Supported: Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE, OLMoE, Granite-MoE, DeepSeek-V3 (sigmoid
router with ``e_score_correction_bias``, group-limited routing, ``routed_scaling_factor``, shared experts; its
dense first layers stay dense), GPT-OSS (router bias, softmax over the chosen logits, interleaved gate/up with
biases, clamped SwiGLU: ``expert="swiglu_oss"``) and PhiMoE (``router="sparsemixer"``, its training-mode estimator
and input jitter included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..feedforward import MoEFeedForward, _install_attention_mask_hook, record_conversion
from ..layer import MoE
from ..routing import router_class

__all__ = ["from_hf_moe", "SUPPORTED_ROUTERS", "HFMoEFeedForward"]

# HF router class -> how its top-k weights are normalised: always, never, or per the router's norm_topk_prob.
# GPT-OSS: softmax over the k chosen logits, which is the renormalised top-k of the full softmax.
_SOFTMAX_ROUTERS = {"MixtralTopKRouter": True, "GraniteMoeTopKRouter": True, "Qwen2MoeTopKRouter": None,
                    "Qwen3MoeTopKRouter": None, "OlmoeTopKRouter": None, "GptOssTopKRouter": True}
_SIGMOID_ROUTERS = ("DeepseekV3TopkRouter",)
_SPARSEMIXER_ROUTERS = ("PhimoeTopKRouter",)
SUPPORTED_ROUTERS = tuple(_SOFTMAX_ROUTERS) + _SIGMOID_ROUTERS + _SPARSEMIXER_ROUTERS
# Router options derived from the HF block; dropped when the user picks another router (router_bias is kept where
# the new router takes it, normalize_weights unless the new router is sparsemixer, which never renormalises).
_ROUTER_SPECIFIC = ("bias_update_rate", "n_groups", "topk_groups", "routed_scaling_factor", "jitter_eps")


@dataclass
class _Block:
    """What a sparse MoE block of HF holds, read once."""

    router: nn.Module
    gate_up: Tensor  # [E, d, 2f] (torch_moe's [d_in, d_out] order; a transposed view of HF's usual layout)
    down: Tensor  # [E, f, d]
    expert: str
    shared: Optional[nn.Module]
    shared_gate: Optional[nn.Linear]
    interleaved: bool = False  # gate_up's last dim is [g0, u0, g1, u1, ...] (GPT-OSS), not [gate; up]
    gate_up_bias: Optional[Tensor] = None  # [E, 2f], in gate_up's order
    down_bias: Optional[Tensor] = None  # [E, d]
    input_jitter: float = 0.0  # PhiMoE's input_jitter_noise
    expert_options: dict = field(default_factory=dict)  # GPT-OSS's swiglu_alpha, swiglu_limit


def _router_of(block: nn.Module) -> Optional[nn.Module]:
    for name in ("gate", "router"):
        router = getattr(block, name, None)
        if isinstance(router, nn.Module):
            return router
    return None


def _is_moe_block(module: nn.Module) -> bool:
    router, experts = _router_of(module), getattr(module, "experts", None)
    return (router is not None and isinstance(experts, nn.Module)
            and type(router).__name__ in SUPPORTED_ROUTERS)


def _expert_type(experts: nn.Module, where: str) -> str:
    if type(experts).__name__ == "GptOssExperts":
        return "swiglu_oss"
    act = getattr(experts, "act_fn", None)
    if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "swiglu"
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu:
        return "geglu"
    raise NotImplementedError(f"from_hf_moe: {where}: the experts' activation {type(act).__name__} has no torch_moe "
                              "expert type (swiglu: SiLU, geglu: exact GELU)")


def _read(name: str, block: nn.Module) -> _Block:
    router, experts = _router_of(block), block.experts
    where = f"{name} ({type(block).__name__})"
    expert = _expert_type(experts, where)
    has_bias = getattr(experts, "has_bias", False)
    if not getattr(experts, "has_gate", True) or (has_bias and expert != "swiglu_oss") \
            or getattr(experts, "has_post_expert_norm", False) or not hasattr(experts, "gate_up_proj"):
        raise NotImplementedError(f"from_hf_moe: {where}: only gated experts without post-expert norms "
                                  "(gate_up_proj, down_proj), and biases only with GPT-OSS's experts, are supported")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not getattr(experts, "is_transposed", False):  # HF's usual [E, 2f, d] and [E, d, f]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    return _Block(router, gate_up, down, expert, shared, getattr(block, "shared_expert_gate", None),
                  interleaved=not getattr(experts, "is_concatenated", True),
                  gate_up_bias=experts.gate_up_proj_bias if has_bias else None,
                  down_bias=experts.down_proj_bias if has_bias else None,
                  input_jitter=float(getattr(block, "input_jitter_noise", 0.0) or 0.0),
                  expert_options={"swiglu_alpha": float(experts.alpha), "swiglu_limit": float(experts.limit)}
                  if expert == "swiglu_oss" else {})


def _derived_kwargs(block: _Block) -> dict:
    """The MoE arguments under which the torch_moe layer computes what the HF block does."""
    router = block.router
    kwargs: dict = {"capacity_factor": None, "expert": block.expert}
    name = type(router).__name__
    if name in _SOFTMAX_ROUTERS:
        normalize = _SOFTMAX_ROUTERS[name]
        kwargs["normalize_weights"] = bool(router.norm_topk_prob if normalize is None else normalize)
        if isinstance(getattr(router, "bias", None), Tensor):
            kwargs["router_bias"] = True
    elif name in _SPARSEMIXER_ROUTERS:  # PhiMoE: its router_jitter_noise is the sparsemixer's mask threshold
        kwargs.update(router="sparsemixer", jitter_eps=float(router.router_jitter_noise))
    else:  # DeepSeek-V3: sigmoid scores, a selection bias, groups, a scaling factor
        kwargs.update(router="sigmoid", normalize_weights=bool(router.norm_topk_prob), bias_update_rate=0.0)
        if router.num_group > 1:
            kwargs.update(n_groups=router.num_group, topk_groups=router.topk_group)
        if router.routed_scaling_factor != 1.0:
            kwargs["routed_scaling_factor"] = float(router.routed_scaling_factor)
    kwargs.update(block.expert_options)
    if block.gate_up_bias is not None:
        kwargs.update(bias=True, up_bias=True)
    if block.shared is not None:
        kwargs.update(num_shared_experts=1, shared_expert_d_ff=block.shared.down_proj.weight.shape[1])
        if block.shared_gate is not None:
            kwargs["shared_expert_gate"] = True
    return kwargs


def _split_gate_up(t: Tensor, block: _Block) -> tuple[Tensor, Tensor]:
    """gate and up halves of t [..., 2f] in HF's order: interleaved or concatenated."""
    if block.interleaved:
        return t[..., 0::2], t[..., 1::2]
    f = block.down.shape[1]
    return t[..., :f], t[..., f:]


@torch.no_grad()
def _copy_weights(moe: MoE, block: _Block) -> None:
    gate, up = _split_gate_up(block.gate_up, block)
    moe.experts.w1.copy_(gate)
    moe.experts.w3.copy_(up)
    moe.experts.w2.copy_(block.down)
    if block.gate_up_bias is not None:
        gate_bias, up_bias = _split_gate_up(block.gate_up_bias, block)
        moe.experts.b1.copy_(gate_bias)
        moe.experts.b3.copy_(up_bias)
        moe.experts.b2.copy_(block.down_bias)
    router_weight = getattr(moe.router, "weight", None)
    if isinstance(router_weight, Tensor) and router_weight.shape == block.router.weight.shape:
        router_weight.copy_(block.router.weight)
    router_bias, hf_bias = getattr(moe.router, "bias", None), getattr(block.router, "bias", None)
    if isinstance(router_bias, Tensor) and isinstance(hf_bias, Tensor):
        router_bias.copy_(hf_bias)
    correction = getattr(block.router, "e_score_correction_bias", None)
    if correction is not None and hasattr(moe.router, "expert_bias"):
        moe.router.expert_bias.copy_(correction)
    if block.shared is not None:
        moe.shared_experts.w1[0].copy_(block.shared.gate_proj.weight.t())
        moe.shared_experts.w3[0].copy_(block.shared.up_proj.weight.t())
        moe.shared_experts.w2[0].copy_(block.shared.down_proj.weight.t())
    if block.shared_gate is not None:
        moe.shared_expert_gate.weight.copy_(block.shared_gate.weight)


def from_hf_moe(model: nn.Module, *, select: Optional[set] = None, **overrides) -> nn.Module:
    """Replace each sparse MoE block of ``model`` by a :class:`HFMoEFeedForward` holding a
    :class:`~torch_moe.MoE` with the block's weights and routing, in place; returns ``model``.

    With no ``overrides`` the converted model's logits equal the original's (dropless; HF's router semantics:
    ``norm_topk_prob``, DeepSeek-V3's sigmoid scores with ``e_score_correction_bias`` as the fixed selection bias
    (``bias_update_rate=0``), groups and ``routed_scaling_factor``; Qwen2-MoE's sigmoid-gated shared expert;
    GPT-OSS's router bias (``router_bias=True``) and clamped SwiGLU with biases (``expert="swiglu_oss"``); PhiMoE's
    sparsemixer (``router="sparsemixer"``, ``jitter_eps`` its ``router_jitter_noise``), whose training-mode
    sampling, estimator and ``input_jitter_noise`` draw the random numbers HF's code draws, in the same order).
    ``overrides`` go to :class:`~torch_moe.MoE` (``capacity_factor=1.25``, ``router="expert_choice"``,
    ``bias_update_rate=1e-3``, ``aux_loss_coef``, ...); a different ``router`` drops the router options specific
    to the derived one (DeepSeek's, sparsemixer's ``jitter_eps``; ``router_bias`` where the new router has none)
    and keeps the router weight (and bias) where its shape fits. ``select``: the dotted names of the blocks to convert
    (default all). Padding: as for :func:`~torch_moe.convert.moefy`, ``attention_mask`` reaches every layer.

    Aux losses: ``torch_moe.aux_loss(model)`` is torch_moe's (per layer: E · Σ f_i P_i with f_i the share of the
    layer's assignments, see the README). HF's own ``output_router_logits=True`` keeps working: each converted
    layer's router logits reach HF's recorder, so ``outputs.aux_loss`` is HF's value computed by HF's code. For one
    layer HF's load-balancing value is top_k times torch_moe's; over several layers HF pools every layer's tokens
    before the product, so there is no fixed factor: use ``output_router_logits=True`` to reproduce HF's number
    (times ``router_aux_loss_coef`` in ``outputs.loss``). Recorded in ``model.config`` so that
    :func:`torch_moe.convert.from_pretrained` rebuilds a saved converted model. Raises ``NotImplementedError`` for
    experts torch_moe has no type for and ``ValueError`` when there is no MoE block.
    """
    for arg in ("device", "dtype"):
        if arg in overrides:
            raise ValueError(f"from_hf_moe: {arg} is taken from the block being replaced; do not pass it")
    blocks = [(name, module) for name, module in model.named_modules()
              if _is_moe_block(module) and (select is None or name in select)]
    if not blocks:
        raise ValueError(f"from_hf_moe: found no sparse MoE block in {type(model).__name__} (looked for a module "
                         f"with `experts` and a router of {SUPPORTED_ROUTERS})")
    read = [(name, _read(name, module)) for name, module in blocks]  # every block checked before any is replaced
    for name, block in read:
        kwargs = _derived_kwargs(block)
        derived_router = kwargs.get("router", "softmax")
        new_router = overrides.get("router", derived_router)
        if new_router != derived_router:
            kwargs = {key: value for key, value in kwargs.items() if key not in _ROUTER_SPECIFIC}
            if "router_bias" not in router_class(new_router).accepts:
                kwargs.pop("router_bias", None)
            if new_router == "sparsemixer":
                kwargs.pop("normalize_weights", None)
        kwargs.update(overrides)
        num_experts, d_model = block.router.weight.shape
        # PhiMoE's sparsemixer picks two experts whatever num_experts_per_tok says; so does its conversion.
        top_k = 2 if type(block.router).__name__ in _SPARSEMIXER_ROUTERS else block.router.top_k
        moe = MoE(d_model, block.down.shape[1], num_experts, top_k, device=block.gate_up.device,
                  dtype=block.gate_up.dtype, **kwargs)
        _copy_weights(moe, block)
        _record_router_logits(model, type(block.router), moe.router)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = HFMoEFeedForward(moe, input_jitter=block.input_jitter,
                                       returns_router_scores=block.expert == "swiglu_oss")
        # The block's train/eval mode carries over: sparsemixer routes differently in training.
        replacement.train(getattr(parent, child).training)
        setattr(parent, child, replacement)
    _install_attention_mask_hook(model)
    record_conversion(model, {"method": "from_hf_moe", "modules": [name for name, _ in read],
                              "overrides": dict(overrides)})
    return model


class HFMoEFeedForward(MoEFeedForward):
    """:class:`~torch_moe.convert.MoEFeedForward` with the calling conventions of an HF sparse MoE block.

    ``input_jitter`` (PhiMoE's ``input_jitter_noise``): in training, the hidden states are multiplied by
    U(1 − eps, 1 + eps) noise twice before routing and the experts, as HF's PhiMoE block and then its router each
    do in place on the same tensor. ``returns_router_scores`` (GPT-OSS, whose decoder layer unpacks two values):
    forward returns ``(output, None)``; the second item stands for HF's router scores, which its decoder discards.
    Holds no parameter of its own: its state dict is MoEFeedForward's.
    """

    def __init__(self, moe: MoE, *, input_jitter: float = 0.0, returns_router_scores: bool = False) -> None:
        super().__init__(moe)
        self.input_jitter = input_jitter
        self.returns_router_scores = returns_router_scores

    def forward(self, hidden_states: Tensor):
        if self.training and self.input_jitter > 0:
            for _ in range(2):
                noise = torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
                hidden_states = hidden_states * noise
        out = super().forward(hidden_states)
        return (out, None) if self.returns_router_scores else out

    def extra_repr(self) -> str:
        parts = [f"input_jitter={self.input_jitter}"] if self.input_jitter else []
        return ", ".join(parts + (["returns_router_scores=True"] if self.returns_router_scores else []))


def _record_router_logits(model: nn.Module, hf_router_class: type, router: nn.Module) -> None:
    """Hook torch_moe's router where HF's recorder hooked the replaced router class, so output_router_logits still
    collects one [T, E] logits tensor per layer (a torch_moe Routing is a tuple whose item 0 is the logits)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # another transformers: output_router_logits then sees no converted layer
        return
    keys = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for key, specs in (getattr(type(module), "_can_record_outputs", None) or {}).items():
                for spec in specs if isinstance(specs, list) else [specs]:
                    if getattr(spec, "target_class", spec) is hf_router_class:
                        keys.add(key)
    for key in sorted(keys):
        install_output_capuring_hook(router, key, 0)

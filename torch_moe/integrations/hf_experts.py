"""A transformers experts implementation, "torch_moe": HF MoE experts run dropless on torch_moe's grouped ops.

Importing this module registers ``"torch_moe"`` in transformers' ``ExpertsInterface``, so every family whose experts
class uses ``@use_experts_implementation`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, PhiMoE, Granite-MoE, GPT-OSS,
...) takes it::

    import torch_moe.integrations.hf_experts  # noqa: F401  (registers "torch_moe")
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="torch_moe")
    model.set_experts_implementation("torch_moe")

Only the experts' compute changes: HF's router, its weights and names, checkpoints and aux loss stay HF's. The
forward is ``permute_plan`` -> one ``gather_grouped_mm`` of the whole gate_up weight (the token permutation fused in)
-> the class's own gate (``_apply_gate``; torch_moe's ``glu`` op for a plain SiLU / exact-GELU gate) -> one
``grouped_mm_unpermute`` (the down projection and the weighted combine fused). HF's weights are used in place: a
non-transposed layout [E, d_out, d_in] is passed as a transposed view, which torch_moe's grouped GEMMs accept at any
strides, so there is no weight copy and no cache to invalidate, and gradients land on HF's parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.integrations.moe import ExpertsInterface, _default_apply_gate
except ImportError as err:  # torch_moe itself never needs transformers; only this module does
    raise ImportError(
        "torch_moe.integrations.hf_experts needs transformers with the experts interface "
        "(transformers.integrations.moe.ExpertsInterface, transformers >= 5): pip install -U transformers"
    ) from err

from .. import ops

__all__ = ["IMPLEMENTATION", "torch_moe_experts_forward", "register"]

IMPLEMENTATION = "torch_moe"


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _glu_activation(module: nn.Module):
    """torch_moe's name for the class's gate when it is HF's default ``act_fn(gate) * up`` over [gate; up] with an
    activation ``ops.glu`` computes to the same numbers, else None (the class's own ``_apply_gate`` then runs)."""
    if type(module)._apply_gate is not _default_apply_gate:
        return None
    act = getattr(module, "act_fn", None)
    if act is None or "forward" in vars(act):  # a forward swapped per instance (hub kernels): run it as is
        return None
    if type(act) in (SiLUActivation, nn.SiLU):
        return "silu"
    if type(act) is GELUActivation and act.act is F.gelu:
        return "gelu"
    return None


def _check_weight(module: nn.Module, name: str, weight, experts: int, d_in: int, transposed: bool) -> int:
    """Validate an expert weight of the declared layout; returns its output width."""
    cls = _name(module)
    if not isinstance(weight, Tensor):
        raise ValueError(f"torch_moe experts implementation: {cls} has no 3-D tensor '{name}' "
                         f"(got {type(weight).__name__}); it needs @use_experts_implementation's weight names")
    if not weight.is_floating_point():
        raise NotImplementedError(f"torch_moe experts implementation: {cls}.{name} has dtype {weight.dtype}; "
                                  "quantized expert weights are not supported (dequantize, or use another "
                                  "experts_implementation)")
    layout = "[E, d_in, d_out]" if transposed else "[E, d_out, d_in]"
    if weight.dim() != 3 or weight.shape[0] != experts or weight.shape[1 if transposed else 2] != d_in:
        raise ValueError(f"torch_moe experts implementation: {cls}.{name} has shape {tuple(weight.shape)}, which "
                         f"is not the declared layout {layout} (is_transposed={transposed}) with E={experts}, "
                         f"d_in={d_in}")
    return weight.shape[2 if transposed else 1]


def _check_bias(module: nn.Module, name: str, experts: int, d_out: int) -> Tensor:
    bias = getattr(module, name, None)
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (experts, d_out):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"torch_moe experts implementation: {_name(module)} declares has_bias=True but '{name}' is "
                         f"{shape}, expected [E, d_out] = {(experts, d_out)}")
    return bias


def _as_in_out(weight: Tensor, transposed: bool) -> Tensor:
    """HF's weight as torch_moe's [E, d_in, d_out]: itself when transposed, else a transposed view (no copy)."""
    return weight if transposed else weight.transpose(1, 2)


def _bias_per_row(bias: Tensor, expert_of_row: Tensor) -> Tensor:
    return bias.index_select(0, expert_of_row)


def torch_moe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The "torch_moe" experts implementation: hidden_states [T, d], top_k_index / top_k_weights [T, k] -> [T, d].

    The same numbers as the class's eager forward (up to float rounding order): each token's output is
    ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])``.
    """
    cls = _name(self)
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"torch_moe experts implementation: {cls} is expert-parallel (routing ids hold "
                                  "out-of-range sentinels for remote experts); use experts_implementation='grouped_mm'")
    if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape \
            or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"torch_moe experts implementation: {cls} expects hidden_states [T, d] and top_k_index / "
                         f"top_k_weights [T, k], got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)} and "
                         f"{tuple(top_k_weights.shape)}")
    experts = self.num_experts
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    d = hidden_states.shape[1]

    first_name = "gate_up_proj" if has_gate else "up_proj"
    first = getattr(self, first_name, None)
    first_out = _check_weight(self, first_name, first, experts, d, transposed)
    if has_gate and first_out % 2:
        raise ValueError(f"torch_moe experts implementation: {cls}.gate_up_proj has an odd output width {first_out}; "
                         "a gated expert needs gate and up halves")
    hidden = first_out // 2 if has_gate else first_out
    down = getattr(self, "down_proj", None)
    down_out = _check_weight(self, "down_proj", down, experts, hidden, transposed)
    if down_out != d:
        raise ValueError(f"torch_moe experts implementation: {cls}.down_proj maps to width {down_out}, expected the "
                         f"hidden size {d}")
    first_bias = _check_bias(self, first_name + "_bias", experts, first_out) if has_bias else None
    down_bias = _check_bias(self, "down_proj_bias", experts, d) if has_bias else None

    x = hidden_states.to(first.dtype)  # torch_moe's GEMMs need one dtype; HF's grouped_mm casts the same way
    expert_ids = top_k_index.to(torch.int64)
    row_index, offsets = ops.permute_plan(expert_ids, experts)
    w_first = _as_in_out(first, transposed)
    w_down = _as_in_out(down, transposed)
    expert_of_row = None
    if has_bias:
        # Row row_index[t, j] of the grouped rows belongs to expert top_k_index[t, j].
        expert_of_row = torch.empty(row_index.numel(), dtype=torch.int64, device=x.device)
        expert_of_row[row_index.reshape(-1)] = expert_ids.reshape(-1)

    # The first projection and the gate.
    glu_activation = _glu_activation(self) if has_gate else None
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or first.requires_grad)
    if glu_activation is not None and first_bias is None and not needs_grad:
        # Inference: one op forms both halves (views of the weight, no copy) and the activation, rows gathered once.
        h = ops.gather_grouped_glu(x, w_first[..., :hidden], w_first[..., hidden:], offsets, row_index, glu_activation)
    else:
        # One GEMM of the whole gate_up weight, then the split of its output.
        h = ops.gather_grouped_mm(x, w_first, offsets, row_index)
        if first_bias is not None:
            h = h + _bias_per_row(first_bias, expert_of_row)
        if glu_activation is not None:
            h = ops.glu(h[:, :hidden], h[:, hidden:], glu_activation)
        elif has_gate:
            h = self._apply_gate(h)  # the class's own gate: interleaved layouts, GPT-OSS's clamped SwiGLU, ...
        else:
            h = self.act_fn(h)
    h = h.to(down.dtype)

    # The down projection and the weighted combine.
    if getattr(self, "has_post_expert_norm", False):
        out = ops.grouped_mm(h, w_down, offsets)
        if down_bias is not None:
            out = out + _bias_per_row(down_bias, expert_of_row)
        y = ops.unpermute(self.post_expert_norm(out), top_k_weights, row_index)
    else:
        y = ops.grouped_mm_unpermute(h, w_down, offsets, top_k_weights, row_index)
        if down_bias is not None:
            # sum_j w[t, j] * b[e_tj]: the bias term of the weighted combine, without a per-row bias pass.
            y = y + (top_k_weights.unsqueeze(-1).to(down_bias.dtype) * down_bias[expert_ids]).sum(dim=1)
    return y.to(hidden_states.dtype)


def register(interface: type[ExpertsInterface] = ExpertsInterface) -> None:
    """Register ``"torch_moe"`` in transformers' experts interface (done on import; idempotent)."""
    interface.register(IMPLEMENTATION, torch_moe_experts_forward)


register()

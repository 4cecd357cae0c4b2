"""Expert FFNs stored as stacked weights [E, ...], run batched over [E, C, d] or grouped over sorted rows."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

__all__ = ["Experts", "EXPERT_TYPES", "ACTIVATIONS", "unwrapped"]

EXPERT_TYPES = ("swiglu", "geglu", "mlp", "geglu_tanh")
_GATE_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
def _gelu(h: Tensor) -> Tensor:
    return F.gelu(h)  # exact (erf) gelu


def _gelu_tanh(h: Tensor) -> Tensor:
    return F.gelu(h, approximate="tanh")  # GPT-2's gelu_new


# Module-level functions, not lambdas: a layer holding one must pickle (torch.save(model), multiprocessing).
ACTIVATIONS = {"gelu": _gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "silu": F.silu}


def _grouped_path(x: Tensor) -> str:
    """Which path the last grouped GEMMs took: "grouped_mm" or "per_expert_loop" on CUDA, "cpu" on the CPU."""
    if x.device.type != "cuda":
        return "cpu"
    if torch.compiler.is_compiling():
        return "compiled"
    return ops.last_grouped_mm_path() or "unknown"


class Experts(nn.Module):
    """E independent FFNs.

    ``"swiglu"``: (silu(x·w1 [+ b1]) · (x·w3 [+ b3])) · w2 [+ b2]; ``"geglu"``: the same with exact gelu,
    ``"geglu_tanh"`` with tanh-approximated gelu (Gemma, T5 v1.1); ``"mlp"``: act(x·w1 [+ b1]) · w2 [+ b2] with
    ``activation`` in gelu (exact) / gelu_tanh / relu / silu.
    Parameters: w1 [E, d_model, d_ff], w2 [E, d_ff, d_model], w3 [E, d_model, d_ff] (gated types only),
    b1 [E, d_ff] and b2 [E, d_model] when ``bias``, b3 [E, d_ff] when ``up_bias`` (gated types only: Llama's
    ``mlp_bias``). ``last_path`` names the expert-compute path of the last forward:
    "bmm" (capacity mode), "grouped_mm" (torch's grouped GEMM) or "per_expert_loop" on CUDA, "cpu" on the CPU.
    """

    last_path: str = ""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        *,
        expert: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        up_bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if expert not in EXPERT_TYPES:
            raise ValueError(f"expert must be one of {EXPERT_TYPES}, got {expert!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.expert = expert
        self.activation = activation
        self.num_experts = num_experts
        self.gated = expert != "mlp"
        if up_bias and not self.gated:
            raise ValueError(f"up_bias (b3 on x·w3) needs a gated expert type, got expert={expert!r}")
        # The mlp expert's activation; the gated types apply theirs (silu / gelu / tanh gelu) through ops.glu.
        self._act = ACTIVATIONS[activation]
        self._gate_activation = _GATE_ACTIVATIONS.get(expert)
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory)) if self.gated else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if bias else None
        self.b3 = nn.Parameter(torch.empty(num_experts, d_ff, **factory)) if up_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default range per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        d_model, d_ff = self.w1.shape[1], self.w1.shape[2]
        # b3 last, so that adding it leaves the draws of the other parameters as they were.
        for weight, fan_in in ((self.w1, d_model), (self.w3, d_model), (self.b1, d_model), (self.w2, d_ff), (self.b2, d_ff),
                               (self.b3, d_model)):
            if weight is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(weight, -bound, bound)

    def _gated(self, gate: Tensor, up: Tensor) -> Tensor:
        """f(gate) * up of the gated expert types, one op: backward keeps gate and up, not f(gate) as well."""
        return ops.glu(gate, up, self._gate_activation)

    def forward(self, x: Tensor, offsets: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                row_index: Optional[Tensor] = None) -> Tensor:
        """Every path of the experts, so that callers reach the weights only through this call.

        - ``experts(buffer [E, C, d_model])`` -> [E, C, d_model]: capacity mode (:meth:`forward_batched`);
        - ``experts(rows [N, d_model], offsets [E + 1])`` -> [N, d_model]: rows grouped by expert
          (:meth:`forward_grouped`);
        - ``experts(x [T, d_model], offsets, weights [T, k], row_index [T, k])`` -> [T, d_model]: dropless from tokens
          to the weighted output (:meth:`forward_dropless`).

        Why one entry point: wrappers that substitute a weight for the duration of a call (PEFT's LoRA
        ``ParamWrapper`` with ``target_parameters=["experts.w1", ...]``, ``torch.nn.utils.parametrize``) see only
        ``__call__``; a layer calling ``experts.forward_dropless`` or reading ``experts.w1`` would bypass them.
        """
        if offsets is None:
            if weights is not None or row_index is not None:
                raise ValueError("Experts: weights and row_index need offsets (the dropless path)")
            return self.forward_batched(x)
        if (weights is None) != (row_index is None):
            raise ValueError("Experts: pass weights and row_index together (dropless), or neither (grouped rows)")
        if weights is None:
            return self.forward_grouped(x, offsets)
        return self.forward_dropless(x, weights, row_index, offsets)

    def forward_batched(self, buffer: Tensor) -> Tensor:
        """Capacity mode: buffer [E, C, d_model] -> [E, C, d_model], one batched GEMM per projection."""
        self.last_path = "bmm"
        h = torch.bmm(buffer, self.w1)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        if self.gated:
            up = torch.bmm(buffer, self.w3)
            h = self._gated(h, up if self.b3 is None else up + self.b3.unsqueeze(1))
        else:
            h = self._act(h)
        out = torch.bmm(h, self.w2)
        if self.b2 is not None:
            out = out + self.b2.unsqueeze(1)
        return out

    def forward_grouped(self, rows: Tensor, offsets: Tensor) -> Tensor:
        """Dropless mode: rows [N, d_model] grouped by expert, offsets [E + 1] -> [N, d_model].

        One grouped GEMM per projection (torch_moe.ops.grouped_mm), no per-expert Python loop. Rows past
        offsets[E] (padding) are not read by unpermute, whatever they hold.
        """
        expert_of_row = None
        if self.b1 is not None or self.b3 is not None:
            positions = torch.arange(rows.shape[0], device=rows.device)
            expert_of_row = torch.searchsorted(offsets[1:], positions, right=True).clamp_(max=self.num_experts - 1)
        h = ops.grouped_mm(rows, self.w1, offsets)
        if self.b1 is not None:
            h = h + self.b1[expert_of_row]
        if self.gated:
            up = ops.grouped_mm(rows, self.w3, offsets)
            h = self._gated(h, up if self.b3 is None else up + self.b3[expert_of_row])
        else:
            h = self._act(h)
        out = ops.grouped_mm(h, self.w2, offsets)
        if self.b2 is not None:
            out = out + self.b2[expert_of_row]
        self.last_path = _grouped_path(rows)
        return out

    def forward_dropless(self, x: Tensor, weights: Tensor, row_index: Tensor, offsets: Tensor) -> Tensor:
        """Dropless mode from tokens to output: x [T, d_model], weights/row_index [T, k], offsets [E + 1] -> [T, d_model].

        The permutation is fused into the first projections (in inference one op for both halves of a gated
        expert) and the weighted combine into the last one, so backward keeps x and the hidden activations (as a dense FFN does),
        not k permuted copies of the tokens and of the expert outputs. Biases ride along as an extra input column of ones.
        """
        w1, w3, w2 = self.w1, self.w3, self.w2
        if self.b1 is not None or self.b3 is not None:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            w1 = torch.cat([w1, _bias_row(self.b1, w1)], dim=1)
            if w3 is not None:
                w3 = torch.cat([w3, _bias_row(self.b3, w3)], dim=1)
        if self.gated and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w3))):
            # Inference: one op for both gated projections (rows gathered once, activation formed in cache).
            # Training keeps the projections as separate ops: autograd then frees each one's activations before
            # the next weight gradient is allocated, where the fused op's backward needs both projections, their
            # output gradient and both weight gradients at once (+27 MiB peak, +0.26x of the dense FFN's, on
            # OLMoE-mini T=2048, for ~5% less time; benchmarks/NOTES.md section 11).
            h = ops.gather_grouped_glu(x, w1, w3, offsets, row_index, self._gate_activation)
        elif self.gated:
            gate = ops.gather_grouped_mm(x, w1, offsets, row_index)
            h = self._gated(gate, ops.gather_grouped_mm(x, w3, offsets, row_index))
        else:
            h = self._act(ops.gather_grouped_mm(x, w1, offsets, row_index))
        if self.b2 is not None:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
            w2 = torch.cat([w2, self.b2.unsqueeze(1)], dim=1)
        y = ops.grouped_mm_unpermute(h, w2, offsets, weights, row_index)
        self.last_path = _grouped_path(x)
        return y

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.w1.shape[1]}, d_ff={self.w1.shape[2]}, "
            f"expert={self.expert!r}, activation={self.activation!r}, bias={self.b1 is not None}"
            + (", up_bias=True" if self.b3 is not None else "")
        )


def unwrapped(module: nn.Module) -> nn.Module:
    """The module itself, or the module a wrapper holds (PEFT's ``get_base_layer()``, nested wrappers followed).

    For what is not a forward: a LoRA ``ParamWrapper`` around the experts or the router adds its update to the
    weight only while it is called, so layers read metadata (dtype, the router's load hooks) from the base module
    and compute only through the wrapper's ``__call__``.
    """
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def _bias_row(bias: Optional[Tensor], weight: Tensor) -> Tensor:
    """[E, 1, d_ff]: the bias as the weight row that meets the input's column of ones (zeros without a bias)."""
    return bias.unsqueeze(1) if bias is not None else weight.new_zeros(weight.shape[0], 1, weight.shape[2])

"""Expert FFNs stored as stacked weights [E, ...], run batched over [E, C, d] or grouped over sorted rows."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._checks import is_finite_number

__all__ = ["Experts", "NullExperts", "EXPERT_TYPES", "ACTIVATIONS", "unwrapped"]

EXPERT_TYPES = ("swiglu", "geglu", "mlp", "geglu_tanh", "swiglu_oss")
_GATE_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
# GPT-OSS's clamped SwiGLU (OpenAI 2025, gpt-oss model card): its defaults, the values of the released models.
SWIGLU_OSS_DEFAULTS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def _gelu(h: Tensor) -> Tensor:
    return F.gelu(h)  # exact (erf) gelu


def _gelu_tanh(h: Tensor) -> Tensor:
    return F.gelu(h, approximate="tanh")  # GPT-2's gelu_new


# Module-level functions, not lambdas: a layer holding one must pickle (torch.save(model), multiprocessing).
ACTIVATIONS = {"gelu": _gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "silu": F.silu}


def _batched_mm(buffer: Tensor, weight: Tensor) -> Tensor:
    """torch.bmm(buffer [E, C, K], weight [E, K, M]) -> [E, C, M]. On the CPU through ops.grouped_mm with C rows
    per expert: its GEMMs are cut into blocks fixed by the shapes (results independent of the thread count by
    construction, where torch.bmm's depend on MKL's behaviour) and run on ops.cpu_gemm_library(), as dropless
    mode's."""
    if buffer.device.type != "cpu":
        return torch.bmm(buffer, weight)
    num_experts, capacity = buffer.shape[0], buffer.shape[1]
    offsets = torch.arange(num_experts + 1, device=buffer.device) * capacity
    rows = ops.grouped_mm(buffer.reshape(num_experts * capacity, buffer.shape[2]), weight, offsets)
    return rows.view(num_experts, capacity, weight.shape[2])


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
    ``"geglu_tanh"`` with tanh-approximated gelu (Gemma, T5 v1.1); ``"swiglu_oss"``: GPT-OSS's clamped SwiGLU,
    g = min(x·w1 + b1, limit), u = clamp(x·w3 + b3, ±limit), (u + 1) · g · sigmoid(alpha · g), then · w2 + b2
    (``swiglu_alpha``, ``swiglu_limit``: default 1.702 and 7.0); ``"mlp"``: act(x·w1 [+ b1]) · w2 [+ b2] with
    ``activation`` in gelu (exact) / gelu_tanh / relu / silu.
    Parameters: w1 [E, d_model, d_ff], w2 [E, d_ff, d_model], w3 [E, d_model, d_ff] (gated types only),
    b1 [E, d_ff] and b2 [E, d_model] when ``bias``, b3 [E, d_ff] when ``up_bias`` (gated types only: Llama's
    ``mlp_bias``). ``hidden_dropout`` > 0 (Fedus et al. 2021's expert dropout) applies ``dropout`` (an nn.Dropout,
    training only) to the hidden activations [rows, d_ff] before w2. ``last_path`` names the expert-compute path of
    the last forward:
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
        swiglu_alpha: Optional[float] = None,
        swiglu_limit: Optional[float] = None,
        hidden_dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        # None at 0, so the layer without expert dropout runs exactly the ops it ran before the option existed.
        self.dropout = nn.Dropout(hidden_dropout) if hidden_dropout > 0 else None
        if expert not in EXPERT_TYPES:
            raise ValueError(f"expert must be one of {EXPERT_TYPES}, got {expert!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        _check_swiglu_oss(expert, swiglu_alpha, swiglu_limit, "")
        self.expert = expert
        self.activation = activation
        if expert == "swiglu_oss":
            self.swiglu_alpha = SWIGLU_OSS_DEFAULTS["swiglu_alpha"] if swiglu_alpha is None else float(swiglu_alpha)
            self.swiglu_limit = SWIGLU_OSS_DEFAULTS["swiglu_limit"] if swiglu_limit is None else float(swiglu_limit)
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
        if self.expert == "swiglu_oss":
            # No fused op: the clamps and alpha are GPT-OSS's own; plain torch keeps HF's order of operations.
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.swiglu_alpha))
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
        h = _batched_mm(buffer, self.w1)
        if self.b1 is not None:
            h = h + self.b1.unsqueeze(1)
        if self.gated:
            up = _batched_mm(buffer, self.w3)
            h = self._gated(h, up if self.b3 is None else up + self.b3.unsqueeze(1))
        else:
            h = self._act(h)
        if self.dropout is not None:
            h = self.dropout(h)
        out = _batched_mm(h, self.w2)
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
        if self.dropout is not None:
            h = self.dropout(h)
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
        # The fused op takes the glu activations of ops.glu only (not swiglu_oss's clamps); None for mlp too.
        fused = self._gate_activation is not None
        if fused and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w3))):
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
        if self.dropout is not None:
            h = self.dropout(h)
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
            + (f", swiglu_alpha={self.swiglu_alpha}, swiglu_limit={self.swiglu_limit}"
               if self.expert == "swiglu_oss" else "")
            + (f", hidden_dropout={self.dropout.p}" if self.dropout is not None else "")
        )


class NullExperts(nn.Module):
    """MoE++'s zero-computation experts (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with
    Zero-Computation Experts"): ``num_zero`` zero experts (output 0: the token is discarded), ``num_copy`` copy
    experts (output x: the token skips the layer) and ``num_constant`` constant experts, expert c giving
    α1·x + α2·v_c with [α1, α2] = softmax(W_c·x), v_c [d_model] and W_c [2, d_model] learned. They take expert ids
    E .. E + N − 1 (zero, then copy, then constant) after the E FFN experts and run on every token without a GEMM.
    MoE++'s gating residuals (adding the previous layer's router logits) are not part of this.

    Parameters: ``constant_vectors`` [num_constant, d_model] (v, N(0, 1/d_model) at start) and
    ``constant_gate.weight`` [2·num_constant, d_model] (W_c of every constant expert), when num_constant > 0.
    """

    def __init__(self, d_model: int, num_ffn_experts: int, num_zero: int, num_copy: int, num_constant: int, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_ffn_experts, self.num_zero, self.num_copy, self.num_constant = (num_ffn_experts, num_zero, num_copy,
                                                                                 num_constant)
        self.num_experts = num_zero + num_copy + num_constant
        factory = {"device": device, "dtype": dtype}
        if num_constant:
            self.constant_vectors = nn.Parameter(torch.empty(num_constant, d_model, **factory))
            self.constant_gate = nn.Linear(d_model, 2 * num_constant, bias=False, **factory)
        else:
            self.constant_vectors, self.constant_gate = None, None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.constant_vectors is not None:
            nn.init.normal_(self.constant_vectors, std=self.constant_vectors.shape[1] ** -0.5)
            self.constant_gate.reset_parameters()

    def forward(self, x: Tensor, weights: Tensor, expert_ids: Tensor, valid: Optional[Tensor]) -> Tensor:
        """x: [T, d], weights / expert_ids [T, k] of the router over E + N experts -> [T, d] in weights' dtype,
        Σ over the token's null choices of weight · output (0 for padding tokens)."""
        null_ids = expert_ids - self.num_ffn_experts
        is_null = null_ids >= 0
        if valid is not None:
            is_null = is_null & valid.unsqueeze(1)
        # gate[t, n]: the weight token t gives null expert n (a token chooses an expert at most once).
        gate = weights.new_zeros(weights.shape[0], self.num_experts).scatter_add(
            1, null_ids.clamp(min=0), torch.where(is_null, weights, 0))
        x = x.to(weights.dtype)
        copy = gate[:, self.num_zero:self.num_zero + self.num_copy].sum(1, keepdim=True)
        y = copy * x
        if self.num_constant:
            constant_gate = gate[:, self.num_zero + self.num_copy:]  # [T, num_constant]
            alphas = torch.softmax(F.linear(x, self.constant_gate.weight.to(x.dtype)).view(-1, self.num_constant, 2),
                                   dim=-1)
            y = y + (constant_gate * alphas[..., 0]).sum(1, keepdim=True) * x
            y = y + (constant_gate * alphas[..., 1]) @ self.constant_vectors.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"num_zero={self.num_zero}, num_copy={self.num_copy}, num_constant={self.num_constant}"


def unwrapped(module: nn.Module) -> nn.Module:
    """The module itself, or the module a wrapper holds (PEFT's ``get_base_layer()``, nested wrappers followed).

    For what is not a forward: a LoRA ``ParamWrapper`` around the experts or the router adds its update to the
    weight only while it is called, so layers read metadata (dtype, the router's load hooks) from the base module
    and compute only through the wrapper's ``__call__``.
    """
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def _check_swiglu_oss(expert: str, swiglu_alpha, swiglu_limit, where: str) -> None:
    """swiglu_alpha / swiglu_limit: finite numbers > 0, and only for expert="swiglu_oss"."""
    for name, value in (("swiglu_alpha", swiglu_alpha), ("swiglu_limit", swiglu_limit)):
        if value is None:
            continue
        if expert != "swiglu_oss":
            raise ValueError(f"{where}{name} applies to expert='swiglu_oss' only, got expert={expert!r}")
        if not (is_finite_number(value) and value > 0):
            raise ValueError(f"{where}{name} must be a number > 0 and finite, got {value!r}")


def _bias_row(bias: Optional[Tensor], weight: Tensor) -> Tensor:
    """[E, 1, d_ff]: the bias as the weight row that meets the input's column of ones (zeros without a bias)."""
    return bias.unsqueeze(1) if bias is not None else weight.new_zeros(weight.shape[0], 1, weight.shape[2])

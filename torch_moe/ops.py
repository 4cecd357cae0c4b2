"""Typed Python faces of the ``torch.ops.torch_moe`` custom operators (the only module that touches them).

Shapes: T tokens, E experts, k choices per token, C capacity (slots per expert), d model width.
Every op checks its arguments in C++ and raises ``RuntimeError`` naming the argument on bad input.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "RouterOutput",
    "CapacityPlan",
    "Permuted",
    "RouterLosses",
    "router_topk",
    "ExpertChoice",
    "expert_choice",
    "DSelectKGate",
    "dselect_k_gate",
    "noisy_topk_load",
    "capacity_plan",
    "dispatch",
    "combine",
    "permute",
    "unpermute",
    "router_losses",
    "grouped_mm",
    "permute_plan",
    "gather_grouped_mm",
    "gather_grouped_glu",
    "glu",
    "grouped_mm_unpermute",
    "last_grouped_mm_path",
    "gemm_path_counts",
    "reset_gemm_path_counts",
    "set_cuda_value_checks",
    "cuda_value_checks",
    "set_cpu_gemm_library",
    "cpu_gemm_library",
    "cpu_gemm_probe",
]


class RouterOutput(NamedTuple):
    weights: Tensor  # [T, k] float32 (float64 for float64 logits), differentiable w.r.t. logits
    expert_ids: Tensor  # [T, k] int64, in decreasing order of (score + selection_bias)
    scores: Tensor  # [T, E] softmax or sigmoid of the logits, router dtype, not differentiable


class ExpertChoice(NamedTuple):
    weights: Tensor  # [T, E] router dtype, probs[t, e] where expert e took token t else 0, differentiable
    slots: Tensor  # [T, E] int64, slot of token t in expert e's buffer, -1 when e did not take t
    token_ids: Tensor  # [E, C] int64, the token in each slot (best first), -1 for an empty slot
    scores: Tensor  # [T, E] softmax of the logits, router dtype, not differentiable


class DSelectKGate(NamedTuple):
    weights: Tensor  # [T, E] router dtype, the mixture q = sum_i alpha_i r_i, differentiable
    selector_outputs: Tensor  # [T, k, E] router dtype, each selector's r_i over the experts, differentiable


class CapacityPlan(NamedTuple):
    slots: Tensor  # [T, k] int64, slot in the expert's buffer, -1 when dropped or padding
    tokens_per_expert: Tensor  # [E] int64, valid assignments before dropping
    kept_per_expert: Tensor  # [E] int64, assignments that got a slot


class Permuted(NamedTuple):
    rows: Tensor  # [T*k, d] rows grouped by expert; rows past offsets[E] are zero (padding)
    row_index: Tensor  # [T, k] int64, row of each assignment in `rows`, -1 for padding tokens
    offsets: Tensor  # [E+1] int64, expert e owns rows[offsets[e]:offsets[e+1]]


class RouterLosses(NamedTuple):
    load_balancing_loss: Tensor  # 0-dim, E * sum_i f_i * P_i over valid tokens
    z_loss: Tensor  # 0-dim, mean over valid tokens of logsumexp(logits)^2
    router_entropy: Tensor  # 0-dim, mean over valid tokens of -sum p log p (not differentiable)


def router_topk(
    logits: Tensor,
    k: int,
    score_func: str = "softmax",
    selection_bias: Optional[Tensor] = None,
    normalize: bool = True,
    n_groups: int = 1,
    topk_groups: int = 1,
) -> RouterOutput:
    """Fused router: scores, top-k choice and weights in one pass.

    logits: [T, E] any float dtype; router math runs in float32 (float64 for float64 logits).
    score_func: ``"softmax"`` over all experts or ``"sigmoid"`` per expert.
    selection_bias: [E], added to the scores only to choose experts, never to the weights.
    normalize: divide the chosen (unbiased) scores by their sum.
    n_groups, topk_groups: group-limited routing (DeepSeek-V3): the E experts form n_groups contiguous groups, a
    group ranks by the sum of its two highest biased scores, and a token chooses only inside its topk_groups best
    groups (ties to the lower group index). ``topk_groups >= n_groups`` leaves every expert eligible.
    Ties go to the lower expert id; NaN scores rank below every number, so ids are always in [0, E).
    """
    return RouterOutput(*torch.ops.torch_moe.router_topk(logits, k, score_func, selection_bias, normalize, n_groups,
                                                         topk_groups))


def expert_choice(logits: Tensor, capacity: int, valid_mask: Optional[Tensor] = None) -> ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022): each expert takes the ``capacity`` valid tokens it scores highest.

    logits: [T, E]; probs = softmax over experts per token (float32, float64 for float64 logits). Expert e takes
    the min(capacity, valid tokens) tokens of largest probs[:, e], ties to the lower token index. A token may be
    taken by several experts or by none. Pass ``expert_ids = arange(E).expand(T, E)`` with ``slots`` to
    :func:`dispatch` / :func:`combine` to run the experts.
    """
    return ExpertChoice(*torch.ops.torch_moe.expert_choice(logits, capacity, valid_mask))


def dselect_k_gate(code_logits: Tensor, selector_logits: Tensor, num_experts: int, gamma: float = 1.0) -> DSelectKGate:
    """The per-token gate of DSelect-k (Hazimeh et al. 2021): k single-expert selectors over m = ceil(log2 E) bits.

    code_logits: [T, k, m], selector_logits: [T, k] (same dtype; computed in float32, float64 for float64 logits).
    With S the smooth-step of width ``gamma`` (exactly 0 for z <= -gamma/2, exactly 1 for z >= gamma/2, the cubic
    -2/gamma³·z³ + 3/(2·gamma)·z + 1/2 between), selector i gives expert j (code bits b_1..b_m of j, most
    significant first) r_i[j] = prod_l (S(z_il) if b_l else 1 - S(z_il)); codes >= E are never formed, so for E not
    a power of 2 sum_j r_i[j] <= 1. weights q = sum_i softmax(selector_logits)_i r_i. Both outputs are
    differentiable w.r.t. both logits; a code logit on a flat part of S gets exactly zero gradient.
    """
    return DSelectKGate(*torch.ops.torch_moe.dselect_k_gate(code_logits, selector_logits, num_experts, gamma))


def noisy_topk_load(
    clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int, valid_mask: Optional[Tensor] = None
) -> Tensor:
    """Smooth load estimate of noisy top-k gating (Shazeer et al. 2017, appendix A) -> load [E].

    For token t and expert e, P[t, e] = Phi((clean[t, e] - threshold[t, e]) / noise_std[t, e]), the probability
    that e stays in the top k when only its own noise is redrawn; threshold is the k-th largest noisy logit of t
    excluding e's own (the (k+1)-th overall if e is in the top k, else the k-th). load[e] = sum over valid t.
    Differentiable w.r.t. all three [T, E] inputs (the noisy logits through the threshold). noise_std must be > 0.
    """
    return torch.ops.torch_moe.noisy_topk_load(clean_logits, noisy_logits, noise_std, k, valid_mask)


def capacity_plan(
    expert_ids: Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str = "position",
    priority: Optional[Tensor] = None,
    valid_mask: Optional[Tensor] = None,
) -> CapacityPlan:
    """Assign every (token, choice) a slot in its expert's buffer of ``capacity`` rows, or drop it.

    expert_ids: [T, k] int64. valid_mask: [T] bool, False tokens take no slot and are not counted.
    ``"position"``: all 1st choices in token order, then all 2nd choices, ... (GShard).
    ``"probability"``: each expert keeps the ``capacity`` assignments of highest ``priority`` [T, k]
    (required), ties to the lower token index; slots are given in that order.
    """
    return CapacityPlan(
        *torch.ops.torch_moe.capacity_plan(expert_ids, num_experts, capacity, drop_policy, priority, valid_mask)
    )


def dispatch(x: Tensor, expert_ids: Tensor, slots: Tensor, num_experts: int, capacity: int) -> Tensor:
    """x: [T, d] -> buffer [E, C, d] with buffer[expert_ids[t, j], slots[t, j]] = x[t]; empty slots are zero."""
    return torch.ops.torch_moe.dispatch(x, expert_ids, slots, num_experts, capacity)


def combine(buffer: Tensor, weights: Tensor, expert_ids: Tensor, slots: Tensor) -> Tensor:
    """buffer: [E, C, d], weights: [T, k] -> y [T, d] in buffer's dtype.

    y[t] = sum over kept j (slots[t, j] >= 0) of weights[t, j] * buffer[expert_ids[t, j], slots[t, j]],
    accumulated in float32 (float64 for float64) in increasing j, so results are deterministic.
    """
    return torch.ops.torch_moe.combine(buffer, weights, expert_ids, slots)


def permute(
    x: Tensor, expert_ids: Tensor, num_experts: int, valid_mask: Optional[Tensor] = None
) -> Permuted:
    """Dropless: x [T, d] -> rows [T*k, d] grouped by expert (token order within an expert)."""
    return Permuted(*torch.ops.torch_moe.permute(x, expert_ids, num_experts, valid_mask))


def unpermute(rows: Tensor, weights: Tensor, row_index: Tensor) -> Tensor:
    """rows: [N, d], weights: [T, k] -> y [T, d], y[t] = sum_j weights[t, j] * rows[row_index[t, j]]."""
    return torch.ops.torch_moe.unpermute(rows, weights, row_index)


def router_losses(logits: Tensor, expert_ids: Tensor, valid_mask: Optional[Tensor] = None) -> RouterLosses:
    """Switch load-balancing loss, router z-loss and router entropy over the valid tokens.

    With p = softmax(logits), Tv valid tokens and k = expert_ids.size(1):
    f_i = #{assignments to i} / (Tv * k), P_i = mean_t p[t, i], load_balancing_loss = E * sum_i f_i * P_i;
    z_loss = mean_t logsumexp(logits[t])^2. All three are 0 when Tv = 0.
    """
    return RouterLosses(*torch.ops.torch_moe.router_losses(logits, expert_ids, valid_mask))


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Grouped GEMM over contiguous per-expert segments: a [N, K], b [E, K, M], offsets [E+1] int64 -> [N, M].

    out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ b[e]; rows past offsets[E] are zero.
    Segment bounds are read where the data lives (no host sync on the Python side).
    """
    return torch.ops.torch_moe.grouped_mm(a, b, offsets)


def permute_plan(
    expert_ids: Tensor, num_experts: int, valid_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """The dropless plan of :func:`permute` without moving rows: (row_index [T, k], offsets [E+1])."""
    return torch.ops.torch_moe.permute_plan(expert_ids, num_experts, valid_mask)


def gather_grouped_mm(x: Tensor, b: Tensor, offsets: Tensor, row_index: Tensor) -> Tensor:
    """``grouped_mm(permute(x).rows, b, offsets)`` without keeping the permuted rows for backward.

    x: [T, K], b: [E, K, M], row_index [T, k] from :func:`permute_plan` -> [T*k, M]. Backward keeps only x,
    so the memory of a dropless first projection is that of a dense layer's.
    """
    return torch.ops.torch_moe.gather_grouped_mm(x, b, offsets, row_index)


def gather_grouped_glu(
    x: Tensor, w_gate: Tensor, w_up: Tensor, offsets: Tensor, row_index: Tensor, activation: str = "silu"
) -> Tensor:
    """The gated first half of a SwiGLU / GeGLU expert on the permuted tokens, in one op.

    ``f(gather_grouped_mm(x, w_gate, ...)) * gather_grouped_mm(x, w_up, ...)`` with f = ``"silu"`` (SwiGLU),
    ``"gelu"`` (exact, GeGLU) or ``"gelu_tanh"``. x: [T, K], w_gate and w_up: [E, K, M], row_index [T, k] and
    offsets [E + 1] from :func:`permute_plan` -> [T*k, M]. On the CPU the token rows are gathered once per expert
    for both projections and the activation is formed while the expert's projections are in cache; backward keeps
    x and the two projections, as a dense gated FFN does.
    """
    return torch.ops.torch_moe.gather_grouped_glu(x, w_gate, w_up, offsets, row_index, activation)[0]


def glu(gate: Tensor, up: Tensor, activation: str = "silu") -> Tensor:
    """The gated activation ``f(gate) * up`` of a SwiGLU / GeGLU FFN, f = ``"silu"``, ``"gelu"`` (exact) or
    ``"gelu_tanh"``; gate and up of one shape, e.g. [N, M].

    The same numbers as ``F.silu(gate) * up``; backward keeps gate and up (not f(gate) as well) and forms both
    gradients in one op. On the CPU it runs in cache-sized chunks and its outputs come from torch_moe's block cache.
    """
    return torch.ops.torch_moe.glu(gate, up, activation)


def grouped_mm_unpermute(h: Tensor, b: Tensor, offsets: Tensor, weights: Tensor, row_index: Tensor) -> Tensor:
    """``unpermute(grouped_mm(h, b, offsets), weights, row_index)`` without keeping the expert outputs.

    h: [N, K] grouped rows, b: [E, K, M], weights [T, k] -> y [T, M]; backward needs only h.
    """
    return torch.ops.torch_moe.grouped_mm_unpermute(h, b, offsets, weights, row_index)


def last_grouped_mm_path() -> str:
    """The path of this thread's last CUDA grouped_mm-family call: "grouped_mm" (torch's grouped GEMM) or
    "per_expert_loop" (one GEMM per non-empty expert); "" before any CUDA call or without CUDA kernels. Per thread,
    so it never sees a backward (autograd runs it on another thread): :func:`gemm_path_counts` does."""
    from . import _C

    return _C.last_grouped_mm_path()


def gemm_path_counts() -> Dict[Tuple[str, str, str], int]:
    """How many grouped GEMMs of the grouped_mm family took each path since the last reset, process-wide (forward
    and backward, whichever thread ran them: autograd runs a CUDA backward on its own thread).

    Keys are ``(op, pass, path)``: op one of "grouped_mm", "gather_grouped_mm", "gather_grouped_glu",
    "grouped_mm_unpermute"; pass "forward", "backward_input" (the activation gradient) or "backward_weight" (the
    weight gradient); path "grouped_mm" (CUDA, torch's grouped GEMM), "per_expert_loop" (CUDA, one GEMM per
    non-empty expert, offsets read on the host) or "cpu_loop" (CPU). One count per GEMM: the two projections of
    gather_grouped_glu count two. Reading the counters is a host operation; do it outside a training step.
    """
    from . import _C

    return {tuple(key): int(count) for key, count in _C.gemm_path_counts().items()}


def reset_gemm_path_counts() -> None:
    """Zero the counters of :func:`gemm_path_counts`."""
    from . import _C

    _C.reset_gemm_path_counts()


def set_cuda_value_checks(enabled: Optional[bool]) -> None:
    """Turn the host-side value checks of the CUDA kernels on (True) or off (False), or back to what the environment
    says (None: on when ``TORCH_MOE_CUDA_CHECKS=1``, ``on`` or ``true``, off otherwise).

    With them, a bad index or offsets tensor raises the CPU's ``RuntimeError`` naming the argument, at the cost of a
    host sync per check (about a dozen per capacity-mode training step). Without them (the default) no op syncs;
    slots and row indices are still range-checked on the device (a device-side assert), while out-of-range expert
    ids and duplicate rows are ignored, never read out of bounds. They are skipped during CUDA graph capture.
    """
    from . import _C

    _C.set_cuda_value_checks(-1 if enabled is None else int(bool(enabled)))


def set_cpu_gemm_library(library: Optional[str]) -> None:
    """Choose the library of the CPU kernels' float32 expert GEMMs: ``"onednn"`` (the oneDNN inside torch),
    ``"aten"`` (``torch.mm``: MKL in torch's x86 wheels), ``"torch_moe"`` (torch_moe's own AVX-512 kernel) or
    ``"auto"``. ``"auto"`` takes oneDNN where this torch build and CPU run it and a one-time probe
    (:func:`cpu_gemm_probe`) measures it at least 1.25x faster than ``torch.mm`` on one expert-sized GEMM,
    single-threaded, else ``torch.mm``; and for few-row GEMMs (an expert's rows, or the rows a weight gradient sums
    over, at most 128) torch_moe's kernel, where the CPU has AVX-512 and the probe measures it at least 1.1x faster
    than that library on a 16-row GEMM. ``None`` goes back to what ``TORCH_MOE_CPU_GEMM`` says (``auto`` when unset;
    ``onednn`` there falls back to ``aten`` where oneDNN is not available).

    Why: torch's float32 matmul calls MKL, whose kernels can leave half of a CPU's AVX-512 throughput unused (on the
    AMD CPU of benchmarks/NOTES.md section 19, oneDNN reached 2.2x MKL's GEMM throughput; on the Xeon of section
    14, 0.83x, hence the probe), and oneDNN spends ~11 us setting up each call, a third of a 16-row expert GEMM
    (section 20), which torch_moe's kernel does not. Results of the libraries agree to float32 rounding, not bit for
    bit; with any of them, they do not depend on the thread count. Pin the library (this function or the
    environment variable) where runs on one machine must give the same bits, since "auto" measures. Other dtypes
    are unaffected (bfloat16 and float16 ``torch.mm`` already use oneDNN). ``"onednn"`` and ``"torch_moe"`` raise
    where they are not available. On oneDNN, the first GEMM of each new shape builds a kernel (a few hundred
    microseconds; oneDNN caches 1024, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``).
    """
    from . import _C

    if library is None:
        import os

        library = os.environ.get("TORCH_MOE_CPU_GEMM") or "auto"
    if not isinstance(library, str):
        raise TypeError(f"set_cpu_gemm_library: library must be a str or None, got {type(library).__name__}")
    if library not in CPU_GEMM_LIBRARIES:
        raise ValueError(f"set_cpu_gemm_library: library must be one of {', '.join(map(repr, CPU_GEMM_LIBRARIES))}, "
                         f"got {library!r}")
    try:
        _C.set_cpu_gemm_library(library)
    except RuntimeError as err:  # a library asked for where it is not available: the message without C++ frames
        raise RuntimeError(str(err).split("\nException raised from")[0]) from None


CPU_GEMM_LIBRARIES = ("auto", "onednn", "aten", "torch_moe")


def cpu_gemm_library() -> str:
    """The library the CPU kernels' float32 expert GEMMs use now (see :func:`set_cpu_gemm_library`):
    ``"onednn"``, ``"aten"`` or ``"torch_moe"`` when one takes them all, else ``"torch_moe+onednn"`` or
    ``"torch_moe+aten"`` (few-row GEMMs on torch_moe's kernel, the others on the second)."""
    from . import _C

    return str(_C.cpu_gemm_library())


def cpu_gemm_probe() -> Dict[str, float]:
    """What ``set_cpu_gemm_library("auto")`` measured, once per process, in single-threaded float32 GFLOP/s:
    ``onednn_gflops`` and ``aten_gflops`` on a 256 x 512 x 256 GEMM (0 for oneDNN where it is not available) and
    ``onednn_faster`` (1.0 when oneDNN was at least 1.25x faster); ``few_rows_torch_moe_gflops`` and
    ``few_rows_library_gflops`` (torch_moe's kernel and the library picked above, on 16 x 512 x 256; 0 where the
    kernel is not available) and ``torch_moe_faster`` (1.0 when the kernel was at least 1.1x faster). Runs the
    probe if it has not run yet."""
    from . import _C

    return {str(key): float(value) for key, value in _C.cpu_gemm_probe().items()}


def cuda_value_checks() -> bool:
    """Whether the host-side CUDA value checks are on (see :func:`set_cuda_value_checks`)."""
    from . import _C

    return bool(_C.cuda_value_checks_requested())

"""Plain-PyTorch float64 references of every torch_moe op, written from the documented semantics, plus input builders.

Clarity over speed: Python loops over tokens and experts, no fused tricks, nothing shared with the C++ kernels.
Every reference takes CPU tensors and returns CPU tensors (float64 for float data, int64 for indices).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------


def _rank_key(value: float, expert: int) -> tuple:
    """Sort key for "decreasing score, ties to the lower expert id, NaN below every number"."""
    if math.isnan(value):
        return (1, 0.0, expert)
    return (0, -value, expert)


def router_scores(logits: Tensor, score_func: str) -> Tensor:
    """logits: [T, E] -> scores [T, E] in float64 (softmax over experts or sigmoid per expert)."""
    x = logits.detach().cpu().to(F64)
    if score_func == "softmax":
        return torch.softmax(x, dim=-1)
    if score_func == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    raise ValueError(f"unknown score_func {score_func!r}")


def router_topk(
    logits: Tensor,
    k: int,
    score_func: str = "softmax",
    selection_bias: Optional[Tensor] = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (weights [T, k] float64, expert_ids [T, k] int64, scores [T, E] float64)."""
    scores = router_scores(logits, score_func)
    T, E = scores.shape
    bias = None if selection_bias is None else selection_bias.detach().cpu().to(F64)
    weights = torch.zeros(T, k, dtype=F64)
    expert_ids = torch.zeros(T, k, dtype=torch.int64)
    for t in range(T):
        keys = [float(scores[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        order = sorted(range(E), key=lambda e: _rank_key(keys[e], e))
        chosen = order[:k]
        chosen_scores = [float(scores[t, e]) for e in chosen]
        if normalize:
            total = sum(chosen_scores)
            chosen_scores = [s / total for s in chosen_scores]
        for j, e in enumerate(chosen):
            expert_ids[t, j] = e
            weights[t, j] = chosen_scores[j]
    return weights, expert_ids, scores


# ----------------------------------------------------------------------------------------------------------------
# Capacity mode: plan, dispatch, combine
# ----------------------------------------------------------------------------------------------------------------


def capacity_plan(
    expert_ids: Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str = "position",
    priority: Optional[Tensor] = None,
    valid_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (slots [T, k] int64 with -1 for dropped/padding, tokens_per_expert [E], kept_per_expert [E])."""
    ids = expert_ids.cpu()
    T, k = ids.shape
    valid = [True] * T if valid_mask is None else [bool(v) for v in valid_mask.cpu()]
    slots = torch.full((T, k), -1, dtype=torch.int64)
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64)
    kept_per_expert = torch.zeros(num_experts, dtype=torch.int64)

    if drop_policy == "position":
        # All 1st choices in token order, then all 2nd choices, ...
        for j in range(k):
            for t in range(T):
                if not valid[t]:
                    continue
                e = int(ids[t, j])
                tokens_per_expert[e] += 1
                if kept_per_expert[e] < capacity:
                    slots[t, j] = kept_per_expert[e]
                    kept_per_expert[e] += 1
    elif drop_policy == "probability":
        if priority is None:
            raise ValueError("probability policy needs priority")
        prio = priority.detach().cpu().to(F64)
        for e in range(num_experts):
            assignments = [(t, j) for t in range(T) for j in range(k) if valid[t] and int(ids[t, j]) == e]
            tokens_per_expert[e] = len(assignments)
            # Highest priority first, ties to the lower token index (then the lower choice index).
            assignments.sort(key=lambda tj: (-float(prio[tj[0], tj[1]]), tj[0], tj[1]))
            for slot, (t, j) in enumerate(assignments[:capacity]):
                slots[t, j] = slot
            kept_per_expert[e] = min(len(assignments), capacity)
    else:
        raise ValueError(f"unknown drop_policy {drop_policy!r}")
    return slots, tokens_per_expert, kept_per_expert


def dispatch(x: Tensor, expert_ids: Tensor, slots: Tensor, num_experts: int, capacity: int) -> Tensor:
    """x: [T, d] -> buffer [E, C, d] float64; buffer[expert_ids[t, j], slots[t, j]] = x[t], empty slots zero."""
    xs = x.detach().cpu().to(F64)
    T, d = xs.shape
    buffer = torch.zeros(num_experts, capacity, d, dtype=F64)
    for t in range(T):
        for j in range(expert_ids.shape[1]):
            s = int(slots[t, j])
            if s >= 0:
                buffer[int(expert_ids[t, j]), s] = xs[t]
    return buffer


def combine(buffer: Tensor, weights: Tensor, expert_ids: Tensor, slots: Tensor) -> Tensor:
    """buffer: [E, C, d], weights: [T, k] -> y [T, d] float64, sum over kept choices of weight * buffer row."""
    buf = buffer.detach().cpu().to(F64)
    w = weights.detach().cpu().to(F64)
    T, k = expert_ids.shape
    y = torch.zeros(T, buf.shape[2], dtype=F64)
    for t in range(T):
        for j in range(k):
            s = int(slots[t, j])
            if s >= 0:
                y[t] += w[t, j] * buf[int(expert_ids[t, j]), s]
    return y


# ----------------------------------------------------------------------------------------------------------------
# Dropless mode: permute, unpermute
# ----------------------------------------------------------------------------------------------------------------


def permute(
    x: Tensor, expert_ids: Tensor, num_experts: int, valid_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (rows [T*k, d] float64 grouped by expert in token order, zero past offsets[E];
    row_index [T, k] int64, -1 for padding tokens; offsets [E + 1] int64)."""
    xs = x.detach().cpu().to(F64)
    T, d = xs.shape
    k = expert_ids.shape[1]
    valid = [True] * T if valid_mask is None else [bool(v) for v in valid_mask.cpu()]
    rows = torch.zeros(T * k, d, dtype=F64)
    row_index = torch.full((T, k), -1, dtype=torch.int64)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    next_row = 0
    for e in range(num_experts):
        offsets[e] = next_row
        for t in range(T):
            if not valid[t]:
                continue
            for j in range(k):
                if int(expert_ids[t, j]) == e:
                    rows[next_row] = xs[t]
                    row_index[t, j] = next_row
                    next_row += 1
    offsets[num_experts] = next_row
    return rows, row_index, offsets


def unpermute(rows: Tensor, weights: Tensor, row_index: Tensor) -> Tensor:
    """rows: [N, d], weights: [T, k] -> y [T, d] float64, y[t] = sum_j weights[t, j] * rows[row_index[t, j]]."""
    r = rows.detach().cpu().to(F64)
    w = weights.detach().cpu().to(F64)
    T, k = row_index.shape
    y = torch.zeros(T, r.shape[1], dtype=F64)
    for t in range(T):
        for j in range(k):
            i = int(row_index[t, j])
            if i >= 0:
                y[t] += w[t, j] * r[i]
    return y


# ----------------------------------------------------------------------------------------------------------------
# Aux losses
# ----------------------------------------------------------------------------------------------------------------


def router_losses(
    logits: Tensor, expert_ids: Tensor, valid_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (load_balancing_loss, z_loss, router_entropy), 0-dim float64, all 0 without valid tokens.

    Differentiable in float64 when `logits` requires grad (the counts f_i are constants), so the reference
    also gives reference gradients.
    """
    x = logits.cpu().to(F64)
    T, E = x.shape
    k = expert_ids.shape[1]
    valid = [True] * T if valid_mask is None else [bool(v) for v in valid_mask.cpu()]
    valid_tokens = [t for t in range(T) if valid[t]]
    zero = x.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0  # differentiable, and 0 even with -inf logits
    if not valid_tokens:
        return zero, zero.clone(), zero.clone().detach()
    tv = len(valid_tokens)
    counts = [0] * E
    for t in valid_tokens:
        for j in range(k):
            counts[int(expert_ids[t, j])] += 1
    lb = zero
    z = zero
    entropy = 0.0
    for t in valid_tokens:
        m = x[t].max()
        lse = m + torch.log(torch.exp(x[t] - m).sum())
        p = torch.exp(x[t] - lse)
        for i in range(E):
            f_i = counts[i] / (tv * k)
            lb = lb + E * f_i * p[i] / tv
        z = z + lse * lse / tv
        pd = p.detach()
        entropy += float(-(pd * torch.log(pd.clamp_min(1e-300))).sum()) / tv
    return lb, z, torch.tensor(entropy, dtype=F64)


# ----------------------------------------------------------------------------------------------------------------
# Input builders and tolerances shared by the tests
# ----------------------------------------------------------------------------------------------------------------


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """float64 [N, M]: each expert's segment of rows times its matrix, one row at a time; rows past the end zero."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    bounds = offsets.tolist()
    for e in range(b.shape[0]):
        for r in range(bounds[e], bounds[e + 1]):
            out[r] = a[r].double().cpu() @ b[e].double().cpu()
    return out


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype router math (and its float outputs) runs in for logits of `dtype`."""
    return F64 if dtype == F64 else torch.float32


def tolerance(dtype: torch.dtype) -> dict:
    """rtol/atol for a value computed in `dtype` (accumulated in at least float32) against a float64 reference."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
        torch.float16: dict(rtol=1e-3, atol=1e-5),
    }[dtype]


def distinct_expert_ids(T: int, E: int, k: int, generator: torch.Generator) -> Tensor:
    """[T, k] int64, k distinct random experts per token."""
    return torch.rand(T, E, generator=generator).argsort(dim=1)[:, :k].contiguous()


def random_row_plan(
    T: int, E: int, k: int, masked: bool, generator: torch.Generator
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """A dropless plan of k distinct random experts per token, from the reference permute: -> (expert_ids [T, k],
    valid_mask [T] (about 30% padding, token 0 always) or None when not masked or T = 0, row_index [T, k],
    offsets [E + 1])."""
    ids = distinct_expert_ids(T, E, k, generator)
    valid = None
    if masked and T > 0:
        valid = torch.rand(T, generator=generator) < 0.7
        valid[0] = False
    _, row_index, offsets = permute(torch.zeros(T, 0), ids, E, valid)
    return ids, valid, row_index, offsets


def separated_logits(T: int, E: int, generator: torch.Generator, spacing: float = 0.375) -> Tensor:
    """[T, E] float64 logits whose sorted values in each row are at least `spacing` apart, so no rounding
    to a lower precision (bf16/fp16 included) can swap two experts: a random permutation of a spaced grid plus
    a small jitter and a per-row shift."""
    perm = torch.rand(T, E, generator=generator).argsort(dim=1).to(F64)
    jitter = torch.rand(T, E, generator=generator, dtype=F64) * spacing * 0.25
    shift = torch.randn(T, 1, generator=generator, dtype=F64)
    return (perm - E / 2) * spacing + jitter + shift

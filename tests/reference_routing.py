"""Plain-PyTorch float64 references of the routing-ablation ops and losses, written from the papers' formulas.

Loops over tokens and experts; nothing shared with the C++ kernels or torch_moe's Python. Where a gradient is
compared, the reference is built from differentiable torch ops so autograd gives the reference gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

F64 = torch.float64


def _rank(values: list[float]) -> list[int]:
    """Indices by decreasing value, ties to the lower index, NaN last."""
    return sorted(range(len(values)), key=lambda i: (1, 0.0, i) if math.isnan(values[i]) else (0, -values[i], i))


def group_limited_topk(logits: Tensor, k: int, score_func: str, selection_bias: Optional[Tensor], normalize: bool,
                       n_groups: int, topk_groups: int) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 group-limited top-k -> (weights [T, k] float64, expert_ids [T, k])."""
    x = logits.detach().cpu().to(F64)
    scores = torch.softmax(x, -1) if score_func == "softmax" else torch.sigmoid(x)
    T, E = scores.shape
    size = E // n_groups
    bias = torch.zeros(E, dtype=F64) if selection_bias is None else selection_bias.detach().cpu().to(F64)
    weights = torch.zeros(T, k, dtype=F64)
    ids = torch.zeros(T, k, dtype=torch.int64)
    for t in range(T):
        keys = [float(scores[t, e] + bias[e]) for e in range(E)]
        group_scores = []
        for g in range(n_groups):
            members = sorted((keys[g * size + i] for i in range(size)), reverse=True)
            group_scores.append(sum(members[:2]))
        allowed_groups = set(_rank(group_scores)[:topk_groups])
        allowed = [e for e in range(E) if e // size in allowed_groups]
        order = sorted(allowed, key=lambda e: (-keys[e], e))[:k]
        chosen = [float(scores[t, e]) for e in order]
        total = sum(chosen) if normalize else 1.0
        for j, e in enumerate(order):
            ids[t, j] = e
            weights[t, j] = chosen[j] / total
    return weights, ids


def expert_choice(logits: Tensor, capacity: int, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Zhou et al. 2022 -> (weights [T, E] float64 with grad w.r.t. logits, slots [T, E], token_ids [E, C])."""
    probs = torch.softmax(logits.to(F64), -1)
    T, E = probs.shape
    flags = [True] * T if valid is None else [bool(v) for v in valid.tolist()]
    slots = torch.full((T, E), -1, dtype=torch.int64)
    token_ids = torch.full((E, capacity), -1, dtype=torch.int64)
    values = probs.detach().cpu()
    for e in range(E):
        candidates = [t for t in range(T) if flags[t]]
        order = sorted(candidates, key=lambda t: (-float(values[t, e]), t))[:capacity]
        for c, t in enumerate(order):
            slots[t, e] = c
            token_ids[e, c] = t
    mask = (slots >= 0).to(probs.device)
    return probs * mask, slots, token_ids


def noisy_topk_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int,
                    valid: Optional[Tensor] = None) -> Tensor:
    """Shazeer et al. 2017, appendix A: load[e] = Σ_t Φ((clean[t,e] − kth_excluding(noisy[t], k, e)) / std[t,e])."""
    T, E = clean.shape
    flags = [True] * T if valid is None else [bool(v) for v in valid.tolist()]
    load = [clean.new_zeros((), dtype=F64) for _ in range(E)]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    for t in range(T):
        if not flags[t]:
            continue
        row = noisy[t].detach().cpu().tolist()
        for e in range(E):
            others = [i for i in _rank(row) if i != e]  # the noisy logits without e's own, best first
            if len(others) < k:  # k == E: e is in the top k whatever its noise
                load[e] = load[e] + 1.0
                continue
            threshold = noisy[t, others[k - 1]].to(F64)
            z = (clean[t, e].to(F64) - threshold) / noise_std[t, e].to(F64)
            load[e] = load[e] + normal.cdf(z)
    return torch.stack(load)


def cv_squared(values: list[float]) -> float:
    """Population variance over squared mean (Shazeer et al. 2017's CV²; eps 1e-10 as the layer uses)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return var / (mean * mean + 1e-10)


def sequence_balance_loss(scores: Tensor, expert_ids: Tensor, valid: Optional[Tensor] = None) -> float:
    """DeepSeek-V3 eq. 17-20 without α, averaged over sequences with a valid token."""
    B, S, E = scores.shape
    k = expert_ids.shape[2]
    per_sequence = []
    for b in range(B):
        tokens = [s for s in range(S) if valid is None or bool(valid[b, s])]
        if not tokens:
            continue
        total = 0.0
        for i in range(E):
            f = E / (k * len(tokens)) * sum(int(i in expert_ids[b, s].tolist()) for s in tokens)
            p = sum(float(scores[b, s, i]) / float(scores[b, s].sum()) for s in tokens) / len(tokens)
            total += f * p
        per_sequence.append(total)
    return sum(per_sequence) / max(len(per_sequence), 1)


def soft_moe(x: Tensor, phi: Tensor, expert_fn, num_experts: int, slots_per_expert: int) -> Tensor:
    """Puigcerver et al. 2024, Algorithm 1, one sequence at a time: x [B, N, d] -> [B, N, d] (float64)."""
    outputs = []
    for b in range(x.shape[0]):
        xb = x[b].to(F64)
        logits = xb @ phi.to(F64)  # [N, E*p]
        dispatch = torch.softmax(logits, dim=0)
        combine = torch.softmax(logits, dim=1)
        slots = dispatch.t() @ xb  # [E*p, d]
        ys = torch.stack([expert_fn(i // slots_per_expert, slots[i]) for i in range(num_experts * slots_per_expert)])
        outputs.append(combine @ ys)
    return torch.stack(outputs)

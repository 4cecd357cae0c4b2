"""Plain-PyTorch float64 references for routing part 2 (top-p, DS-MoE, null experts), from the papers' formulas.

Loops over tokens; nothing shared with torch_moe's Python or kernels. Built from differentiable torch ops so that
autograd gives the reference gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_expert(params: dict, e: int, x: Tensor) -> Tensor:
    """x: [d] -> [d] through swiglu expert e of a layer's parameters (``experts.w1`` ... by name)."""
    h = F.silu(x @ params["experts.w1"][e]) * (x @ params["experts.w3"][e])
    return h @ params["experts.w2"][e]


def layer_params(layer: torch.nn.Module) -> dict:
    """float64 leaf copies of a layer's parameters, by name."""
    return {name: p.detach().to(torch.float64).clone().requires_grad_() for name, p in layer.named_parameters()}


def top_p_choice(probs: Tensor, threshold: float, max_experts: int) -> list[list[int]]:
    """For each token, the fewest experts (most probable first, ties to the lower id) whose probs sum to at least
    ``threshold``, at most ``max_experts``."""
    chosen = []
    for row in probs.tolist():
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        taken, total = [], 0.0
        for e in order[:max_experts]:
            if total >= threshold:
                break
            taken.append(e)
            total += row[e]
        chosen.append(taken)
    return chosen


def mixture(params: dict, x: Tensor, chosen: list[list[int]], weights: list[Tensor]) -> Tensor:
    """y[t] = Σ_j weights[t][j] · expert_{chosen[t][j]}(x[t])."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for j, e in enumerate(chosen[t]):
            y = y + weights[t][j] * swiglu_expert(params, e, x[t])
        rows.append(y)
    return torch.stack(rows)


def entropy(probs: Tensor) -> Tensor:
    """[..., E] -> [...] −Σ p log p (0 log 0 = 0)."""
    return -(probs * torch.where(probs > 0, probs.log(), torch.zeros_like(probs))).sum(-1)


def top_p_balance_loss(probs: Tensor, chosen: list[list[int]], valid: Optional[list[bool]] = None) -> Tensor:
    """E · Σ_i f_i P_i with f_i = assignments to i / all assignments, over valid tokens."""
    T, E = probs.shape
    valid = valid or [True] * T
    counts = [0] * E
    for t in range(T):
        if valid[t]:
            for e in chosen[t]:
                counts[e] += 1
    total = sum(counts)
    rows = [t for t in range(T) if valid[t]]
    mean_probs = probs[rows].mean(0)
    return E * sum(counts[e] / total * mean_probs[e] for e in range(E))


def mutual_information_loss(probs: Tensor) -> Tensor:
    """DS-MoE: −H(mean_t p_t) + mean_t H(p_t)."""
    return -entropy(probs.mean(0)) + entropy(probs).mean()

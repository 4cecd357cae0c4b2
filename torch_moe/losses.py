"""Auxiliary balance losses of MoE routing, each a function of the router's outputs; the layer weights each by a
coefficient (``aux_loss_coef``, ``z_loss_coef``, ``importance_loss_coef``, ``load_loss_coef``,
``seq_balance_loss_coef``) and sums them into ``MoE.aux_loss``.

Shapes: T tokens, E experts, k choices per token; ``valid_mask`` [T] bool leaves padding tokens out.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed
from torch import Tensor

from . import distributed, ops

__all__ = [
    "load_balancing_loss",
    "z_loss",
    "cv_squared",
    "importance_loss",
    "load_loss",
    "sequence_balance_loss",
    "global_load_balancing_loss",
]


def load_balancing_loss(logits: Tensor, expert_ids: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4).

    ``E · Σ_i f_i · P_i`` with f_i the fraction of the valid assignments (``expert_ids`` [T, k]) that went to expert
    i and P_i the mean over valid tokens of softmax(logits)[:, i]; 1 at perfect balance. Gradient flows to the logits
    through P only.
    """
    return ops.router_losses(logits, expert_ids, valid_mask).load_balancing_loss


def z_loss(logits: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE, eq. 5): mean over valid tokens of logsumexp(logits[t])²."""
    placeholder_ids = torch.zeros((logits.shape[0], 1), dtype=torch.int64, device=logits.device)
    return ops.router_losses(logits, placeholder_ids, valid_mask).z_loss


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(values) / (mean(values)² + eps)`` with the population variance.

    The variance is a plain mean of squared deviations (no square root), so the gradient at perfect balance is
    exactly 0, not NaN. 0 for fewer than two values.
    """
    if values.numel() < 2:
        return values.new_zeros(())
    mean = values.mean()
    return (values - mean).pow(2).mean() / (mean.pow(2) + eps)


def importance_loss(gates: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Importance loss (Shazeer et al. 2017, eq. 6, without its coefficient): CV² of the per-expert importance.

    gates: [T, E] the weight each token gives each expert (0 where not chosen). Importance_i = Σ over valid tokens
    of gates[t, i].
    """
    if valid_mask is not None:
        gates = gates * valid_mask.unsqueeze(1).to(gates.dtype)
    return cv_squared(gates.sum(0))


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int,
              valid_mask: Optional[Tensor] = None) -> Tensor:
    """Load loss of noisy top-k gating (Shazeer et al. 2017, appendix A, eq. 10-11, without its coefficient).

    CV² of the smooth load estimate :func:`torch_moe.ops.noisy_topk_load`: for each expert, the sum over valid
    tokens of the probability (over a redraw of its own noise) that it is among the token's top k.
    """
    return cv_squared(ops.noisy_topk_load(clean_logits, noisy_logits, noise_std, k, valid_mask))


def sequence_balance_loss(scores: Tensor, expert_ids: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V2, eq. 12-14; DeepSeek-V3, eq. 17-20, without α).

    scores: [B, S, E] router scores (softmax or sigmoid), expert_ids: [B, S, k], valid_mask: [B, S] bool.
    Per sequence with S_v valid tokens: f_i = E / (k · S_v) · #{valid assignments to i}, P_i = mean over its valid
    tokens of s'[t, i] with s' = scores / Σ_e scores (the normalised affinities); loss = Σ_i f_i · P_i, averaged
    over the sequences that have a valid token. 1 at perfect balance within every sequence. Gradient through P.
    """
    if scores.dim() != 3 or expert_ids.dim() != 3 or scores.shape[:2] != expert_ids.shape[:2]:
        raise ValueError(f"sequence_balance_loss: scores must be [B, S, E] and expert_ids [B, S, k], got "
                         f"{tuple(scores.shape)} and {tuple(expert_ids.shape)}")
    B, S, E = scores.shape
    k = expert_ids.shape[2]
    valid = (torch.ones((B, S), dtype=scores.dtype, device=scores.device) if valid_mask is None
             else valid_mask.to(scores.dtype))
    valid_tokens = valid.sum(1)  # [B]
    counts = torch.zeros((B, E), dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, expert_ids.reshape(B, S * k), valid.unsqueeze(2).expand(B, S, k).reshape(B, S * k))
    fraction = counts * (E / k) / valid_tokens.clamp(min=1).unsqueeze(1)
    normalised = scores / scores.sum(2, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    mean_affinity = (normalised * valid.unsqueeze(2)).sum(1) / valid_tokens.clamp(min=1).unsqueeze(1)
    per_sequence = (fraction * mean_affinity).sum(1)
    has_tokens = (valid_tokens > 0).to(scores.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def global_load_balancing_loss(logits: Tensor, tokens_per_expert: Tensor, valid: Optional[Tensor], top_k: int,
                               group) -> Tensor:
    """Load-balancing loss with f_i counted over the whole group (Megatron's global-batch balancing).

    f_i = (assignments to i on all ranks) / (all assignments), from an all-reduce of ``tokens_per_expert`` (no host
    sync); P_i = (sum of probs[t, i] over this rank's valid tokens) · W / (valid tokens on all ranks). The mean over
    the ranks of the returned loss equals the single-process loss on all ranks' tokens together, and so does its
    gradient up to the factor W (each rank differentiates its own share).
    """
    world_size = torch.distributed.get_world_size(group)
    num_experts = logits.shape[1]
    global_counts = distributed.all_reduce_sum(tokens_per_expert, group)
    probs = torch.softmax(logits, dim=-1)
    if valid is not None:
        probs = torch.where(valid.unsqueeze(1), probs, 0)
    prob_sum = probs.sum(dim=0)
    assignments = global_counts.sum().to(probs.dtype)
    valid_tokens = assignments / top_k
    f = global_counts.to(probs.dtype) / assignments.clamp(min=1)
    return num_experts * world_size * (f * prob_sum).sum() / valid_tokens.clamp(min=1)


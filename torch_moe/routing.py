"""Routers: the learned linear router of the MoE layer, built on the fused ``router_topk`` op."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

__all__ = ["Router"]


class Router(nn.Module):
    """Top-k softmax router (Switch / GShard / Mixtral style).

    logits = x · weightᵀ in float32 (float64 for float64 input), probs = softmax(logits); each token takes its
    ``top_k`` most probable experts, ties to the lower id. Weights are the chosen probs, divided by their sum when
    ``normalize_weights``. ``jitter_eps > 0`` multiplies the router's input by U(1 − eps, 1 + eps) in training.

    Parameters: ``weight`` [E, d_model] (no bias).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        normalize_weights: bool,
        jitter_eps: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_weights = normalize_weights
        self.jitter_eps = jitter_eps
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x: Tensor) -> Tensor:
        """x: [T, d_model] -> logits [T, E] in the router dtype (float32, or float64 for float64 input)."""
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        router_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.linear(x.to(router_dtype), self.weight.to(router_dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, ops.RouterOutput]:
        """x: [T, d_model] -> (logits [T, E], RouterOutput(weights [T, k], expert_ids [T, k], scores [T, E]))."""
        logits = self.logits(x)
        return logits, ops.router_topk(logits, self.top_k, "softmax", None, self.normalize_weights)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize_weights={self.normalize_weights}, jitter_eps={self.jitter_eps}"
        )

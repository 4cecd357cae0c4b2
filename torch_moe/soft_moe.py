"""Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts"): every slot is a weighted average
of all tokens of a sequence, so no token is dropped and nothing is discrete."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import is_int
from .experts import EXPERT_TYPES, Experts, unwrapped

__all__ = ["SoftMoE"]


class SoftMoE(nn.Module):
    """Soft MoE layer over sequences x [B, N, d_model] with E experts of ``slots_per_expert`` (p) slots each.

    logits = x · phi [B, N, E·p]; dispatch weights D = softmax over the N tokens (per slot), combine weights
    C = softmax over the E·p slots (per token); slot inputs X̃ = Dᵀ x [B, E·p, d]; expert e runs on its p slots of
    every sequence; y = C · Ỹ. Nothing is dropped and every token gets an output, but each slot mixes the tokens of
    a whole sequence, so Soft MoE is not causal: do not use it in an autoregressive decoder. ``padding_mask``
    [B, N] bool (True = real token) keeps padding out of every slot; padding outputs are zero.

    Parameters: ``phi`` [d_model, E·p] and the experts (``experts.w1`` etc., as in :class:`torch_moe.Experts`).
    There is no aux loss (``aux_loss`` is always ``None``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        slots_per_expert: int = 1,
        *,
        expert: str = "swiglu",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts),
                            ("slots_per_expert", slots_per_expert)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"SoftMoE: {name} must be a positive int, got {value!r}")
        if expert not in EXPERT_TYPES:
            raise ValueError(f"SoftMoE: expert must be one of {EXPERT_TYPES}, got {expert!r}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        factory = {"device": device, "dtype": dtype}
        self.phi = nn.Parameter(torch.empty(d_model, num_experts * slots_per_expert, **factory))
        self.experts = Experts(d_model, d_ff, num_experts, expert=expert, **factory)
        self.aux_loss: Optional[Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LeCun normal, as the paper initialises phi.
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(self.d_model))
        self.experts.reset_parameters()

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SoftMoE: x must be [B, N, d_model={self.d_model}], got {tuple(x.shape)}")
        B, N, d = x.shape
        E, p = self.num_experts, self.slots_per_expert
        if padding_mask is not None and (padding_mask.shape != (B, N) or padding_mask.dtype != torch.bool):
            raise ValueError(f"SoftMoE: padding_mask must be a bool tensor of shape {(B, N)}, got "
                             f"{padding_mask.dtype} of shape {tuple(padding_mask.shape)}")
        router_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        tokens = x if padding_mask is None else torch.where(padding_mask.unsqueeze(2), x, 0)
        logits = torch.matmul(tokens.to(router_dtype), self.phi.to(router_dtype))  # [B, N, E*p]
        dispatch_logits = logits
        if padding_mask is not None:
            dispatch_logits = logits.masked_fill(~padding_mask.unsqueeze(2), float("-inf"))
        dispatch = torch.softmax(dispatch_logits, dim=1)  # over tokens
        if padding_mask is not None:  # a sequence of padding only: softmax over nothing, no slot input at all
            dispatch = torch.nan_to_num(dispatch, nan=0.0)
        combine = torch.softmax(logits, dim=2)  # over slots
        compute_dtype = unwrapped(self.experts).w1.dtype
        slots_in = torch.bmm(dispatch.transpose(1, 2).to(compute_dtype), tokens.to(compute_dtype))  # [B, E*p, d]
        expert_in = slots_in.view(B, E, p, d).transpose(0, 1).reshape(E, B * p, d)
        expert_out = self.experts(expert_in).view(E, B, p, d).transpose(0, 1).reshape(B, E * p, d)
        y = torch.bmm(combine.to(compute_dtype), expert_out)  # [B, N, d]
        if padding_mask is not None:
            y = y * padding_mask.unsqueeze(2).to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"expert={unwrapped(self.experts).expert!r}")

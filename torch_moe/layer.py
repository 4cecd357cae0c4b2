"""The MoE layer: a drop-in replacement for a Transformer FFN, composed from torch_moe.ops."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops, parallel
from .diagnostics import MoEStats
from .experts import ACTIVATIONS, EXPERT_TYPES, Experts
from .routing import Router

__all__ = ["MoE", "aux_loss", "DROP_POLICIES"]

DROP_POLICIES = ("position", "probability")


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: ``y[t] = sum over kept j of weight[t, j] * expert_{e(t, j)}(x[t])``.

    Args:
        d_model: model width; d_ff: hidden width of each expert; num_experts: E; top_k: experts per token.
        capacity_factor: slots per expert C = max(min_capacity, ceil(capacity_factor * T * top_k / E));
            ``None`` runs dropless (every assignment is computed).
        drop_policy: ``"position"`` (every token's 1st choice before any 2nd choice, GShard) or
            ``"probability"`` (each expert keeps its C most probable assignments).
        normalize_weights: divide the chosen probabilities by their sum; ``None`` means ``top_k > 1``.
        expert: ``"swiglu"``, ``"geglu"`` or ``"mlp"`` (with ``activation`` gelu / relu / silu); ``bias``
            adds b1 [E, d_ff] and b2 [E, d_model].
        aux_loss_coef, z_loss_coef: weights of the load-balancing loss and the router z-loss in ``aux_loss``.
        jitter_eps: multiplicative U(1 - eps, 1 + eps) noise on the router input, training only.
        expert_parallel_group: a ``torch.distributed`` process group of W ranks to shard the experts over: group
            rank r holds experts [r·E/W, (r+1)·E/W) as ``experts.*`` of leading size E/W, the router is replicated,
            tokens travel by all-to-all (see :mod:`torch_moe.parallel`). Every rank of the group must call forward
            (and backward) the same number of times. ``None``: all experts on this process.
        global_load_balancing: compute the load-balancing loss's expert fractions over the whole group (an
            all-reduce of the counts, Megatron's global-batch balancing); needs ``expert_parallel_group``.

    ``forward(x [..., d_model], padding_mask bool [...] | None) -> [..., d_model]``. Padding tokens
    (mask False) take no slot, output zero and are left out of every loss and statistic. After each forward,
    ``aux_loss`` (0-dim tensor with grad) and ``stats`` (:class:`MoEStats`, tensors only) describe it.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: Optional[float] = 1.25,
        min_capacity: int = 4,
        drop_policy: str = "position",
        normalize_weights: Optional[bool] = None,
        expert: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        jitter_eps: float = 0.0,
        expert_parallel_group=None,
        global_load_balancing: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _validate(d_model, d_ff, num_experts, top_k, capacity_factor, min_capacity, drop_policy, expert,
                  activation, jitter_eps)
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_policy = drop_policy
        self.normalize_weights = top_k > 1 if normalize_weights is None else bool(normalize_weights)
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.expert_parallel_group = expert_parallel_group
        self.global_load_balancing = bool(global_load_balancing)
        self.expert_parallel_rank, self.expert_parallel_size = parallel.group_rank_and_size(
            expert_parallel_group, num_experts, self.global_load_balancing)
        factory = {"device": device, "dtype": dtype}
        self.router = Router(d_model, num_experts, top_k, normalize_weights=self.normalize_weights,
                             jitter_eps=jitter_eps, **factory)
        if expert_parallel_group is None:
            self.experts = Experts(d_model, d_ff, num_experts, expert=expert, activation=activation, bias=bias,
                                   **factory)
        else:
            with parallel.local_expert_rng(self.expert_parallel_rank, device):
                self.experts = Experts(d_model, d_ff, num_experts // self.expert_parallel_size, expert=expert,
                                       activation=activation, bias=bias, **factory)
        self.aux_loss: Optional[Tensor] = None
        self.stats: Optional[MoEStats] = None

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for ``num_tokens`` tokens (padding included, so shapes stay static)."""
        assert self.capacity_factor is not None, "capacity() is undefined in dropless mode"
        return max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: the last dim of x must be d_model={self.d_model}, got x of shape {tuple(x.shape)}")
        lead_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.d_model)
        valid = None
        if padding_mask is not None:
            if padding_mask.shape != lead_shape or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"MoE: padding_mask must be a bool tensor of shape {tuple(lead_shape)} (x without its last dim), "
                    f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
                )
            valid = padding_mask.reshape(-1)

        # Padding rows may hold anything (NaN included); zero them for the router so that nothing of theirs
        # reaches router.weight's gradient (0 * NaN would).
        router_input = tokens if valid is None else torch.where(valid.unsqueeze(1), tokens, 0)
        logits, routed = self.router(router_input)
        losses = ops.router_losses(logits, routed.expert_ids, valid)
        expert_input = tokens.to(self.experts.w1.dtype)
        if self.expert_parallel_group is not None:
            y, tokens_per_expert, dropped_fraction = parallel.moe_forward(self, expert_input, routed, valid)
        elif self.dropless:
            row_index, offsets = ops.permute_plan(routed.expert_ids, self.num_experts, valid)
            y = self.experts.forward_dropless(expert_input, routed.weights, row_index, offsets)
            tokens_per_expert = offsets.diff()
            dropped_fraction = torch.zeros((), dtype=logits.dtype, device=logits.device)
        else:
            capacity = self.capacity(tokens.shape[0])
            priority = None
            if self.drop_policy == "probability":
                priority = routed.scores.gather(1, routed.expert_ids)
            plan = ops.capacity_plan(routed.expert_ids, self.num_experts, capacity, self.drop_policy, priority, valid)
            buffer = ops.dispatch(expert_input, routed.expert_ids, plan.slots, self.num_experts, capacity)
            y = ops.combine(self.experts(buffer), routed.weights, routed.expert_ids, plan.slots)
            tokens_per_expert = plan.tokens_per_expert
            assigned = tokens_per_expert.sum()
            dropped = assigned - plan.kept_per_expert.sum()
            dropped_fraction = dropped.to(logits.dtype) / assigned.clamp(min=1).to(logits.dtype)

        load_balancing_loss = losses.load_balancing_loss
        if self.global_load_balancing:
            load_balancing_loss = parallel.global_load_balancing_loss(logits, tokens_per_expert, valid, self.top_k,
                                                                      self.expert_parallel_group)
        self.aux_loss = self.aux_loss_coef * load_balancing_loss + self.z_loss_coef * losses.z_loss
        self.stats = MoEStats(
            tokens_per_expert=tokens_per_expert.detach(),
            dropped_fraction=dropped_fraction.detach(),
            router_entropy=losses.router_entropy.detach(),
            load_balancing_loss=load_balancing_loss.detach(),
            z_loss=losses.z_loss.detach(),
        )
        return y.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, min_capacity={self.min_capacity}, "
            f"drop_policy={self.drop_policy!r}, aux_loss_coef={self.aux_loss_coef}, z_loss_coef={self.z_loss_coef}"
            + (f", expert_parallel=rank {self.expert_parallel_rank} of {self.expert_parallel_size}"
               if self.expert_parallel_group is not None else "")
        )


def _validate(d_model, d_ff, num_experts, top_k, capacity_factor, min_capacity, drop_policy, expert, activation,
              jitter_eps) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"MoE: top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
        raise ValueError(f"MoE: capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
    if not isinstance(min_capacity, int) or isinstance(min_capacity, bool) or min_capacity < 0:
        raise ValueError(f"MoE: min_capacity must be an int >= 0, got {min_capacity!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"MoE: drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if expert not in EXPERT_TYPES:
        raise ValueError(f"MoE: expert must be one of {EXPERT_TYPES}, got {expert!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"MoE: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= jitter_eps < 1.0:
        raise ValueError(f"MoE: jitter_eps must be in [0, 1), got {jitter_eps!r}")


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every :class:`MoE` layer in ``model`` (their last forward); 0 if none ran."""
    total: Optional[Tensor] = None
    for module in model.modules():
        if isinstance(module, MoE) and module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total

"""Dispatch strategies of the MoE layer: how routed tokens reach the experts and come back.

The layer picks one strategy at construction (as Megatron-Core picks its token dispatcher). Each is called with
values, never with the layer: ``strategy(experts, x [T, d], routing, valid [T] | None) -> (y [T, d], Load)``.

- :class:`CapacityDispatch`: each expert takes at most C assignments (the capacity plan decides which), batched
  GEMMs over [E, C, d]; :class:`ExpertChoiceDispatch` is the same with the slots the expert-choice router made.
- :class:`DroplessDispatch`: every assignment is computed, grouped GEMMs over rows sorted by expert.
- :class:`ExpertParallelCapacityDispatch`, :class:`ExpertParallelDroplessDispatch`: the same over an
  expert-parallel group: group rank r holds experts [r·E/W, (r+1)·E/W), tokens travel by all-to-all. Each rank
  routes its own tokens exactly as the single-process layer would (same capacity, same drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from . import distributed, ops
from .experts import ACTIVATIONS, EXPERT_TYPES

__all__ = ["DROP_POLICIES", "Capacity", "Load", "CapacityDispatch", "ExpertChoiceDispatch", "DroplessDispatch",
           "ExpertGroup", "ExpertParallelCapacityDispatch", "ExpertParallelDroplessDispatch"]

DROP_POLICIES = ("position", "probability")

# The most bytes one allocation can have (csrc/common/checks.h kMaxAllocBytes, torch_moe/_fake.py).
_MAX_ALLOC_BYTES = 1 << 47


@dataclass(frozen=True)
class Capacity:
    """Slots per expert for T tokens: C = max(minimum, ceil(factor · T · top_k / E)), padding included so that
    shapes stay static. ``at_most_tokens`` caps C at T (expert choice: an expert cannot take a token twice)."""

    factor: float
    minimum: int
    top_k: int
    num_experts: int
    at_most_tokens: bool = False

    def __call__(self, num_tokens: int) -> int:
        capacity = max(self.minimum, math.ceil(self.factor * num_tokens * self.top_k / self.num_experts))
        capacity = min(num_tokens, capacity) if self.at_most_tokens else capacity
        # The kernels refuse it too, but only this knows which setting made it: factor and minimum are user input.
        if isinstance(capacity, int) and capacity * self.num_experts > 2**63 - 1:
            raise ValueError(f"MoE: capacity_factor={self.factor} and min_capacity={self.minimum} give {capacity} slots "
                             f"per expert for {num_tokens} tokens: num_experts * capacity = {self.num_experts} * "
                             f"{capacity} overflows int64")
        return capacity

    def check_buffer(self, d_model: int, itemsize: int) -> None:
        """Refuses, at construction, settings whose dispatch buffer [E, C, d] could not be allocated even for one
        token (C only grows with T): the kernels would refuse it at the first forward, but only here is it known
        that capacity_factor or min_capacity made it."""
        capacity = self(1)
        numel = self.num_experts * capacity * d_model
        if numel * itemsize > _MAX_ALLOC_BYTES:
            overflow = " (its size num_experts * capacity * d_model overflows int64)" if numel > 2**63 - 1 else ""
            raise ValueError(f"MoE: capacity_factor={self.factor} and min_capacity={self.minimum} give a capacity of "
                             f"{capacity} slots per expert already for one token: the dispatch buffer [E, C, d] = "
                             f"[{self.num_experts}, {capacity}, {d_model}]{overflow} would need {numel * itemsize} "
                             f"bytes, more than the {_MAX_ALLOC_BYTES} bytes one allocation can have")


class Load(NamedTuple):
    """What a dispatch did with the assignments of one forward.

    tokens_per_expert: [E] int64, valid assignments per expert before dropping. dropped_fraction: 0-dim, dropped
    assignments / valid assignments (0 when dropless). slots: [T, k] the slot of each assignment (-1: dropped or
    padding; expert choice [T, E]), ``None`` when dropless.
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    slots: Optional[Tensor]


def _no_drops(weights: Tensor) -> Tensor:
    return torch.zeros((), dtype=weights.dtype, device=weights.device)


def _ffn_expert_ids(routing, num_experts: int) -> tuple[Tensor, Tensor]:
    """(ids for planning [T, k], ids for moving rows [T, k]) when ``routing.active`` marks slots that take no FFN
    row: planning sends those to a sink expert E past the real ones (so they take no slot and no row of experts
    0..E-1; the plan ops refuse -1 ids of valid tokens), moving rows reads only kept slots, whose ids are real."""
    ids = routing.expert_ids
    return torch.where(routing.active, ids, num_experts), torch.where(routing.active, ids, 0)


class CapacityDispatch:
    """Capacity mode: the capacity plan gives each kept assignment a slot of its expert, ``dispatch`` copies the
    tokens into [E, C, d], the experts run batched, ``combine`` sums the weighted outputs back per token.

    Subclasses change one step each: :meth:`plan` (who gets a slot), :meth:`prepare` (the buffer's capacity) and
    :meth:`run_experts` (where the experts run).
    """

    def __init__(self, num_experts: int, capacity: Capacity, drop_policy: str) -> None:
        self.num_experts = num_experts
        self.capacity = capacity
        self.drop_policy = drop_policy

    def plan(self, routing, valid: Optional[Tensor], capacity: int) -> Load:
        priority = routing.scores.gather(1, routing.expert_ids) if self.drop_policy == "probability" else None
        if routing.active is None:
            plan = ops.capacity_plan(routing.expert_ids, self.num_experts, capacity, self.drop_policy, priority, valid)
            tokens_per_expert, kept_per_expert, slots = plan.tokens_per_expert, plan.kept_per_expert, plan.slots
        else:
            plan_ids, _ = _ffn_expert_ids(routing, self.num_experts)
            plan = ops.capacity_plan(plan_ids, self.num_experts + 1, capacity, self.drop_policy, priority, valid)
            tokens_per_expert = plan.tokens_per_expert[:self.num_experts]
            kept_per_expert = plan.kept_per_expert[:self.num_experts]
            slots = torch.where(routing.active, plan.slots, -1)
        assigned = tokens_per_expert.sum()
        dropped = assigned - kept_per_expert.sum()
        dtype = routing.weights.dtype
        return Load(tokens_per_expert, dropped.to(dtype) / assigned.clamp(min=1).to(dtype), slots)

    def prepare(self, x: Tensor, capacity: int) -> tuple[int, Optional[Tensor]]:
        """(the buffer's capacity, what :meth:`run_experts` needs besides the buffer)."""
        return capacity, None

    def run_experts(self, experts, buffer: Tensor, context: Optional[Tensor]) -> Tensor:
        return experts(buffer)

    def summed_over_group(self, counts: Tensor) -> Tensor:
        """Counts as the replicated router state must see them: here this process's own."""
        return counts

    def __call__(self, experts, x: Tensor, routing, valid: Optional[Tensor]) -> tuple[Tensor, Load]:
        capacity = self.capacity(x.shape[0])
        buffer_capacity, context = self.prepare(x, capacity)
        load = self.plan(routing, valid, capacity)
        expert_ids = routing.expert_ids if routing.active is None else _ffn_expert_ids(routing, self.num_experts)[1]
        buffer = ops.dispatch(x, expert_ids, load.slots, self.num_experts, buffer_capacity)
        out = self.run_experts(experts, buffer, context)
        return ops.combine(out, routing.weights, expert_ids, load.slots), load


class ExpertChoiceDispatch(CapacityDispatch):
    """Expert choice: the router already chose each expert's C tokens; its slots are the plan, nothing drops."""

    def plan(self, routing, valid: Optional[Tensor], capacity: int) -> Load:
        return Load((routing.slots >= 0).sum(0), _no_drops(routing.weights), routing.slots)


class DroplessDispatch:
    """Dropless mode: rows sorted by expert, grouped GEMMs with the permutation fused into the first projections
    and the weighted combine into the last (:meth:`Experts.forward_dropless`, reached through ``experts(...)``)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def summed_over_group(self, counts: Tensor) -> Tensor:
        return counts

    def __call__(self, experts, x: Tensor, routing, valid: Optional[Tensor]) -> tuple[Tensor, Load]:
        if routing.active is None:
            row_index, offsets = ops.permute_plan(routing.expert_ids, self.num_experts, valid)
        else:  # inactive slots sort last, to a sink expert whose rows the grouped GEMMs never read
            row_index, offsets = ops.permute_plan(_ffn_expert_ids(routing, self.num_experts)[0], self.num_experts + 1,
                                                  valid)
            row_index, offsets = torch.where(routing.active, row_index, -1), offsets[:self.num_experts + 1]
        y = experts(x, offsets, routing.weights, row_index)
        return y, Load(offsets.diff(), _no_drops(routing.weights), None)


# --------------------------------------------------------------------------------------------------
# expert parallelism

_CHOICES = {"expert": EXPERT_TYPES, "activation": tuple(ACTIVATIONS), "drop_policy": DROP_POLICIES}
_FLAGS = ("bias", "normalize_weights", "global_load_balancing", "up_bias", "router_bias")
# Float options, None when the layer has no such option (swiglu_* outside expert="swiglu_oss"; None: dropless).
_FLOATS = {"capacity_factor": "None (dropless)", "swiglu_alpha": "None", "swiglu_limit": "None"}


def _encode(name: str, value) -> int:
    if name in _CHOICES:
        return distributed.code_of(value, _CHOICES[name])
    if name in _FLOATS:
        return -1 if value is None else distributed.encode_float(value)
    return int(value)


def _describe(name: str, code: int) -> str:
    choices = _CHOICES.get(name)
    if choices is not None:
        return repr(choices[code]) if 0 <= code < len(choices) else f"#{code}"
    if name in _FLOATS:
        return _FLOATS[name] if code == -1 else repr(distributed.decode_float(code))
    if name in _FLAGS:
        return str(bool(code))
    return distributed.describe_code(name, code)


class ExpertGroup:
    """An expert-parallel group as the strategies use it: the group, this process's rank and the group size, and
    the layer configuration every rank must agree on before each exchange (``config``: name -> int, float, bool,
    str of a known choice or None, in the order the mismatch message lists them)."""

    def __init__(self, group, rank: int, size: int, config: Mapping[str, object]) -> None:
        self.group, self.rank, self.size = group, rank, size
        self.signature = {name: _encode(name, value) for name, value in config.items()}

    def agree(self, x: Tensor, capacity: Optional[int]) -> list[dict[str, int]]:
        """Checks the ranks agree (raising the same RuntimeError on each otherwise); returns every rank's
        ``num_tokens`` and ``capacity``."""
        shared = dict(self.signature, dtype=distributed.code_of(x.dtype, distributed.DTYPES),
                      grad_mode=int(torch.is_grad_enabled()))
        return distributed.agree(self.group, "moe_forward", shared,
                                 {"num_tokens": x.shape[0], "capacity": capacity or 0}, x.device, describe=_describe)


class _OverGroup:
    """What both expert-parallel strategies share: their ExpertGroup, and the router's load summed over it."""

    group: ExpertGroup

    def summed_over_group(self, counts: Tensor) -> Tensor:
        return distributed.all_reduce_sum(counts, self.group.group)


class ExpertParallelCapacityDispatch(_OverGroup, CapacityDispatch):
    """Capacity mode over an expert-parallel group. Drops follow this rank's own C = capacity(T_local), exactly as
    the single-process layer on these tokens. The exchanged buffers have the group's largest C, so every
    all_to_all_single has equal, static splits; slots at or past this rank's C stay empty and are never read back
    by combine."""

    def __init__(self, num_experts: int, capacity: Capacity, drop_policy: str, group: ExpertGroup) -> None:
        super().__init__(num_experts, capacity, drop_policy)
        self.group = group

    def prepare(self, x: Tensor, capacity: int) -> tuple[int, Optional[Tensor]]:
        peers = self.group.agree(x, capacity)
        return max(peer["capacity"] for peer in peers), distributed.anchor(x.device)

    def run_experts(self, experts, buffer: Tensor, anchor: Optional[Tensor]) -> Tensor:
        num_experts, exchange_capacity, d = buffer.shape
        if exchange_capacity == 0:  # the group agreed on the capacity, so either every rank exchanges or none does
            return buffer
        world_size, local_experts = self.group.size, num_experts // self.group.size
        received = distributed.AllToAll.apply(buffer, anchor, None, None, self.group.group)  # [W, E/W, Cx, d]
        local = received.view(world_size, local_experts, exchange_capacity, d).transpose(0, 1)
        local = local.reshape(local_experts, world_size * exchange_capacity, d)
        out = experts(local)
        if torch.is_grad_enabled() and not out.requires_grad:
            out = distributed.KeepConnected.apply(out, local)
        back = out.view(local_experts, world_size, exchange_capacity, d).transpose(0, 1).reshape(num_experts,
                                                                                                 exchange_capacity, d)
        return distributed.AllToAll.apply(back, anchor, None, None, self.group.group)


class ExpertParallelDroplessDispatch(_OverGroup, DroplessDispatch):
    """Dropless mode over an expert-parallel group: the counts are exchanged first (one host read, as every
    dropless all-to-all needs the split sizes), then the sorted rows, then the expert outputs back."""

    def __init__(self, num_experts: int, group: ExpertGroup) -> None:
        super().__init__(num_experts)
        self.group = group

    def __call__(self, experts, x: Tensor, routing, valid: Optional[Tensor]) -> tuple[Tensor, Load]:
        self.group.agree(x, None)
        anchor = distributed.anchor(x.device)
        group, world_size = self.group.group, self.group.size
        num_experts, local_experts = self.num_experts, self.num_experts // self.group.size
        if routing.active is None:
            permuted = ops.permute(x, routing.expert_ids, num_experts, valid)
            tokens_per_expert = permuted.offsets.diff()
        else:  # inactive slots sort last, to a sink expert: never sent, their rows count as padding below
            permuted = ops.permute(x, _ffn_expert_ids(routing, num_experts)[0], num_experts + 1, valid)
            permuted = permuted._replace(row_index=torch.where(routing.active, permuted.row_index, -1))
            tokens_per_expert = permuted.offsets.diff()[:num_experts]
        # Counts first (E per rank, equal splits): afterwards every rank knows what it sends and receives.
        received_counts = distributed.exchange(tokens_per_expert, None, None, group)  # [W (source) * E/W]
        counts = torch.cat([tokens_per_expert, received_counts]).tolist()  # dropless needs the sizes on the host
        sent, got = counts[:num_experts], counts[num_experts:]
        input_splits = [sum(sent[s * local_experts:(s + 1) * local_experts]) for s in range(world_size)]
        output_splits = [sum(got[s * local_experts:(s + 1) * local_experts]) for s in range(world_size)]
        num_sent = sum(input_splits)

        received = distributed.AllToAll.apply(permuted.rows[:num_sent], anchor, output_splits, input_splits, group)
        # Received rows come source-major (then expert); the grouped GEMM wants them expert-major.
        per_expert = [sum(got[s * local_experts + e] for s in range(world_size)) for e in range(local_experts)]
        offsets = torch.tensor([0] + per_expert, dtype=torch.int64, device=received.device).cumsum(0)
        order = inverse = None
        if local_experts > 1 and world_size > 1:
            expert_of_row = torch.arange(local_experts, device=received.device).repeat(world_size)
            expert_of_row = expert_of_row.repeat_interleave(torch.tensor(got, device=received.device),
                                                            output_size=received.shape[0])
            order = torch.argsort(expert_of_row, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
        out = experts(received if order is None else received.index_select(0, order), offsets)
        if torch.is_grad_enabled() and not out.requires_grad:
            out = distributed.KeepConnected.apply(out, received)
        if inverse is not None:
            out = out.index_select(0, inverse)

        returned = distributed.AllToAll.apply(out, anchor, input_splits, output_splits, group)  # this rank's order
        padding_rows = permuted.rows.shape[0] - num_sent
        if padding_rows:
            returned = torch.cat([returned, returned.new_zeros(padding_rows, returned.shape[1])])
        y = ops.unpermute(returned, routing.weights, permuted.row_index)
        return y, Load(tokens_per_expert, _no_drops(routing.weights), None)

"""Expert parallelism on torch.distributed: the differentiable all-to-all, the agreement check that precedes every
exchange, the expert-parallel forward of ``MoE``, group-wide load balancing and checkpoint (re)sharding.

Layout: with W ranks in the group and E experts, group rank r holds experts [r·E/W, (r+1)·E/W) as its
``experts.w1`` etc. of leading size E/W; the router is replicated. Each rank routes its own tokens exactly as the
single-process layer would (same capacity, same drops), sends every kept assignment to the rank that holds its
expert, and gets the expert's output back.

Hangs are the failure mode of collectives, so every exchange starts with one fixed-size all-gather of a signature
(the layer's configuration, the exchange dtype, the grad mode and the per-rank sizes); a disagreement raises the
same ``RuntimeError`` on every rank. All later collectives of that exchange have sizes derived from the checked
values (or from counts exchanged after the check), so they agree by construction, backward included.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops
from .experts import ACTIVATIONS, EXPERT_TYPES

__all__ = [
    "all_to_all",
    "expert_parameter_names",
    "full_state_dict",
    "shard_state_dict",
    "split_expert_state_dict",
    "merge_expert_shards",
    "EXPERT_PARAMETERS",
]

# Parameters of ``Experts`` that are sharded over the expert-parallel group (leading dim E/W per rank).
EXPERT_PARAMETERS = ("w1", "w2", "w3", "b1", "b2")
_EXPERT_KEY = re.compile(r"(?:^|\.)experts\.(?:w1|w2|w3|b1|b2)$")

# What a signature row is about: ranks that reach different collectives are told so instead of exchanging garbage.
_SITES = {"moe_forward": 0x4D6F4501, "all_to_all": 0x4D6F4502, "gather_state": 0x4D6F4503}
_SITE_NAMES = {code: name for name, code in _SITES.items()}
_SIGNATURE_FIXED = 32  # fields before the per-rank split sizes; every signature row of a group has one length

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool, torch.complex64, torch.complex128, torch.int16, torch.int8)
_EXPERT_TYPES = EXPERT_TYPES
_ACTIVATIONS = tuple(ACTIVATIONS)
_DROP_POLICIES = ("position", "probability")  # layer.DROP_POLICIES (layer imports this module)


# --------------------------------------------------------------------------------------------------
# group checks


def group_rank_and_size(group, num_experts: int, global_load_balancing: bool) -> tuple[int, int]:
    """Validates ``expert_parallel_group`` at construction; returns (rank in the group, group size)."""
    if group is None:
        if global_load_balancing:
            raise ValueError("MoE: global_load_balancing=True needs an expert_parallel_group to balance over")
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("MoE: expert_parallel_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("MoE: this process is not a member of expert_parallel_group")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"MoE: expert_parallel_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("MoE: this process is not a member of expert_parallel_group")
    if num_experts % size != 0:
        raise ValueError(
            f"MoE: num_experts={num_experts} must be divisible by the size of expert_parallel_group ({size})"
        )
    return rank, size


@contextlib.contextmanager
def local_expert_rng(rank: int, device) -> Iterator[None]:
    """Initialises a rank's expert shard from its own RNG stream.

    Ranks are usually seeded alike (so that the replicated router starts equal); drawn from the global RNG, every
    rank's shard would then hold the same experts. One seed is drawn from the global RNG (the same draw on every
    rank, which keeps the global streams in step) and offset by the rank for the shard; the global RNG state is
    restored afterwards.
    """
    seed = int(torch.randint(0, 2**62, ()).item())
    resolved = torch.empty(0, device=device).device
    cuda_devices = []
    if resolved.type == "cuda":
        cuda_devices = [resolved.index if resolved.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed + rank)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(seed + rank)
        yield


def _signature_device(group, data_device: torch.device) -> torch.device:
    # Host-side values are checked on the CPU when the group has a gloo backend (plain "gloo", or
    # "cpu:gloo,cuda:nccl"): then the check never waits on the GPU stream.
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or data_device.type == "cpu":
        return torch.device("cpu")
    return data_device


def _encode_float(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _decode_float(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def _code(value, choices: Sequence) -> int:
    return choices.index(value) if value in choices else len(choices)


def _describe(name: str, code: int) -> str:
    if name == "dtype":
        return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else f"dtype#{code}"
    choices = {"expert": _EXPERT_TYPES, "activation": _ACTIVATIONS, "drop_policy": _DROP_POLICIES}.get(name)
    if choices is not None:
        return repr(choices[code]) if 0 <= code < len(choices) else f"#{code}"
    if name == "capacity_factor":
        return "None (dropless)" if code == -1 else repr(_decode_float(code))
    if name == "grad_mode":
        return "enabled" if code else "disabled"
    if name in ("bias", "normalize_weights", "global_load_balancing", "dropless", "gated"):
        return str(bool(code))
    return str(code)


def _agree(group, site: str, shared: Mapping[str, int], own: Mapping[str, int], data_device: torch.device,
           splits: Optional[Sequence[int]] = None) -> list[dict[str, int]]:
    """All-gathers one fixed-size int64 row per rank and checks that every rank agrees on ``shared``.

    ``own`` holds per-rank values (returned for every rank); ``splits`` ([2W], optional) per-rank split sizes.
    Raises the same RuntimeError on every rank when the ranks disagree, so none of them is left waiting.
    """
    world_size = dist.get_world_size(group)
    names = list(shared) + list(own)
    if len(names) + 1 > _SIGNATURE_FIXED:
        raise AssertionError("signature too long")
    row = [_SITES[site]] + [int(v) for v in shared.values()] + [int(v) for v in own.values()]
    row += [0] * (_SIGNATURE_FIXED - len(row))
    row += list(splits) if splits is not None else [0] * (2 * world_size)
    device = _signature_device(group, data_device)
    local = torch.tensor(row, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    rows = torch.stack(gathered).tolist()  # the one host read of the check

    if any(r[0] != rows[0][0] for r in rows):
        where = ", ".join(f"rank {i}: {_SITE_NAMES.get(r[0], 'unknown collective')}" for i, r in enumerate(rows))
        raise RuntimeError(
            f"torch_moe expert parallelism: the ranks of the group reached different collectives ({where}); every "
            "rank must run the same expert-parallel layers in the same order"
        )
    mismatches = []
    for i, name in enumerate(shared, start=1):
        values = [r[i] for r in rows]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {rank}: {_describe(name, v)}" for rank, v in enumerate(values))
            mismatches.append(f"{name} ({per_rank})")
    if mismatches:
        raise RuntimeError(
            f"torch_moe expert parallelism ({site}): the ranks of the group disagree on " + "; ".join(mismatches)
            + ". Every rank must build the layer with the same configuration and call it the same way."
        )
    first_own = 1 + len(shared)
    result = []
    for r in rows:
        entry = {name: r[first_own + j] for j, name in enumerate(own)}
        entry["_splits"] = r[_SIGNATURE_FIXED:]
        result.append(entry)
    return result


# --------------------------------------------------------------------------------------------------
# the exchange


def _exchange(x: Tensor, output_split_sizes: Optional[list[int]], input_split_sizes: Optional[list[int]],
              group) -> Tensor:
    x = x.contiguous()
    if output_split_sizes is None:
        out = torch.empty_like(x)
    else:
        out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single forward; the reverse all_to_all_single (splits swapped) backward.

    ``anchor`` is a 0-element leaf that requires grad whenever grad mode is on: it makes autograd record the
    exchange (and so run its backward collective) on every rank, also on a rank whose own input needs no grad.
    """

    @staticmethod
    def forward(ctx, x, anchor, output_split_sizes, input_split_sizes, group):
        ctx.group = group
        ctx.output_split_sizes = output_split_sizes
        ctx.input_split_sizes = input_split_sizes
        return _exchange(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_x = _exchange(grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group)
        return grad_x, None, None, None, None


class _KeepConnected(torch.autograd.Function):
    """Returns ``out`` unchanged but ties it to ``inp`` in the graph (zero gradient), so that the backward of the
    exchange that produced ``inp`` runs even when ``out`` was computed without it (no rows to compute)."""

    @staticmethod
    def forward(ctx, out, inp):
        ctx.inp_shape, ctx.inp_dtype, ctx.inp_device = inp.shape, inp.dtype, inp.device
        return out.view_as(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        zero = torch.zeros((), dtype=ctx.inp_dtype, device=ctx.inp_device).expand(ctx.inp_shape)
        return grad, zero


def _anchor(device) -> Optional[Tensor]:
    return torch.empty(0, device=device, requires_grad=True) if torch.is_grad_enabled() else None


def all_to_all(
    x: Tensor,
    group=None,
    output_split_sizes: Optional[Sequence[int]] = None,
    input_split_sizes: Optional[Sequence[int]] = None,
    *,
    check: bool = True,
) -> Tensor:
    """Differentiable ``all_to_all_single``: x [N, ...] -> [sum(output_split_sizes), ...].

    Without split sizes, x is cut into W equal chunks along dim 0 (N divisible by W). The backward is the reverse
    exchange. ``check=True`` first all-gathers every rank's split sizes, row shape and dtype and raises
    ``RuntimeError`` on every rank if they do not match (rank r's input split for s must equal rank s's output
    split for r), instead of leaving the collective to hang or corrupt memory.
    """
    group = group if group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    if (output_split_sizes is None) != (input_split_sizes is None):
        raise ValueError("all_to_all: give both output_split_sizes and input_split_sizes, or neither")
    rows = x.shape[0] if x.dim() > 0 else 0
    if input_split_sizes is None:
        out_splits = in_splits = None
        check_in = check_out = [rows // world_size] * world_size
    else:
        out_splits, in_splits = [int(s) for s in output_split_sizes], [int(s) for s in input_split_sizes]
        check_in, check_out = in_splits, out_splits
    # Bad local arguments are reported through the check when there is one, so the other ranks are not left
    # waiting in it.
    problem = None
    if x.dim() == 0:
        problem = "x must have at least one dim"
    elif input_split_sizes is None and rows % world_size != 0:
        problem = f"equal splits need dim 0 ({rows}) divisible by the group size ({world_size})"
    elif input_split_sizes is not None:
        for name, splits in (("output_split_sizes", out_splits), ("input_split_sizes", in_splits)):
            if problem is None and (len(splits) != world_size or any(size < 0 for size in splits)):
                problem = f"{name} must be {world_size} sizes >= 0, got {splits}"
        if problem is None and sum(in_splits) != rows:
            problem = f"input_split_sizes sum to {sum(in_splits)}, x has {rows} rows"
        if problem is not None:
            check_in = check_out = [0] * world_size
    if problem is not None and not check:
        raise ValueError(f"all_to_all: {problem}")
    if check:
        peers = _agree(group, "all_to_all", {"row_numel": math.prod(x.shape[1:]), "dtype": _code(x.dtype, _DTYPES)},
                       {"bad_arguments": problem is not None}, x.device, splits=check_in + check_out)
        if problem is not None:
            raise ValueError(f"all_to_all: {problem}")
        faulty = [rank for rank, peer in enumerate(peers) if peer["bad_arguments"]]
        if faulty:
            raise RuntimeError(f"all_to_all: the arguments of rank(s) {faulty} are invalid (see the error there)")
        # Entry `world_size + s` of rank d's splits is what d expects from s; every rank computes the same verdict
        # from the same gathered rows, so the raise is unanimous.
        bad = [(src, dst) for src in range(world_size) for dst in range(world_size)
               if peers[src]["_splits"][dst] != peers[dst]["_splits"][world_size + src]]
        if bad:
            pairs = "; ".join(f"rank {src} sends {peers[src]['_splits'][dst]} rows to rank {dst}, which expects "
                              f"{peers[dst]['_splits'][world_size + src]}" for src, dst in bad)
            raise RuntimeError(f"all_to_all: split sizes disagree across ranks: {pairs}")
    return _AllToAll.apply(x, _anchor(x.device), out_splits, in_splits, group)


# --------------------------------------------------------------------------------------------------
# the expert-parallel forward of MoE


def _layer_signature(layer, dtype: torch.dtype) -> dict[str, int]:
    experts = layer.experts
    return {
        "world_size": layer.expert_parallel_size,
        "num_experts": layer.num_experts,
        "d_model": layer.d_model,
        "d_ff": layer.d_ff,
        "top_k": layer.top_k,
        "expert": _code(experts.expert, _EXPERT_TYPES),
        "activation": _code(experts.activation, _ACTIVATIONS),
        "bias": int(experts.b1 is not None),
        "capacity_factor": -1 if layer.capacity_factor is None else _encode_float(layer.capacity_factor),
        "min_capacity": layer.min_capacity,
        "drop_policy": _code(layer.drop_policy, _DROP_POLICIES),
        "normalize_weights": int(layer.normalize_weights),
        "global_load_balancing": int(layer.global_load_balancing),
        "dtype": _code(dtype, _DTYPES),
        "grad_mode": int(torch.is_grad_enabled()),
    }


def moe_forward(layer, expert_input: Tensor, routed: ops.RouterOutput,
                valid: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The expert part of an expert-parallel ``MoE`` forward.

    expert_input: [T, d] this rank's tokens in the experts' dtype; routed: this rank's routing (global expert ids);
    valid: [T] bool or None. Returns (y [T, d], tokens_per_expert [E] before dropping, dropped_fraction 0-dim,
    slots [T, k] of the capacity plan or None when dropless).
    """
    group = layer.expert_parallel_group
    num_tokens = expert_input.shape[0]
    capacity = None if layer.dropless else layer.capacity(num_tokens)
    peers = _agree(group, "moe_forward", _layer_signature(layer, expert_input.dtype),
                   {"num_tokens": num_tokens, "capacity": capacity or 0}, expert_input.device)
    anchor = _anchor(expert_input.device)
    if layer.dropless:
        return _dropless_forward(layer, expert_input, routed, valid, anchor)
    exchange_capacity = max(peer["capacity"] for peer in peers)
    return _capacity_forward(layer, expert_input, routed, valid, capacity, exchange_capacity, anchor)


def _capacity_forward(layer, expert_input, routed, valid, capacity: int, exchange_capacity: int, anchor):
    # Drops follow this rank's own capacity C = capacity(T_local), exactly as the single-process layer on these
    # tokens. The exchanged buffers have the group's largest C, so every all_to_all_single has equal, static
    # splits; slots at or past this rank's C stay empty and are never read back by combine.
    group, world_size = layer.expert_parallel_group, layer.expert_parallel_size
    num_experts, local_experts, d = layer.num_experts, layer.experts.num_experts, expert_input.shape[1]
    priority = routed.scores.gather(1, routed.expert_ids) if layer.drop_policy == "probability" else None
    plan = ops.capacity_plan(routed.expert_ids, num_experts, capacity, layer.drop_policy, priority, valid)
    buffer = ops.dispatch(expert_input, routed.expert_ids, plan.slots, num_experts, exchange_capacity)  # [E, Cx, d]
    if exchange_capacity > 0:  # the group agreed on Cx, so either every rank exchanges or none does
        received = _AllToAll.apply(buffer, anchor, None, None, group)  # [W (source), E/W, Cx, d] as [E, Cx, d]
        local = received.view(world_size, local_experts, exchange_capacity, d).transpose(0, 1)
        local = local.reshape(local_experts, world_size * exchange_capacity, d)
        out = layer.experts(local)
        if torch.is_grad_enabled() and not out.requires_grad:
            out = _KeepConnected.apply(out, local)
        back = out.view(local_experts, world_size, exchange_capacity, d).transpose(0, 1).reshape(num_experts,
                                                                                                 exchange_capacity, d)
        buffer = _AllToAll.apply(back, anchor, None, None, group)
    y = ops.combine(buffer, routed.weights, routed.expert_ids, plan.slots)
    tokens_per_expert = plan.tokens_per_expert
    assigned = tokens_per_expert.sum()
    dropped = assigned - plan.kept_per_expert.sum()
    dropped_fraction = dropped.to(routed.weights.dtype) / assigned.clamp(min=1).to(routed.weights.dtype)
    return y, tokens_per_expert, dropped_fraction, plan.slots


def _dropless_forward(layer, expert_input, routed, valid, anchor):
    group, world_size = layer.expert_parallel_group, layer.expert_parallel_size
    num_experts, local_experts = layer.num_experts, layer.experts.num_experts
    permuted = ops.permute(expert_input, routed.expert_ids, num_experts, valid)
    tokens_per_expert = permuted.offsets.diff()
    # Counts first (E per rank, equal splits): afterwards every rank knows what it sends and receives.
    received_counts = _exchange(tokens_per_expert, None, None, group)  # [W (source) * E/W]
    counts = torch.cat([tokens_per_expert, received_counts]).tolist()  # dropless needs the sizes on the host
    sent, got = counts[:num_experts], counts[num_experts:]
    input_splits = [sum(sent[s * local_experts:(s + 1) * local_experts]) for s in range(world_size)]
    output_splits = [sum(got[s * local_experts:(s + 1) * local_experts]) for s in range(world_size)]
    num_sent = sum(input_splits)

    received = _AllToAll.apply(permuted.rows[:num_sent], anchor, output_splits, input_splits, group)
    # Received rows come source-major (then expert); the grouped GEMM wants them expert-major.
    per_expert = [sum(got[s * local_experts + e] for s in range(world_size)) for e in range(local_experts)]
    offsets = torch.tensor([0] + per_expert, dtype=torch.int64, device=received.device).cumsum(0)
    if local_experts > 1 and world_size > 1:
        expert_of_row = torch.arange(local_experts, device=received.device).repeat(world_size)
        expert_of_row = expert_of_row.repeat_interleave(torch.tensor(got, device=received.device),
                                                        output_size=received.shape[0])
        order = torch.argsort(expert_of_row, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = layer.experts.forward_grouped(received.index_select(0, order), offsets)
        if torch.is_grad_enabled() and not out.requires_grad:
            out = _KeepConnected.apply(out, received)
        out = out.index_select(0, inverse)
    else:
        out = layer.experts.forward_grouped(received, offsets)
        if torch.is_grad_enabled() and not out.requires_grad:
            out = _KeepConnected.apply(out, received)

    returned = _AllToAll.apply(out, anchor, input_splits, output_splits, group)  # [num_sent, d], this rank's order
    padding_rows = permuted.rows.shape[0] - num_sent
    if padding_rows:
        returned = torch.cat([returned, returned.new_zeros(padding_rows, returned.shape[1])])
    y = ops.unpermute(returned, routed.weights, permuted.row_index)
    dropped_fraction = torch.zeros((), dtype=routed.weights.dtype, device=routed.weights.device)
    return y, tokens_per_expert, dropped_fraction, None


def all_reduce_sum(counts: Tensor, group) -> Tensor:
    """A detached copy of ``counts`` summed over ``group`` (no host sync; every rank of the group must call it)."""
    total = counts.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def global_load_balancing_loss(logits: Tensor, tokens_per_expert: Tensor, valid: Optional[Tensor], top_k: int,
                               group) -> Tensor:
    """Load-balancing loss with f_i counted over the whole group (Megatron's global-batch balancing).

    f_i = (assignments to i on all ranks) / (all assignments), from an all-reduce of ``tokens_per_expert`` (no host
    sync); P_i = (sum of probs[t, i] over this rank's valid tokens) · W / (valid tokens on all ranks). The mean over
    the ranks of the returned loss equals the single-process loss on all ranks' tokens together, and so does its
    gradient up to the factor W (each rank differentiates its own share).
    """
    world_size = dist.get_world_size(group)
    num_experts = logits.shape[1]
    global_counts = all_reduce_sum(tokens_per_expert, group)
    probs = torch.softmax(logits, dim=-1)
    if valid is not None:
        probs = torch.where(valid.unsqueeze(1), probs, 0)
    prob_sum = probs.sum(dim=0)
    assignments = global_counts.sum().to(probs.dtype)
    valid_tokens = assignments / top_k
    f = global_counts.to(probs.dtype) / assignments.clamp(min=1)
    return num_experts * world_size * (f * prob_sum).sum() / valid_tokens.clamp(min=1)


# --------------------------------------------------------------------------------------------------
# parameters and checkpoints


def _expert_parallel_layers(model) -> list[tuple[str, object]]:
    from .layer import MoE

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, MoE) and getattr(m, "expert_parallel_group", None) is not None]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``/``state_dict()``) of the expert-parallel parameters: the
    ``experts.*`` of every MoE layer built with an ``expert_parallel_group``. These differ across ranks and must
    not be all-reduced by DDP; everything else is replicated."""
    names = []
    for prefix, layer in _expert_parallel_layers(model):
        for name, _ in layer.experts.named_parameters():
            names.append(_join(prefix, f"experts.{name}"))
    return names


def _check_divisible(key: str, tensor: Tensor, world_size: int) -> int:
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if tensor.dim() == 0 or tensor.shape[0] % world_size != 0:
        raise ValueError(
            f"{key}: {tensor.shape[0] if tensor.dim() else 'a scalar'} experts cannot be split over {world_size} ranks "
            "(the world size must divide the number of experts)"
        )
    return tensor.shape[0] // world_size


def _is_expert_key(key: str, prefixes: Optional[Iterable[str]]) -> bool:
    if prefixes is None:
        return _EXPERT_KEY.search(key) is not None
    return any(key == _join(p, f"experts.{name}") for p in prefixes for name in EXPERT_PARAMETERS)


def split_expert_state_dict(state_dict: Mapping[str, Tensor], world_size: int, rank: int, *,
                            prefixes: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """Rank ``rank``'s shard of a single-process ``state_dict`` for an expert-parallel group of ``world_size``.

    Expert tensors (``<layer>.experts.{w1,w2,w3,b1,b2}``; ``prefixes`` names the MoE layers exactly, otherwise
    keys are recognised by that suffix) keep experts [rank·E/W, (rank+1)·E/W); everything else is kept whole.
    ValueError when ``world_size`` does not divide E. No communication.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    prefixes = None if prefixes is None else list(prefixes)
    shard = {}
    for key, value in state_dict.items():
        if _is_expert_key(key, prefixes):
            per_rank = _check_divisible(key, value, world_size)
            value = value[rank * per_rank:(rank + 1) * per_rank].clone()
        shard[key] = value
    return shard


def merge_expert_shards(shards: Sequence[Mapping[str, Tensor]], *,
                        prefixes: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """The single-process ``state_dict`` from the W per-rank state_dicts (in group-rank order), e.g. loaded from
    the files each rank saved: expert tensors are concatenated along dim 0, the rest is taken from rank 0."""
    if len(shards) == 0:
        raise ValueError("merge_expert_shards: no shards given")
    prefixes = None if prefixes is None else list(prefixes)
    keys = list(shards[0].keys())
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard.keys()) != keys:
            missing = sorted(set(keys) ^ set(shard.keys()))
            raise ValueError(f"merge_expert_shards: shard {rank} has different keys than shard 0: {missing}")
    merged = {}
    for key in keys:
        if _is_expert_key(key, prefixes):
            parts = [shard[key] for shard in shards]
            if len({tuple(p.shape) for p in parts}) != 1:
                raise ValueError(f"merge_expert_shards: {key} has different shapes across shards: "
                                 f"{[tuple(p.shape) for p in parts]}")
            merged[key] = torch.cat(parts, dim=0)
        else:
            merged[key] = shards[0][key]
    return merged


def shard_state_dict(state_dict: Mapping[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """This rank's part of a single-process ``state_dict`` for ``model`` (built with expert parallelism), ready for
    ``model.load_state_dict``. Each MoE layer takes the slice of its own group rank; works for any group size that
    divides E (ValueError otherwise). No communication."""
    shard = dict(state_dict)
    for prefix, layer in _expert_parallel_layers(model):
        rank, world_size = layer.expert_parallel_rank, layer.expert_parallel_size
        for name in EXPERT_PARAMETERS:
            key = _join(prefix, f"experts.{name}")
            if key in shard:
                per_rank = _check_divisible(key, shard[key], world_size)
                shard[key] = shard[key][rank * per_rank:(rank + 1) * per_rank].clone()
    return shard


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` the model would have without expert parallelism, on every rank.

    Collective: every rank of each expert-parallel layer's group must call it. Expert shards are all-gathered
    (after a check that every rank holds the same layer layout) and concatenated in group-rank order.
    """
    state = model.state_dict()
    for prefix, layer in _expert_parallel_layers(model):
        group, world_size = layer.expert_parallel_group, layer.expert_parallel_size
        names = [name for name, _ in layer.experts.named_parameters()]
        w1 = layer.experts.w1
        _agree(group, "gather_state", {
            "world_size": world_size,
            "local_experts": layer.experts.num_experts,
            "d_model": layer.d_model,
            "d_ff": layer.d_ff,
            "expert_parameters": sum(1 << EXPERT_PARAMETERS.index(n) for n in names),
            "dtype": _code(w1.dtype, _DTYPES),
        }, {}, w1.device)
        for name in names:
            key = _join(prefix, f"experts.{name}")
            shard = state[key].contiguous()
            parts = [torch.empty_like(shard) for _ in range(world_size)]
            dist.all_gather(parts, shard, group=group)
            state[key] = torch.cat(parts, dim=0)
    return state

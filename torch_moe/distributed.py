"""Collectives for expert parallelism on torch.distributed, below the layers: the differentiable all-to-all, the
agreement check that precedes every exchange, the all-reduce of counts, and the group and RNG helpers.

Hangs are the failure mode of collectives, so every exchange starts with one fixed-size all-gather of a signature
(the caller's configuration, the exchange dtype, the grad mode and the per-rank sizes); a disagreement raises the
same ``RuntimeError`` on every rank. All later collectives of that exchange have sizes derived from the checked
values (or from counts exchanged after the check), so they agree by construction, backward included.
"""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["all_to_all", "all_reduce_sum", "agree", "group_rank_and_size", "local_expert_rng"]

# What a signature row is about: ranks that reach different collectives are told so instead of exchanging garbage.
_SITES = {"moe_forward": 0x4D6F4501, "all_to_all": 0x4D6F4502, "gather_state": 0x4D6F4503}
_SITE_NAMES = {code: name for name, code in _SITES.items()}
_SIGNATURE_FIXED = 32  # fields before the per-rank split sizes; every signature row of a group has one length

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64, torch.complex128, torch.int16, torch.int8)


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


def encode_float(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def decode_float(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def code_of(value, choices: Sequence) -> int:
    return choices.index(value) if value in choices else len(choices)


def describe_code(name: str, code: int) -> str:
    """How a signature field reads in an error message; callers with fields of their own pass a ``describe`` that
    falls back to this one."""
    if name == "dtype":
        return str(DTYPES[code]).replace("torch.", "") if 0 <= code < len(DTYPES) else f"dtype#{code}"
    if name == "grad_mode":
        return "enabled" if code else "disabled"
    return str(code)


def agree(group, site: str, shared: Mapping[str, int], own: Mapping[str, int], data_device: torch.device,
          splits: Optional[Sequence[int]] = None,
          describe: Callable[[str, int], str] = describe_code) -> list[dict[str, int]]:
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
            per_rank = ", ".join(f"rank {rank}: {describe(name, v)}" for rank, v in enumerate(values))
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


def exchange(x: Tensor, output_split_sizes: Optional[list[int]], input_split_sizes: Optional[list[int]],
              group) -> Tensor:
    x = x.contiguous()
    if output_split_sizes is None:
        out = torch.empty_like(x)
    else:
        out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all_single forward; the reverse all_to_all_single (splits swapped) backward.

    ``anchor`` is a 0-element leaf that requires grad whenever grad mode is on: it makes autograd record the
    exchange (and so run its backward collective) on every rank, also on a rank whose own input needs no grad.
    """

    @staticmethod
    def forward(ctx, x, anchor, output_split_sizes, input_split_sizes, group):
        ctx.group = group
        ctx.output_split_sizes = output_split_sizes
        ctx.input_split_sizes = input_split_sizes
        return exchange(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_x = exchange(grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group)
        return grad_x, None, None, None, None


class KeepConnected(torch.autograd.Function):
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


def anchor(device) -> Optional[Tensor]:
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
        peers = agree(group, "all_to_all", {"row_numel": math.prod(x.shape[1:]), "dtype": code_of(x.dtype, DTYPES)},
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
    return AllToAll.apply(x, anchor(x.device), out_splits, in_splits, group)


def all_reduce_sum(counts: Tensor, group) -> Tensor:
    """A detached copy of ``counts`` summed over ``group`` (no host sync; every rank of the group must call it)."""
    total = counts.detach().clone()
    dist.all_reduce(total, group=group)
    return total

"""Expert-parallel models above the layer: which parameters are sharded, and checkpoints (re)sharded between a
single process and any expert-parallel group size.

Layout: with W ranks in the group and E experts, group rank r holds experts [r·E/W, (r+1)·E/W) as its
``experts.w1`` etc. of leading size E/W; the router is replicated. The exchange itself is a dispatch strategy of
the layer (:mod:`torch_moe.dispatch`) over the collectives of :mod:`torch_moe.distributed`; ``all_to_all`` is
re-exported here.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import DTYPES, agree, all_to_all, code_of
from .layer import MoE

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
EXPERT_PARAMETERS = ("w1", "w2", "w3", "b1", "b2", "b3")
_EXPERT_KEY = re.compile(r"(?:^|\.)experts\.(?:w1|w2|w3|b1|b2|b3)$")


def _expert_parallel_layers(model) -> list[tuple[str, MoE]]:
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
        agree(group, "gather_state", {
            "world_size": world_size,
            "local_experts": layer.experts.num_experts,
            "d_model": layer.d_model,
            "d_ff": layer.d_ff,
            "expert_parameters": sum(1 << EXPERT_PARAMETERS.index(n) for n in names),
            "dtype": code_of(w1.dtype, DTYPES),
        }, {}, w1.device)
        for name in names:
            key = _join(prefix, f"experts.{name}")
            shard = state[key].contiguous()
            parts = [torch.empty_like(shard) for _ in range(world_size)]
            dist.all_gather(parts, shard, group=group)
            state[key] = torch.cat(parts, dim=0)
    return state

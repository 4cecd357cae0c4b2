"""The CPU block cache behind torch_moe's CPU kernels: its counters, its limit, and emptying it.

Large CPU outputs of torch_moe's ops (dispatch/permute results, expert activations, weight gradients; blocks of
1 MiB and more) come from a cache that keeps freed blocks for the next allocation of about the same size, as the
CUDA caching allocator does on the GPU. Without it, every such block of 32 MiB or more is a fresh mmap that the
kernel page-faults and zeroes on first touch, which costs more than the copy or GEMM that fills it. Only tensors
torch_moe allocates go through the cache. It keeps at most 1 GiB of free blocks by default; set the environment
variable ``TORCH_MOE_CPU_CACHE_MB`` before import (0 turns it off) or call :func:`set_cpu_cache_limit`.
"""

from __future__ import annotations

from . import _C
from ._checks import is_int


def cpu_cache_stats() -> dict[str, int]:
    """Counters of the cache: ``in_use_bytes`` (blocks held by live tensors), ``cached_bytes`` (free blocks kept),
    ``limit_bytes``, ``hits`` and ``misses`` (allocations served from the cache or from the system)."""
    return dict(_C.cpu_cache_stats())


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of free blocks (0 keeps none); cached blocks above the new limit are freed now."""
    if not is_int(nbytes) or nbytes < 0:
        raise ValueError(f"set_cpu_cache_limit: nbytes must be an int >= 0, got {nbytes!r}")
    _C.set_cpu_cache_limit(nbytes)


def empty_cpu_cache() -> None:
    """Return every free cached block to the system; blocks held by live tensors stay where they are."""
    _C.empty_cpu_cache()


__all__ = ["cpu_cache_stats", "set_cpu_cache_limit", "empty_cpu_cache"]

# Reading the counters creates the cache, so a bad TORCH_MOE_CPU_CACHE_MB fails here, at import, not in a later op.
cpu_cache_stats()

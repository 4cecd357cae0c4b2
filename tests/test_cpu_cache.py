"""Tests of the CPU block cache (torch_moe.memory): reused blocks never leak stale data into results, the limit and
empty_cpu_cache free what they say, the profiler sees cached blocks, and bad settings are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import reference as ref
from torch_moe import memory, ops

# Large enough that every output and scratch block of these ops is >= 1 MiB and so comes from the cache.
T, E, K, M = 1024, 8, 256, 384


@pytest.fixture
def cache_limit():
    """Run the test with a 1 GiB limit and an empty cache; restore the previous limit after."""
    before = memory.cpu_cache_stats()["limit_bytes"]
    memory.set_cpu_cache_limit(1 << 30)
    memory.empty_cpu_cache()
    yield
    memory.set_cpu_cache_limit(before)


def _problem(gen, k=2):
    ids = ref.distinct_expert_ids(T, E, k, gen)
    ids[: T // 4] = torch.arange(k)  # a crowded expert, so capacity drops tokens and others have empty slots
    x = torch.randn(T, K, generator=gen)
    b = torch.randn(E, K, M, generator=gen) / K**0.5
    b2 = torch.randn(E, M, K, generator=gen) / M**0.5
    weights = torch.rand(T, k, generator=gen)
    return ids, x, b, b2, weights


def _run_all(ids, x, b, b2, weights):
    """Every CPU op with cached outputs, forward and backward; returns all result tensors."""
    k = ids.shape[1]
    capacity = T * k // E  # the crowded experts drop tokens, the others leave slots empty
    slots, _ = ops.capacity_plan(ids, E, capacity)[:2]
    buffer = ops.dispatch(x, ids, slots, E, capacity)
    combined = ops.combine(buffer, weights, ids, slots)
    rows, row_index, offsets = ops.permute(x, ids, E)
    unpermuted = ops.unpermute(rows, weights, row_index)
    xg, bg, b2g = (t.detach().requires_grad_() for t in (x, b, b2))
    h = ops.gather_grouped_mm(xg, bg, offsets, row_index)
    y = ops.grouped_mm_unpermute(h, b2g, offsets, weights, row_index)
    plain = ops.grouped_mm(rows.detach().requires_grad_(), bg, offsets)
    grads = torch.autograd.grad((y.square().sum() + plain.sum()), (xg, bg, b2g))
    return [buffer, combined, rows, unpermuted, h.detach(), y.detach(), plain.detach(), *grads]


def test_reused_blocks_give_the_same_results(gen, cache_limit):
    problem = _problem(gen)
    first = [t.clone() for t in _run_all(*problem)]
    # Poison every block the ops used and free it: the next run is served from these blocks, so any row a kernel
    # fails to write would show up as NaN.
    for t in _run_all(*problem):
        t.fill_(float("nan"))
    hits_before = memory.cpu_cache_stats()["hits"]
    second = _run_all(*problem)
    assert memory.cpu_cache_stats()["hits"] > hits_before, "the second run did not reuse any cached block"
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_cached_results_match_reference(gen, cache_limit):
    ids, x, b, b2, weights = _problem(gen)
    for _ in range(2):  # the second round runs on reused blocks
        rows, row_index, offsets = ops.permute(x, ids, E)
        expected_rows, _, _ = ref.permute(x.double(), ids, E)
        torch.testing.assert_close(rows.double(), expected_rows)
        h = ops.gather_grouped_mm(x, b, offsets, row_index)
        torch.testing.assert_close(h.double(), ref.grouped_mm(expected_rows, b.double(), offsets), rtol=1e-4,
                                   atol=1e-4)
        del rows, h


def test_freed_block_is_reused_and_counted(gen, cache_limit):
    x = torch.randn(T, K, generator=gen)
    ids = ref.distinct_expert_ids(T, E, 2, gen)
    rows = ops.permute(x, ids, E)[0]
    stats = memory.cpu_cache_stats()
    assert stats["in_use_bytes"] >= rows.nbytes
    pointer = rows.data_ptr()
    del rows
    assert memory.cpu_cache_stats()["cached_bytes"] >= T * 2 * K * 4
    again = ops.permute(x, ids, E)[0]
    assert again.data_ptr() == pointer
    assert memory.cpu_cache_stats()["hits"] == stats["hits"] + 1


def test_limit_zero_keeps_nothing_and_empty_frees_all(gen, cache_limit):
    x = torch.randn(T, K, generator=gen)
    ids = ref.distinct_expert_ids(T, E, 2, gen)
    rows = ops.permute(x, ids, E)[0]
    del rows
    assert memory.cpu_cache_stats()["cached_bytes"] > 0
    memory.empty_cpu_cache()
    assert memory.cpu_cache_stats()["cached_bytes"] == 0

    memory.set_cpu_cache_limit(0)
    in_use = memory.cpu_cache_stats()["in_use_bytes"]  # tensors other tests left alive may still hold blocks
    held = ops.permute(x, ids, E)[0]
    assert memory.cpu_cache_stats()["in_use_bytes"] >= in_use + held.nbytes  # blocks in use are still counted
    del held
    assert memory.cpu_cache_stats()["cached_bytes"] == 0
    assert memory.cpu_cache_stats()["in_use_bytes"] == in_use


def test_lowering_the_limit_trims_the_cache(gen, cache_limit):
    x = torch.randn(T, K, generator=gen)
    ids = ref.distinct_expert_ids(T, E, 2, gen)
    outputs = [ops.permute(x, ids, E)[0] for _ in range(3)]
    del outputs
    cached = memory.cpu_cache_stats()["cached_bytes"]
    assert cached >= 3 * T * 2 * K * 4
    memory.set_cpu_cache_limit(cached // 2)
    assert memory.cpu_cache_stats()["cached_bytes"] <= cached // 2


def test_profiler_sees_cached_blocks(gen, cache_limit):
    x = torch.randn(T, K, generator=gen)
    ids = ref.distinct_expert_ids(T, E, 2, gen)
    ops.permute(x, ids, E)  # freed at once: its block is now cached and the profiled call reuses it
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rows = ops.permute(x, ids, E)[0]
        nbytes = rows.nbytes
        del rows
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert any(s >= nbytes for s in sizes), sizes
    assert any(s <= -nbytes for s in sizes), sizes


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit_is_refused(bad):
    with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
        memory.set_cpu_cache_limit(bad)


def _import_with_env(value: str) -> subprocess.CompletedProcess:
    code = "import torch_moe; print(torch_moe.memory.cpu_cache_stats()['limit_bytes'])"
    env = dict(os.environ, TORCH_MOE_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_sets_the_limit():
    done = _import_with_env("0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    done = _import_with_env("3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(3 << 20)


def test_bad_environment_fails_at_import():
    done = _import_with_env("lots")
    assert done.returncode != 0
    assert "TORCH_MOE_CPU_CACHE_MB must be a non-negative integer" in done.stderr


_OUT_OF_MEMORY = """
import resource, torch, torch_moe
from torch_moe import memory, ops
torch.set_num_threads(1)  # no new threads (and malloc arenas) once the address space is capped
def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
tokens = torch.arange(8192)
x = torch.randn(8192, 1024)
held = [ops.permute(x, torch.stack([tokens % 8, (tokens + 1) % 8], 1), 8).rows for _ in range(3)]
del held  # three 64 MiB blocks are now cached
assert memory.cpu_cache_stats()["cached_bytes"] >= 192 << 20
limit = vm_bytes() + (150 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rows = ops.permute(x, torch.stack([(tokens + j) % 8 for j in range(6)], 1), 8).rows  # 192 MiB
assert memory.cpu_cache_stats()["cached_bytes"] == 0
print("served", rows.shape[0])
"""


def test_cached_blocks_are_given_back_when_the_system_refuses():
    """A request the system refuses is retried once the cached (free) blocks are given back."""
    done = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "served 49152"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_the_cache(gen, cache_limit):
    x = torch.randn(T, K, generator=gen)
    ids = ref.distinct_expert_ids(T, E, 2, gen)
    expected = ops.permute(x, ids, E).rows  # leaves cached blocks behind in the parent
    ops.permute(x, ids, E)
    pid = os.fork()
    if pid == 0:  # the child: same results from the inherited cache, then leave without running pytest's teardown
        # One thread, as DataLoader workers do: libgomp's pool does not survive fork (torch's own ops hang too).
        torch.set_num_threads(1)
        ok = torch.equal(ops.permute(x, ids, E).rows, expected) and memory.cpu_cache_stats()["hits"] > 0
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

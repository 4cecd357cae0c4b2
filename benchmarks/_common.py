"""Helpers shared by the benchmark scripts: the dense SwiGLU baseline, timing, CPU peak memory, machine facts."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def cpu_gemm_library(library: Optional[str]):
    """torch_moe's CPU GEMM library switched to ``library`` inside the block, back to the default after (None: as it
    is): the contenders that hold the GEMM library equal to HF's."""
    from torch_moe import ops

    if library is None:
        yield
        return
    ops.set_cpu_gemm_library(library)
    try:
        yield
    finally:
        ops.set_cpu_gemm_library(None)


def gemm_library_line(aten_name: str, others: str) -> str:
    """The report line naming torch_moe's GEMM library, its probe, and the contender ``aten_name`` on at::mm."""
    from torch_moe import ops

    probe = ops.cpu_gemm_probe()
    few_rows = (f"; few-row GEMMs, 16 x 512 x 256: torch_moe's kernel {probe['few_rows_torch_moe_gflops']:.0f}, "
                f"the library above {probe['few_rows_library_gflops']:.0f}" if probe["few_rows_torch_moe_gflops"] else
                "; torch_moe's few-row kernel is not available on this CPU")
    return (f"- GEMM libraries: torch_moe's float32 expert GEMM blocks on {ops.cpu_gemm_library()} "
            f"(torch_moe.ops.cpu_gemm_library(); its probe, one thread, GFLOP/s, 256 x 512 x 256: oneDNN "
            f"{probe['onednn_gflops']:.0f}, at::mm {probe['aten_gflops']:.0f}{few_rows}); {others} run ATen's "
            f"at::mm / torch._grouped_mm (MKL in this wheel); '{aten_name}' is torch_moe with its blocks on at::mm "
            "too (the GEMM library held equal).")


class DenseSwiGLU(nn.Module):
    """(silu(x·w1) · (x·w3)) · w2 with hidden width top_k · d_ff: the active FLOPs of one MoE token."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def forward_fn(call: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    """Forward alone, under no_grad: the inference cost, no autograd graph recorded."""

    def run():
        with torch.no_grad():
            call(x)

    return run


def forward_backward_fn(
    call: Callable[[Tensor], Tensor],
    x: Tensor,
    grad_out: Tensor,
    wrt: Sequence[Tensor],
    aux_loss: Optional[Callable[[], Tensor]] = None,
) -> Callable[[], None]:
    """Forward, then torch.autograd.grad of ``grad_out`` (and of ``aux_loss()`` with gradient 1) w.r.t. ``wrt``.

    autograd.grad instead of .backward() so that no .grad accumulates between runs. ``aux_loss``, read after the
    forward, lets a layer's auxiliary loss flow into the same backward, as it does in training.
    """
    wrt = list(wrt)
    one = torch.ones(())

    def run():
        outputs, grads = [call(x)], [grad_out]
        if aux_loss is not None:
            outputs.append(aux_loss())
            grads.append(one)
        torch.autograd.grad(outputs, wrt, grads, allow_unused=True)

    return run


def measure_autorange(fn: Callable[[], None], threads: int, min_run_time: float) -> benchmark.Measurement:
    """One warm-up call (first-call allocations, lazy init), then Timer.blocked_autorange(min_run_time)."""
    fn()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time
    )


def measure_repeats(
    fn: Callable[[], None],
    threads: int,
    min_run_time: float,
    min_repeats: int,
    max_run_time: Optional[float] = None,
    block_s: float = 0.02,
) -> benchmark.Measurement:
    """Median over at least ``min_repeats`` timed blocks and at least ``min_run_time`` seconds in all.

    blocked_autorange spends its first call estimating a block size and then stops once min_run_time is spent, so
    a call of a few seconds would get one or two samples; here a warm-up call sizes the blocks (``block_s`` at
    least, so the timer's own cost vanishes on small calls) and every later block counts. ``max_run_time`` caps
    slow calls: once 3 blocks and that many seconds are spent, it stops short of ``min_repeats``.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    number = max(1, int(block_s / max(first, 1e-9)))
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    blocks, spent = [], 0.0
    while len(blocks) < min_repeats or spent < min_run_time:
        if max_run_time is not None and len(blocks) >= 3 and spent >= max_run_time:
            break
        block = timer.timeit(number)
        blocks.append(block)
        spent += block.raw_times[0]
    return benchmark.Measurement.merge(blocks)[0]


def measure_interleaved(
    fns: dict[str, Callable[[], None]],
    threads: int,
    min_run_time: float,
    min_repeats: int,
    max_run_time: Optional[float] = None,
    block_s: float = 0.02,
) -> dict[str, benchmark.Measurement]:
    """Like :func:`measure_repeats` for several contenders at once, in rounds: each round times one block of every
    contender, in an order rotated by one per round, so that a slow spell of a shared machine (other jobs, clock
    changes) falls on all of them alike instead of on whichever ran then; the ratios of the medians are what
    this makes trustworthy. Rounds go on until ``min_repeats`` rounds are done and every contender has spent
    ``min_run_time``; ``max_run_time`` caps the whole loop's seconds once 3 rounds are done.
    """
    timers, numbers = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        numbers[name] = max(1, int(block_s / max(first, 1e-9)))
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    names = list(fns)
    blocks: dict[str, list] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    started = time.perf_counter()
    rounds = 0
    while rounds < min_repeats or min(spent.values()) < min_run_time:
        if max_run_time is not None and rounds >= 3 and time.perf_counter() - started >= max_run_time:
            break
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            block = timers[name].timeit(numbers[name])
            blocks[name].append(block)
            spent[name] += block.raw_times[0]
        rounds += 1
    return {name: benchmark.Measurement.merge(blocks[name])[0] for name in names}


def peak_memory_bytes(fn: Callable[[], None]) -> int:
    """Peak CPU memory allocated by ``fn()`` above the level at its start, in bytes.

    Runs ``fn`` once under torch.profiler with profile_memory=True, which records every allocation (+bytes) and
    free (-bytes) of PyTorch's CPU allocator as a "[memory]" event; replaying those in time order (a stable sort,
    so events with equal timestamps keep their recorded order) gives the allocated level over time, and the peak
    is its maximum, counted from 0 at the start. Tensors freed during the run that were allocated before it make
    the level go negative, never the peak. Not counted: memory that does not go through the c10 CPU allocator
    (std::vector scratch in C++ kernels, MKL/oneDNN workspaces, Python objects).
    """
    with quiet_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


# Kineto in torch 2.13 prints "USDT:<date> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start" (and _stop)
# on stderr at every profile; with a profile per cell they bury everything else.
_PROFILER_LOG_LINE = re.compile(r"^USDT:.*\] profiler_(start|stop)\s*$")


@contextlib.contextmanager
def quiet_profiler_log():
    """Drop the profiler's start/stop log lines from stderr (fd 2); every other line written meanwhile is kept."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not _PROFILER_LOG_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def check_peak_memory_method() -> None:
    """Abort if the profiler does not see CPU allocations exactly (a torch build or version that lacks them)."""
    def run():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 21)  # 8 MiB
        del a
        c = torch.empty(1 << 19)  # 2 MiB, fits where a was: the peak stays 12 MiB
        del b, c

    peak = peak_memory_bytes(run)
    if peak != 12 << 20:
        sys.exit(f"peak memory: the profiler reported a peak of {peak} bytes for a known 12 MiB pattern; "
                 "CPU memory events are missing or wrong in this torch, so no memory column would be sound")


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" with uncommitted changes" if dirty else "")


def cpu_model() -> str:
    # platform.processor() is often empty or just the architecture on Linux; /proc/cpuinfo names the part.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def physical_cores() -> Optional[int]:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def machine_line(threads: int) -> str:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()}, {physical_cores() or '?'} physical cores, {os.cpu_count()} logical CPUs "
            f"({affinity} usable by this process), torch threads = {threads}, {platform.platform()}")


def load_average_check(script: str, threads: int) -> tuple[float, float, float]:
    """The load average now; warns on stderr when other work already occupies the cores the timing will use.

    Other processes on the cores make OpenMP threads wait on each other at every parallel region, which inflates
    small ops by whole scheduler time slices; say so rather than publish such numbers silently.
    """
    load = os.getloadavg()
    if load[0] + threads > (os.cpu_count() or 1) + 0.5:
        print(f"{script}: warning: load average {load[0]:.2f} with {threads} threads on {os.cpu_count()} CPUs; "
              "the cores are busy with other work and the timings will be unreliable", file=sys.stderr)
    return load


def publish(report: str, out: Path) -> None:
    """Print the Markdown report and write it to ``out``."""
    print()
    print(report, end="")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"\nwritten to {out}")

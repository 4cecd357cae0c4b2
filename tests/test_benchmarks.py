"""Smoke test of benchmarks/bench_cpu.py: its --quick run on tiny shapes must complete and write a full report.

Timings are not checked (they never go into tests); this keeps the benchmark script from rotting as the API moves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


def test_bench_cpu_quick_writes_every_row(tmp_path):
    out = tmp_path / "quick.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    contenders = ("torch_moe dropless", "torch_moe capacity 1.25", "HF MixtralSparseMoeBlock (eager)",
                  "HF MixtralSparseMoeBlock (grouped_mm)", "HF MixtralSparseMoeBlock (batched_mm)",
                  "dense SwiGLU k·d_ff")
    table_rows = [line for line in report.splitlines() if line.startswith("| ") and "T=" in line]
    # 8 cases x 6 contenders in the timing table (the tiny shapes fit batched_mm's limit everywhere),
    # 8 cases x 2 pairs in the bandwidth table.
    assert sum(any(f"| {c} |" in row for c in contenders) for row in table_rows) == 48
    assert sum("| permute + unpermute |" in row or "| dispatch + combine |" in row for row in table_rows) == 16
    assert report.count("HF vs dropless") == 8 and "## Goals" in report
    assert report.count("best HF: fwd HF MixtralSparseMoeBlock") == 8
    assert report.count("decode forward not slower than HF grouped_mm") == 4
    assert report.count("of copy_ bandwidth on") == 4


def test_bench_gpu_cpu_smoke_runs_every_contender(tmp_path):
    # bench_gpu.py's code paths (every contender, the report) on the CPU at toy sizes; its numbers need a GPU.
    out = tmp_path / "gpu-smoke.md"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--cpu-smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert "CPU smoke run, not results" in report
    contenders = ("torch_moe.MoE", "dense SwiGLU (k·d_ff)", "HF MixtralSparseMoeBlock (grouped_mm)",
                  "HF MixtralSparseMoeBlock (batched_mm)", "HF MixtralSparseMoeBlock (eager)",
                  "torch._grouped_mm (expert GEMMs only)")
    rows = [line for line in report.splitlines() if line.startswith("| ") and " T=" in line]
    # 3 smoke cases (two training, one decode) x 6 contenders in the timing table, 3 rows in the paths table.
    assert sum(any(f"| {c} |" in row for c in contenders) for row in rows) == 18
    decode = [row for row in rows if "decode (forward only)" in row]
    assert len(decode) == 6 and all("| n/a | n/a | n/a |" in row for row in decode)
    # torch_moe's grouped GEMMs of one step, counted on the CPU: the experts' two gated projections and the down
    # projection, and the router's product, which on the CPU runs as a one-group grouped_mm (a partition fixed by
    # the shapes, so that routing does not depend on the thread count).
    assert report.count("forward: cpu_loop ×4") == 3 and report.count("backward_weight: cpu_loop ×4") == 2
    # HF blocks compute what torch_moe computes on the same weights (max relative difference column).
    diffs = [float(row.rstrip(" |").rsplit("|", 1)[1]) for row in rows if "| HF MixtralSparseMoeBlock" in row]
    assert len(diffs) == 9 and max(diffs) < 5e-2, diffs

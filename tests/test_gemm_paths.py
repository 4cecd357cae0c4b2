"""The grouped GEMM path counters (ops.gemm_path_counts) and the switch of the host-side CUDA value checks, on the
CPU: what every machine can run. test_cuda.py reads the counters of the CUDA paths (grouped_mm / per_expert_loop)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import reference as ref
from torch_moe import _C, ops

LOOP = "cpu_loop"


def _plan(gen, T=9, E=6, k=2, K=5, M=3):
    _, _, row_index, offsets = ref.random_row_plan(T, E, k, True, gen)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, K, M, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, b, row_index, offsets


def _counts_of(op, forward, backward_input, backward_weight):
    want = {(op, "forward", LOOP): forward, (op, "backward_input", LOOP): backward_input,
            (op, "backward_weight", LOOP): backward_weight}
    return {key: n for key, n in want.items() if n}


def test_counts_every_grouped_gemm_per_op_and_pass(gen):
    x, b, row_index, offsets = _plan(gen)
    w_up = torch.randn_like(b, requires_grad=True)
    N = row_index.numel()
    a = torch.randn(N, x.shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(N, b.shape[2], generator=gen, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(b.shape[0], b.shape[2], 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(row_index.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    cases = [
        ("grouped_mm", lambda: ops.grouped_mm(a, b, offsets), 1),
        ("gather_grouped_mm", lambda: ops.gather_grouped_mm(x, b, offsets, row_index), 1),
        ("gather_grouped_glu", lambda: ops.gather_grouped_glu(x, b, w_up, offsets, row_index), 2),  # two projections
        ("grouped_mm_unpermute", lambda: ops.grouped_mm_unpermute(h, b2, offsets, weights, row_index), 1),
    ]
    for op, run, gemms in cases:
        ops.reset_gemm_path_counts()
        assert ops.gemm_path_counts() == {}
        out = run()
        assert ops.gemm_path_counts() == _counts_of(op, gemms, 0, 0), op
        out.sum().backward()
        assert ops.gemm_path_counts() == _counts_of(op, gemms, gemms, gemms), op


def test_frozen_weights_count_no_weight_gradient_gemm(gen):
    x, b, row_index, offsets = _plan(gen)
    b.requires_grad_(False)
    ops.reset_gemm_path_counts()
    ops.gather_grouped_mm(x, b, offsets, row_index).sum().backward()
    assert ops.gemm_path_counts() == _counts_of("gather_grouped_mm", 1, 1, 0)


def test_counts_are_process_wide_not_per_thread(gen):
    # Autograd runs a CUDA backward on its own thread: the counters must see what another thread ran.
    x, b, row_index, offsets = _plan(gen)
    ops.reset_gemm_path_counts()
    y = ops.gather_grouped_mm(x, b, offsets, row_index)
    worker = threading.Thread(target=lambda: y.sum().backward())
    worker.start()
    worker.join()
    assert x.grad is not None and b.grad is not None
    assert ops.gemm_path_counts() == _counts_of("gather_grouped_mm", 1, 1, 1)


@pytest.mark.parametrize("env,expected", [(None, False), ("1", True), ("true", True), ("0", False)],
                         ids=["unset", "1", "true", "0"])
def test_cuda_value_checks_are_off_unless_asked_for(env, expected):
    code = "from torch_moe import ops; print('checks', ops.cuda_value_checks())"
    environ = {key: value for key, value in os.environ.items() if key != "TORCH_MOE_CUDA_CHECKS"}
    if env is not None:
        environ["TORCH_MOE_CUDA_CHECKS"] = env
    proc = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checks {expected}" in proc.stdout


def test_set_cuda_value_checks_overrides_the_environment():
    try:
        ops.set_cuda_value_checks(True)
        assert ops.cuda_value_checks() is True
        ops.set_cuda_value_checks(False)
        assert ops.cuda_value_checks() is False
    finally:
        ops.set_cuda_value_checks(None)
    assert ops.cuda_value_checks() is (os.environ.get("TORCH_MOE_CUDA_CHECKS") in ("1", "on", "true"))
    with pytest.raises(RuntimeError, match="argument 'mode' must be -1, 0 or 1, got 2"):
        _C.set_cuda_value_checks(2)

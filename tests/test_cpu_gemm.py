"""The library of the CPU kernels' float32 GEMM blocks (ops.set_cpu_gemm_library): the switch, and the grouped ops
on each library against the same op in float64, for GEMMs that are one block, blocks of rows and blocks of columns,
and few-row GEMMs of sizes off every tile edge of torch_moe's kernel (tests/cpp/test_small_gemm.cpp tests the kernel
alone). test_thread_count.py checks that each library's results do not depend on the thread count."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

import reference as ref
from torch_moe import ops

# (T, K, M, E, k): one block per GEMM; > 2^26 multiply-adds in blocks of rows; few rows and wide weights (the
# forward in blocks of columns, the weight gradient in blocks of rows).
SHAPES = {"small": (30, 8, 12, 4, 2), "row blocks": (1100, 256, 512, 2, 1), "few rows": (64, 1024, 2048, 2, 1),
          "odd sizes": (37, 45, 19, 3, 2)}
LIBRARIES = ("onednn", "aten", "torch_moe")
NAMES = ("onednn", "aten", "torch_moe", "torch_moe+onednn", "torch_moe+aten")


@functools.lru_cache(maxsize=None)
def _available(library: str) -> bool:
    """Whether the switch accepts ``library`` here; leaves the switch at its default."""
    try:
        ops.set_cpu_gemm_library(library)
        return True
    except RuntimeError:
        return False
    finally:
        ops.set_cpu_gemm_library(None)


def _skip_unless_available(library: str) -> None:
    if not _available(library):
        pytest.skip(f"{library}'s float32 GEMM is not available with this torch build or CPU")


@pytest.fixture
def library(request):
    _skip_unless_available(request.param)
    ops.set_cpu_gemm_library(request.param)
    yield request.param
    ops.set_cpu_gemm_library(None)


def test_switch_names_the_library_and_refuses_unknown_ones():
    assert ops.cpu_gemm_library() in NAMES
    available = {library: _available(library) for library in LIBRARIES}
    assert available["aten"]
    ops.set_cpu_gemm_library("aten")
    try:
        assert ops.cpu_gemm_library() == "aten"
        with pytest.raises(ValueError, match="must be one of 'auto', 'onednn', 'aten', 'torch_moe', got 'mkl'"):
            ops.set_cpu_gemm_library("mkl")
        assert ops.cpu_gemm_library() == "aten"  # a refused call changes nothing
        with pytest.raises(TypeError, match="must be a str or None"):
            ops.set_cpu_gemm_library(1)
        if available["torch_moe"]:
            ops.set_cpu_gemm_library("torch_moe")
            assert ops.cpu_gemm_library() == "torch_moe"
        else:
            with pytest.raises(RuntimeError, match="needs an x86-64 CPU with AVX-512F"):
                ops.set_cpu_gemm_library("torch_moe")
        ops.set_cpu_gemm_library("auto")
        probe = ops.cpu_gemm_probe()
        assert probe["aten_gflops"] > 0 and (probe["onednn_gflops"] > 0) == available["onednn"]
        assert probe["onednn_faster"] == float(probe["onednn_gflops"] > 1.25 * probe["aten_gflops"])
        assert (probe["few_rows_torch_moe_gflops"] > 0) == available["torch_moe"]
        assert probe["torch_moe_faster"] == float(
            probe["few_rows_torch_moe_gflops"] > 1.1 * probe["few_rows_library_gflops"])
        many_rows = "onednn" if probe["onednn_faster"] else "aten"
        assert ops.cpu_gemm_library() == ("torch_moe+" if probe["torch_moe_faster"] else "") + many_rows
    finally:
        ops.set_cpu_gemm_library(None)


def _ops_of(x, b, b2, down, weights, offsets, row_index):
    """Outputs and input/weight gradients of the dropless ops, the row plan fixed."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, b2, down, weights)]
    lx, lb, lb2, ldown, lw = leaves
    h = ops.gather_grouped_glu(lx, lb, lb2, offsets, row_index, "silu")
    gate = ops.gather_grouped_mm(lx, lb, offsets, row_index)
    y = ops.grouped_mm_unpermute(h + gate, ldown, offsets, lw, row_index)
    generator = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _inputs(shape, gen):
    """float32 (x, w_gate, w_up, w_down, routing weights), offsets and row_index of a random plan of SHAPES[shape]."""
    T, K, M, E, k = SHAPES[shape]
    _, _, row_index, offsets = ref.random_row_plan(T, E, k, False, gen)
    tensors = [torch.randn(T, K, generator=gen), torch.randn(E, K, M, generator=gen) / K**0.5,
               torch.randn(E, K, M, generator=gen) / K**0.5, torch.randn(E, M, K, generator=gen) / M**0.5,
               torch.rand(T, k, generator=gen)]
    return tensors, offsets, row_index


def _on_each_library(tensors, offsets, row_index):
    """library -> _ops_of on these inputs with the float32 GEMMs on that library, for each available library."""
    results = {}
    for library in filter(_available, LIBRARIES):
        ops.set_cpu_gemm_library(library)
        try:
            results[library] = _ops_of(*tensors, offsets, row_index)
        finally:
            ops.set_cpu_gemm_library(None)
    return results


@pytest.mark.parametrize("library", LIBRARIES + ("auto",), indirect=True)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_float32_ops_match_float64_on_each_library(library, shape, gen):
    T, K, M, E, k = SHAPES[shape]
    _, _, row_index, offsets = ref.random_row_plan(T, E, k, False, gen)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64)
    b, b2 = (torch.randn(E, K, M, generator=gen, dtype=torch.float64) / K**0.5 for _ in range(2))
    down = torch.randn(E, M, K, generator=gen, dtype=torch.float64) / M**0.5
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    expected = _ops_of(x, b, b2, down, weights, offsets, row_index)
    got = _ops_of(*(t.float() for t in (x, b, b2, down, weights)), offsets, row_index)
    for name, g, e in zip(["y", "grad x", "grad b", "grad b2", "grad down", "grad weights"], got, expected):
        assert g.dtype == torch.float32, name
        scale = e.abs().max().item()
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5 * scale, msg=f"{library} {shape}: {name}")


@pytest.mark.parametrize("shape", ["small", "row blocks"])
def test_other_dtypes_do_not_depend_on_the_switch(shape, gen):
    tensors, offsets, row_index = _inputs(shape, gen)
    for dtype in (torch.float64, torch.bfloat16):
        results = _on_each_library([t.to(dtype) for t in tensors], offsets, row_index)
        if len(results) < 2:
            pytest.skip("only at::mm is available with this torch build and CPU")
        first, *others = results.values()
        for other in others:
            for a, b in zip(first, other):
                assert torch.equal(a, b), dtype


# (library, library, shape): shapes where the two round differently (oneDNN and at::mm agree on short sums).
DIFFERING = [("onednn", "aten", "row blocks"), ("torch_moe", "aten", "odd sizes"), ("torch_moe", "onednn", "odd sizes")]


@pytest.mark.parametrize("one, other, shape", DIFFERING)
def test_switch_changes_which_library_computes_float32(one, other, shape, gen):
    # Identical bits on every output would mean one library ran both times.
    _skip_unless_available(one)
    _skip_unless_available(other)
    results = _on_each_library(*_inputs(shape, gen))
    assert not all(torch.equal(a, b) for a, b in zip(results[one], results[other]))


@pytest.mark.parametrize("value, expected", [("aten", "aten"), ("", None), ("bogus", "error")])
def test_environment_variable_sets_the_default(value, expected):
    code = ("from torch_moe import ops\n"
            "try:\n    print(ops.cpu_gemm_library())\n"
            "except RuntimeError as err:\n    print('error:', err)\n")
    env = dict(os.environ, TORCH_MOE_CPU_GEMM=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[0]  # the library, or the error's first line
    if expected == "error":
        assert "TORCH_MOE_CPU_GEMM" in line, line
        assert "must be 'auto', 'onednn', 'aten' or 'torch_moe', got 'bogus'" in line, line
    elif expected is None:  # unset or empty: auto
        assert line in NAMES, line
    else:
        assert line == expected, line


def test_the_probe_does_not_draw_from_the_global_generator():
    # A fresh process: the probe runs at the first float32 GEMM, inside the layer's first forward.
    code = ("import torch, torch_moe\n"
            "torch.manual_seed(0)\n"
            "layer = torch_moe.MoE(16, 32, 4, 2)\n"
            "x = torch.randn(64, 16)\n"
            "state = torch.get_rng_state()\n"
            "with torch.no_grad():\n    layer.eval()(x)\n"
            "print(torch.equal(state, torch.get_rng_state()), torch_moe.ops.cpu_gemm_probe()['aten_gflops'] > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TORCH_MOE_CPU_GEMM="auto"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stdout


def test_auto_puts_few_row_gemms_on_torch_moe_when_the_probe_says_so(gen):
    # "odd sizes" has only few-row GEMMs (<= 128 rows a side), so "auto" must give torch_moe's bits exactly when the
    # probe chose the kernel, and the bits of the library it picked for large GEMMs otherwise.
    probe = ops.cpu_gemm_probe()
    tensors, offsets, row_index = _inputs("odd sizes", gen)
    ops.set_cpu_gemm_library("auto")
    try:
        auto = _ops_of(*tensors, offsets, row_index)
    finally:
        ops.set_cpu_gemm_library(None)
    results = _on_each_library(tensors, offsets, row_index)
    expected = "torch_moe" if probe["torch_moe_faster"] else ("onednn" if probe["onednn_faster"] else "aten")
    for a, b in zip(auto, results[expected]):
        assert torch.equal(a, b), expected

"""Shared fixtures of the op tests: devices (CUDA skipped without a GPU), float dtypes, a seeded generator."""

from __future__ import annotations

import pytest
import torch

import torch_moe  # noqa: F401  (loads the extension and registers torch.ops.torch_moe)
from torch_moe import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]

FLOAT_DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float16, id="float16"),
]


def _with_cuda_value_checks(request) -> None:
    """The op suites check the user errors of bad values (index ranges, duplicates, offsets), which on CUDA are
    host-side checks, off by default: turn them on for the test, back to the environment's setting after it."""
    ops.set_cuda_value_checks(True)
    request.addfinalizer(lambda: ops.set_cuda_value_checks(None))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cuda":
        _with_cuda_value_checks(request)
    return request.param


@pytest.fixture(params=FLOAT_DTYPES)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def cuda_device(request) -> str:
    """For tests that need a GPU on top of the CPU (mixed-device checks)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    _with_cuda_value_checks(request)
    return "cuda"


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: inputs are built on the CPU and moved, so they match across devices."""
    return torch.Generator().manual_seed(0x5EED)


@pytest.fixture(autouse=True)
def _fresh_dynamo_caches(request):
    """Tests that torch.compile the same layer code (MoE.forward) from many files would otherwise share Dynamo's
    per-code-object recompile budget (8), and a fullgraph test late in the run would fail on the limit, not on
    its own behaviour. Reset only around tests that mention compile, to keep the rest fast."""
    compiles = "compile" in request.node.name
    if compiles:
        torch._dynamo.reset()
    yield
    if compiles:
        torch._dynamo.reset()

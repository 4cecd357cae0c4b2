"""Packaging: build information, the torch-version guard at import, and CMake's message without torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_moe

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_matches_the_running_torch():
    info = torch_moe.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool)
    if not info["with_cuda"]:
        assert info["cuda_arch_list"] == "" and info["cuda_runtime_version"] == 0


def test_every_op_is_registered():
    expected = {
        "router_topk", "_router_topk_backward", "capacity_plan", "dispatch", "_dispatch_backward", "combine",
        "_combine_backward", "permute", "_permute_backward", "unpermute", "_unpermute_backward", "router_losses",
        "_router_losses_backward",
    }
    for name in expected:
        assert hasattr(torch.ops.torch_moe, name), name


def test_import_refuses_a_build_for_another_torch(monkeypatch):
    monkeypatch.setattr(torch_moe._build_info, "TORCH_VERSION", "1.0.0+other")
    with pytest.raises(ImportError, match=re.escape("1.0.0+other") + ".*" + re.escape(torch.__version__)):
        torch_moe._load_extension()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_without_torch_stops_with_a_clear_message(tmp_path):
    # A Python that cannot import torch: a bare venv of the running interpreter.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={python}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "PyTorch is not importable" in message
    assert "pip install --no-build-isolation" in message

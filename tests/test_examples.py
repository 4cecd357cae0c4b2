"""The main job (examples/train_lm.py) runs end to end at a tiny size and writes what it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("capacity_factor", ["1.25", "none"])
def test_train_lm_smoke(tmp_path, capacity_factor):
    cmd = [
        sys.executable, str(ROOT / "examples" / "train_lm.py"), "--steps", "4", "--eval-every", "2",
        "--eval-batches", "1", "--batch-size", "4", "--seq-len", "32", "--d-model", "32", "--layers", "1",
        "--experts", "4", "--top-k", "2", "--capacity-factor", capacity_factor, "--threads", "1",
        "--out", str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final val loss" in result.stdout
    assert (tmp_path / "train_lm.png").stat().st_size > 0
    metrics = json.loads((tmp_path / "train_lm.json").read_text())
    for name in ("dense", "moe"):
        assert math.isfinite(metrics[name]["final_val_loss"])
    # One layer of 4 experts; every routed assignment is counted: 4 steps x 4 x 32 tokens x top-2.
    counts = metrics["moe"]["tokens_per_expert"]
    assert len(counts) == 1 and len(counts[0]) == 4
    assert sum(counts[0]) == 4 * 4 * 32 * 2


def test_ablation_notebook_is_the_script_twin_and_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sys.path.insert(0, str(ROOT / "examples"))
    import notebook_twin

    built = notebook_twin.build(ROOT / "examples" / "ablations.py")
    committed = nbformat.read(ROOT / "examples" / "ablations.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        "examples/ablations.ipynb is out of date: run python examples/notebook_twin.py")

    monkeypatch.setenv("ABLATION_SIZE", "tiny")
    monkeypatch.setenv("ABLATION_OUT", str(tmp_path))
    client = nbclient.NotebookClient(built, timeout=600, resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()  # raises CellExecutionError if any cell fails
    table = (tmp_path / "ablations.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 25, table
    for row in rows:
        assert math.isfinite(float(row.split("|")[2])), row
    assert (tmp_path / "ablations.png").stat().st_size > 0


def test_surgery_notebook_is_the_script_twin_and_runs(tmp_path, monkeypatch):
    """examples/surgery.py at its tiny size: MoLoRA and PEFT LoRA at equal trainable parameters, an upcycled MoE
    pruned and merged (skipped, and said so, without torch_moe.surgery), every reported loss finite."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples"))
    import notebook_twin

    built = notebook_twin.build(ROOT / "examples" / "surgery.py")
    committed = nbformat.read(ROOT / "examples" / "surgery.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        "examples/surgery.ipynb is out of date: run python examples/notebook_twin.py examples/surgery.py")

    monkeypatch.setenv("SURGERY_SIZE", "tiny")
    monkeypatch.setenv("SURGERY_OUT", str(tmp_path))
    client = nbclient.NotebookClient(built, timeout=600, resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()  # raises CellExecutionError if any cell fails
    results = json.loads((tmp_path / "surgery.json").read_text())
    counts = results["trainable_params"]
    assert counts["lora"] == counts["molora"] > 0
    steps = ["dense, before fine-tuning", "LoRA (PEFT)", "MoLoRA", "upcycled MoE", "upcycled MoE, fine-tuned"]
    try:
        import torch_moe.surgery  # noqa: F401
        steps += ["pruned", "merged"]
        assert not results["surgery_skipped"]
    except ImportError:
        assert results["surgery_skipped"]
    assert list(results["val_loss"]) == steps
    for name, loss in results["val_loss"].items():
        assert math.isfinite(loss), name
    # Upcycling copies the dense FFN into every expert: before training the MoE computes what the dense model did.
    assert results["val_loss"]["upcycled MoE"] == pytest.approx(results["val_loss"]["dense, before fine-tuning"],
                                                                rel=1e-5)
    assert (tmp_path / "surgery.png").stat().st_size > 0

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
    assert len(rows) == 20, table
    for row in rows:
        assert math.isfinite(float(row.split("|")[2])), row
    assert (tmp_path / "ablations.png").stat().st_size > 0

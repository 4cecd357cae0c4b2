"""Build ``examples/ablations.ipynb`` from its script twin ``examples/ablations.py`` (``# %%`` cells), so the two
never drift: ``python examples/notebook_twin.py [--execute]``; tests check the committed notebook's cells match."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def script_cells(script: Path) -> list[tuple[str, str]]:
    """(kind, source) of each ``# %%`` cell; markdown cells drop their leading ``# ``."""
    cells: list[tuple[str, list[str]]] = []
    for line in script.read_text(encoding="utf-8").splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        out.append((kind, "\n".join(lines).strip("\n")))
    return out


def build(script: Path) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in script_cells(script):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(source))
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--execute", action="store_true", help="run it (ABLATION_SIZE picks the scale) and keep outputs")
    args = parser.parse_args()
    notebook = build(HERE / "ablations.py")
    if args.execute:
        from nbclient import NotebookClient

        NotebookClient(notebook, timeout=None, resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(notebook, HERE / "ablations.ipynb")
    print(f"wrote {HERE / 'ablations.ipynb'} (size {os.environ.get('ABLATION_SIZE', 'small')})")


if __name__ == "__main__":
    main()

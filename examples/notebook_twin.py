"""Build an example's notebook from its script twin (``# %%`` cells), so the two never drift:
``python examples/notebook_twin.py [examples/ablations.py examples/surgery.py ...] [--execute]`` writes each
script's ``.ipynb`` beside it (default: every script with a committed twin); tests check the committed notebooks'
cells match."""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
# The scripts that have a notebook twin; each picks its scale from its own environment variable.
TWINS = ("ablations.py", "surgery.py")


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
    cells = script_cells(Path(script))
    if not cells:
        raise ValueError(f"notebook_twin: {script} has no '# %%' cells")
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in cells:
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(source))
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scripts", nargs="*", type=Path, help=f"default: {', '.join(TWINS)}")
    parser.add_argument("--execute", action="store_true",
                        help="run it (the script's size variable, e.g. ABLATION_SIZE, picks the scale), keep outputs")
    args = parser.parse_args()
    for script in args.scripts or [HERE / name for name in TWINS]:
        script = script.resolve()
        notebook = build(script)
        if args.execute:
            from nbclient import NotebookClient

            NotebookClient(notebook, timeout=None, resources={"metadata": {"path": str(script.parent)}}).execute()
        nbformat.write(notebook, script.with_suffix(".ipynb"))
        print(f"wrote {script.with_suffix('.ipynb')}")


if __name__ == "__main__":
    main()

"""Keep the notebooks in git small and checkable: only ``# NBVAL_CHECK_OUTPUT`` cells keep outputs.

``python -m gnlib.tools.nbtools refresh notebooks/00_quickstart.ipynb`` executes a notebook with its default
parameters (papermill), then strips every output except those of cells marked ``# NBVAL_CHECK_OUTPUT``,
which ``pytest --nbval-lax`` compares on every test run. ``python -m gnlib.tools.nbtools check notebooks/*.ipynb``
exits non-zero when a notebook carries outputs it should not (or lacks the ones nbval needs).
``python -m gnlib.tools.nbtools figures outputs/00_quickstart.ipynb`` checks an *executed* notebook the way a
reader sees it: every figure a cell saves is also displayed as an image, and no cell shows a bare
``<Figure size ...>`` instead of its picture.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import nbformat

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")
BARE_FIGURE = re.compile(r"^<(matplotlib\.figure\.|gnlib\.plots\.)?\w*Figure size [\d.]+x[\d.]+ with \d+ Axes>$")


def is_checked(cell: nbformat.NotebookNode) -> bool:
    """Whether nbval compares this cell's output."""
    return cell.cell_type == "code" and CHECK_MARK in cell.source


def strip(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs, execution counts and run metadata, except outputs of checked cells."""
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if not is_checked(cell):
            cell.outputs = []
            cell.execution_count = None
        else:
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
    notebook.metadata.pop("papermill", None)
    notebook.metadata.pop("widgets", None)  # widget state (progress bars, explorers) of the run
    return notebook


def problems(notebook: nbformat.NotebookNode) -> list[str]:
    """Reasons ``notebook`` is not in its stored form (empty list when it is)."""
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if is_checked(cell) and not cell.outputs:
            found.append(f"cell {index} is marked {CHECK_MARK} but has no stored output")
        if not is_checked(cell) and cell.outputs:
            found.append(f"cell {index} has outputs but is not marked {CHECK_MARK}")
    if not any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells):
        found.append("no cell is tagged 'parameters'")
    return found


def images(cell: nbformat.NotebookNode) -> int:
    """Number of image outputs of a code cell (what a reader sees as pictures)."""
    return sum(
        any(kind in output.get("data", {}) for kind in IMAGE_TYPES)
        for output in cell.get("outputs", [])
        if output.get("output_type") in ("display_data", "execute_result")
    )


def figure_problems(notebook: nbformat.NotebookNode) -> list[str]:
    """Reasons an executed notebook does not show its figures (empty list when every figure is shown).

    A cell fails when one of its outputs is only a figure's text repr (``<Figure size 600x400 with 1
    Axes>``: the reader sees no picture), or when it saves more figures (``.savefig(`` calls in its
    source) than it displays images.
    """
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = data.get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if BARE_FIGURE.match(text.strip()) and not any(kind in data for kind in IMAGE_TYPES):
                found.append(f"cell {index} shows {text.strip()!r} instead of an image")
        saved, shown = cell.source.count(".savefig("), images(cell)
        if shown < saved:
            found.append(f"cell {index} saves {saved} figure(s) but displays {shown} image(s)")
    return found


def refresh(path: str | Path, kernel: str = "python3") -> None:
    """Execute ``path`` with its defaults (cwd: the current directory), strip it and write it back."""
    import papermill

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        executed = Path(tmp) / path.name
        papermill.execute_notebook(
            str(path), str(executed), kernel_name=kernel, cwd=str(Path.cwd()), progress_bar=False
        )
        notebook = strip(nbformat.read(executed, as_version=4))
    nbformat.write(notebook, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``refresh`` or ``check`` stored notebooks, or check the ``figures`` of executed ones."""
    parser = argparse.ArgumentParser(prog="python -m gnlib.tools.nbtools", description=__doc__)
    parser.add_argument("command", choices=["refresh", "check", "figures"])
    parser.add_argument("notebooks", nargs="+")
    args = parser.parse_args(argv)
    status = 0
    for name in args.notebooks:
        if args.command == "refresh":
            refresh(name)
            print(f"refreshed {name}")
        notebook = nbformat.read(name, as_version=4)
        if args.command == "figures":
            print(f"{name}: {sum(images(cell) for cell in notebook.cells if cell.cell_type == 'code')} image(s)")
        check = figure_problems if args.command == "figures" else problems
        for reason in check(notebook):
            print(f"{name}: {reason}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())

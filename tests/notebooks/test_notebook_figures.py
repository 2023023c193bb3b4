"""What a reader sees: every figure of an executed notebook is an image output, never a bare ``<Figure ...>``.

The papermill notebook tests (test_notebook_quickstart, test_notebooks_study, test_notebooks_workbook) run
:func:`gnlib.tools.nbtools.figure_problems` on each executed copy; these tests pin down what it accepts and
refuses, and that every notebook in ``notebooks/`` is executed by one of them.
"""

import base64
import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output

from gnlib.tools.nbtools import figure_problems, images, main

ROOT = Path(__file__).resolve().parents[2]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


def figure_cell(*outputs):
    return new_code_cell('figure = loss_curves(frame)\nfigure.savefig(out / "loss.png")\nfigure', outputs=list(outputs))


def test_a_bare_figure_repr_fails():
    bare = new_output("execute_result", {"text/plain": "<Figure size 600x400 with 1 Axes>"}, execution_count=1)
    problems = figure_problems(new_notebook(cells=[figure_cell(bare)]))
    assert problems == [
        "cell 0 shows '<Figure size 600x400 with 1 Axes>' instead of an image",
        "cell 0 saves 1 figure(s) but displays 0 image(s)",
    ]
    subclass = new_output("display_data", {"text/plain": "<NotebookFigure size 650x500 with 2 Axes>"})
    assert figure_problems(new_notebook(cells=[new_code_cell("display(f)", outputs=[subclass])])) == [
        "cell 0 shows '<NotebookFigure size 650x500 with 2 Axes>' instead of an image"
    ]


def test_a_saved_figure_without_an_image_fails_and_one_with_an_image_passes():
    table = new_output("execute_result", {"text/plain": "   step  loss"}, execution_count=1)
    assert figure_problems(new_notebook(cells=[figure_cell(table)])) == [
        "cell 0 saves 1 figure(s) but displays 0 image(s)"
    ]
    shown = new_output(
        "execute_result",
        {"image/png": PNG, "text/plain": "<NotebookFigure size 600x400 with 1 Axes>"},
        execution_count=1,
    )
    notebook = new_notebook(cells=[figure_cell(shown), new_code_cell("x = 1")])
    assert figure_problems(notebook) == [] and images(notebook.cells[0]) == 1


def test_command_line_counts_images_and_fails_on_problems(tmp_path, capsys):
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    nbformat.write(new_notebook(cells=[figure_cell(new_output("display_data", {"image/png": PNG}))]), good)
    nbformat.write(new_notebook(cells=[figure_cell()]), bad)
    assert main(["figures", str(good)]) == 0 and "good.ipynb: 1 image(s)" in capsys.readouterr().out
    assert main(["figures", str(bad)]) == 1 and "displays 0 image(s)" in capsys.readouterr().err


def test_every_notebook_is_executed_and_checked_by_a_papermill_test():
    sources = "".join(path.read_text() for path in (ROOT / "tests").rglob("test_notebook*.py"))
    executed = set(re.findall(r'"(\d\d_\w+?)(?:\.ipynb)?"', sources))
    notebooks = {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks <= executed, f"notebooks no papermill test executes: {sorted(notebooks - executed)}"
    for path in (ROOT / "tests").rglob("test_notebook*.py"):
        text = path.read_text()
        expects_failure = "pytest.raises(PapermillExecutionError)" in text  # refused runs stop before any figure
        if "papermill.execute_notebook" in text and not expects_failure:
            assert "figure_problems(" in text, f"{path.name} does not check its executed notebooks"

"""A results table cut short or damaged is refused by name; refused runs and sweeps leave nothing behind."""

import json
from pathlib import Path

import pandas as pd
import papermill
import pytest

from gnlib.report import main as report_main
from gnlib.study import study_table_from_sweep
from gnlib.sweep import read_results_table, run_sweep

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "fixtures" / "sweep_probe.ipynb"
NOTEBOOK_02 = REPO / "notebooks" / "02_iteration_complexity.ipynb"


def study_sweep(folder: Path) -> Path:
    """A sweep folder of notebook 02 as gnlib.sweep leaves it: results.csv and the sweep.json listing its runs."""
    rows = []
    for optimizer, m, lr, steps in [
        ("adamw", 1, 0.01, 40),
        ("adamw", 4, 0.01, 12),
        ("gn", 1, 0.01, 9),
        ("gn", 4, 0.01, 3),
    ]:
        rows.append(
            {
                "run_id": f"optimizers={optimizer},micro_batches={m}",
                "status": "ok",
                "error": None,
                "optimizer": optimizer,
                "micro_batches": m,
                "tokens_per_step": 512 * m,
                "lr": lr,
                "seed": 0,
                "steps_to_target": steps,
                "tokens_to_target": steps * 512 * m,
                "wall_time_to_target_s": steps * 0.1,
                "grad_equivalents_to_target": steps * m,
                "final_val_loss": 2.0,
                "target_loss": 2.2,
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    grid = {"optimizers": ["adamw", "gn"], "micro_batches": [1, 4]}
    (folder / "sweep.json").write_text(json.dumps({"grid": grid, "runs": [row["run_id"] for row in rows]}))
    return folder / "results.csv"


def cut(path: Path, share: float) -> None:
    """Keep the first ``share`` of the file's bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * share)])


def test_report_refuses_a_results_csv_cut_short_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Cut to 80% of its bytes, a sweep's table is refused by name: README and notebooks/results unchanged."""
    monkeypatch.chdir(tmp_path)
    results = study_sweep(tmp_path / "outputs" / "demo")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results: demo -->\nold\n<!-- /results -->\n")
    cut(results, 0.8)
    assert report_main([str(results.parent), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert f"results_csv={str(results)!r}" in err and "python -m gnlib.sweep GRID" in err
    assert readme.read_text() == "<!-- results: demo -->\nold\n<!-- /results -->\n"
    assert not (tmp_path / "notebooks").exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (None, "lacks the rows of 4 of the 4 runs"),  # the header only
        (bytes(range(256)) * 4, "is not UTF-8 text"),
        (0.5, "ends in the middle of a line"),
        (b"a,b\n1,2\n", "lacks the column(s) ['run_id', 'status']"),
    ],
    ids=["empty", "header-only", "random-bytes", "half-cut", "not-a-sweep-table"],
)
def test_a_damaged_results_csv_is_refused_naming_the_file_and_the_fix(tmp_path, content, problem):
    results = study_sweep(tmp_path)
    if content is None:
        results.write_text(results.read_text().splitlines()[0] + "\n")
    elif isinstance(content, float):
        cut(results, content)
    else:
        results.write_bytes(content)
    for read in (read_results_table, study_table_from_sweep):
        with pytest.raises(ValueError) as err:
            read(results)
        assert problem in str(err.value) and str(results) in str(err.value)
        assert "python -m gnlib.sweep GRID" in str(err.value)


def test_a_sweep_records_its_table_and_an_edited_table_is_refused(tmp_path):
    """sweep.json records the row count and SHA-256 of the table the sweep wrote; an edit keeping the rows fails."""
    spec = {"name": "probe", "notebook": str(PROBE), "grid": {"x": [1, 2]}}
    run_sweep(spec, output_root=tmp_path, verbose=False)
    results = tmp_path / "probe" / "results.csv"
    assert json.loads((tmp_path / "probe" / "sweep.json").read_text())["results"]["rows"] == 2
    assert read_results_table(results)["y"].tolist() == [1, 4]
    results.write_text(results.read_text().replace(",4,", ",5,"))
    with pytest.raises(ValueError, match=r"differs from the table of 2 row\(s\) the sweep recorded"):
        read_results_table(results)


def test_study_table_names_sweep_results_for_a_missing_file_or_a_sweep_without_an_ok_run(tmp_path):
    with pytest.raises(ValueError, match=r"sweep_results='.*nowhere\.csv' does not exist"):
        study_table_from_sweep(tmp_path / "nowhere.csv")
    results = study_sweep(tmp_path)
    results.write_text(results.read_text().replace(",ok,", ",failed,"))
    with pytest.raises(ValueError, match=r"sweep_results=.* has no run with status ok.*--retry-failed"):
        study_table_from_sweep(results)


def test_notebook_02_refuses_a_cut_sweep_results_before_writing_anything(tmp_path):
    """A half-cut sweep_results stops notebook 02 by the parameter's name; its output_dir is never made."""
    results = study_sweep(tmp_path / "sweep")
    cut(results, 0.5)
    out = tmp_path / "summary"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(NOTEBOOK_02),
            str(tmp_path / "run.ipynb"),
            parameters={"sweep_results": str(results), "output_dir": str(out)},
            kernel_name="python3",
            progress_bar=False,
        )
    assert "sweep_results=" in str(err.value) and "cut short" in str(err.value)
    assert not out.exists()

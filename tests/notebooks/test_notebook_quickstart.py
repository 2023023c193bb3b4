"""The quickstart notebook, executed headlessly with small parameters, writes what it promises."""

import json
from pathlib import Path

import nbformat
import papermill

from gnlib.tools.nbtools import figure_problems

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "00_quickstart.ipynb"


def test_quickstart_writes_results_and_figure(tmp_path):
    out = tmp_path / "quickstart"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={
            "optimizers": ["adamw", "gn"],
            "steps": 4,
            "micro_batches": 2,
            "eval_every": 2,
            "batch_size": 4,
            "seq_len": 32,
            "target_loss": 4.5,
            "output_dir": str(out),
        },
        kernel_name="python3",
        progress_bar=False,
    )
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert figure_problems(executed) == []
    # the training log: a progress bar per run (a widget, not stdout) and one line naming each optimizer
    (train_cell,) = [cell for cell in executed.cells if "run(spec" in cell.source]
    printed = "".join(o["text"] for o in train_cell.outputs if o.get("name") == "stdout").splitlines()
    assert [line.split(":")[0] for line in printed] == ["adamw", "gn"], printed
    outputs = [cell for cell in executed.cells if "readable_summary(" in cell.source][-1].outputs
    table = next(o for o in outputs if "data" in o)["data"]["text/plain"]
    assert "NaN" not in table and "steps to target" in table and "time to target (s)" in table
    printed = "".join(o.get("text", "") for o in outputs)  # how each run priced its passes, above the table
    assert "adamw: one gradient step per micro-batch" in printed and "gn: passes priced by measured costs" in printed
    results = json.loads((out / "results.json").read_text())
    assert (out / "val_loss.png").stat().st_size > 1000
    assert results["parameters"]["steps"] == 4 and len(results["corpus_sha256"]) == 64
    assert set(results["parameters"]) == set(papermill.inspect_notebook(str(NOTEBOOK)))  # every parameter
    runs = {run["optimizer"]: run for run in results["runs"]}
    assert set(runs) == {"adamw", "gn"}
    for name, run in runs.items():
        assert run["steps"] <= 4 and run["final_val_loss"] < 5.0
        assert (out / name / "history.jsonl").exists() and (out / name / "metadata.json").exists()
    # equal tokens per outer step: AdamW accumulates 2 micro-batches, GN runs 2 inner steps (+ line search)
    assert runs["adamw"]["tokens"] == runs["adamw"]["steps"] * 2 * 4 * 32
    assert runs["gn"]["tokens"] >= runs["gn"]["steps"] * 2 * 4 * 32


def test_help_lists_typed_described_parameters():
    params = papermill.inspect_notebook(str(NOTEBOOK))
    for name in (
        "preset",
        "corpus",
        "optimizers",
        "steps",
        "batch_size",
        "learning_rates",
        "seed",
        "device",
        "target_loss",
        "output_dir",
    ):
        assert params[name]["inferred_type_name"] != "None" and params[name]["help"], name

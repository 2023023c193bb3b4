"""The quickstart notebook, executed headlessly with small parameters, writes what it promises."""

import json
from pathlib import Path

import papermill

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_quickstart.ipynb"


def test_quickstart_writes_results_and_figure(tmp_path):
    out = tmp_path / "quickstart"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={"steps": 12, "eval_every": 4, "batch_size": 8, "seq_len": 32, "target_loss": 4.0,
                    "output_dir": str(out)},
        kernel_name="python3",
        progress_bar=False,
    )
    results = json.loads((out / "results.json").read_text())
    assert (out / "val_loss.png").stat().st_size > 1000
    assert results["parameters"]["steps"] == 12 and len(results["corpus_sha256"]) == 64
    (run,) = results["runs"]
    assert run["optimizer"] == "adamw" and run["steps"] <= 12 and run["final_val_loss"] < 5.0
    assert (out / "adamw" / "history.jsonl").exists() and (out / "adamw" / "metadata.json").exists()


def test_help_lists_typed_described_parameters():
    params = papermill.inspect_notebook(str(NOTEBOOK))
    for name in ("preset", "corpus", "optimizers", "steps", "batch_size", "learning_rates", "seed", "device",
                 "target_loss", "output_dir"):
        assert params[name]["inferred_type_name"] != "None" and params[name]["help"], name

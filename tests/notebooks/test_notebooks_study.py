"""The study notebooks (02 iteration complexity, 03 layerwise vs full) and the smoke sweep, with small parameters."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import yaml

from gnlib.experiment.study import study_table_from_sweep
from gnlib.tools.nbtools import figure_problems
from gnlib.tools.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SMALL = {"max_steps": 6, "warmup_steps": 10, "target_loss": 3.3, "val_batches": 2}


def directions_table(tmp_path):
    """A results.csv as notebook 05 writes it (two checkpoints, a few methods), for notebook 02's directions_results."""
    rows = [
        (step, method, cosine, ratio)
        for step in (0, 400)
        for method, cosine, ratio in [("exact GN", 1.0, 1.0), ("layerwise GN", 0.5, 0.6), ("Adam", 0.1, 0.05)]
    ]
    path = tmp_path / "directions.csv"
    pd.DataFrame(rows, columns=["step", "method", "cosine", "reduction_ratio"]).to_csv(path, index=False)
    return str(path)


def execute(name, tmp_path, **parameters):
    out = tmp_path / name
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(tmp_path / f"{name}.executed.ipynb"),
        parameters={**SMALL, "warmup_dir": str(tmp_path / "warmup"), "output_dir": str(out), **parameters},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(ROOT),
    )
    assert figure_problems(nbformat.read(tmp_path / f"{name}.executed.ipynb", as_version=4)) == []
    return out


def test_iteration_complexity_notebook(tmp_path):
    out = execute(
        "02_iteration_complexity",
        tmp_path,
        optimizers=["adamw", "gn", "gn_layerwise"],
        micro_batches=[1, 2],
        lr_grids={"adamw": [1e-2], "gn": [1e-2, 3e-2], "gn_layerwise": [3e-2]},
        seeds=[0],
        early_target=3.45,
        directions_results=directions_table(tmp_path),
    )
    table = pd.read_csv(out / "results.csv")
    reached = table.loc[table["steps_to_target"].notna()]  # the early target first, on the same runs
    assert len(reached) and (reached["steps_to_early_target"] < reached["steps_to_target"]).all()
    assert (out / "to_early_target.csv").exists() and (out / "steps_vs_batch_early.png").stat().st_size > 5000
    assert len(table) == 8 and set(table["optimizer"]) == {"adamw", "gn", "gn_layerwise"}
    assert table.groupby(["optimizer", "micro_batches"])["chosen"].sum().eq(1).all()
    gn = table.loc[table["chosen"] & (table["optimizer"] == "gn")]
    assert gn.loc[gn["micro_batches"] == 2, "steps_to_target"].notna().all()
    for figure in ("steps_vs_batch.png", "cost_vs_batch.png"):
        assert (out / figure).stat().st_size > 5000
    critical = pd.read_csv(out / "critical_batch.csv")
    assert set(critical["optimizer"]) == {"adamw", "gn", "gn_layerwise"}
    ratios = pd.read_csv(out / "ratios.csv", index_col=0)
    assert list(ratios.columns) == ["adamw", "gn_layerwise"] and list(ratios.index) == [1, 2]
    shares = pd.read_csv(out / "gain_shares.csv")  # layerwise GN's share of GN's gain over AdamW, per batch
    assert shares[["method", "micro_batches"]].values.tolist() == [["gn_layerwise", 1], ["gn_layerwise", 2]]
    assert (out / "gain_shares.png").stat().st_size > 5000
    points = pd.read_csv(out / "directions_vs_steps.csv")  # the last checkpoint's directions, the largest batch
    assert points[["method", "step", "tokens_per_step"]].values.tolist() == [
        ["gn_layerwise", 400, 512],
        ["adamw", 400, 512],
    ]
    assert points["reduction_ratio"].tolist() == [0.6, 0.05] and (out / "directions_vs_steps.png").exists()
    assert not (out / "results.json").exists()  # only a single sweep point writes it
    assert len(list((tmp_path / "warmup").glob("*/model.pt"))) == 1


def test_iteration_complexity_reads_a_sweep(tmp_path):
    spec = yaml.safe_load((NOTEBOOKS / "grids" / "smoke.yaml").read_text())
    spec["parameters"]["warmup_dir"] = str(tmp_path / "warmup")
    table = run_sweep(spec, output_root=tmp_path, cwd=ROOT, verbose=False)
    assert table["status"].tolist() == ["ok"] * 3 and table["optimizers"].tolist() == ["adamw", "gn", "gn_layerwise"]
    assert table["steps_to_target"].notna().all() and (table["tokens_per_step"] == 2 * 8 * 32).all()
    point = json.loads((tmp_path / "study_smoke" / "optimizers=gn" / "results.json").read_text())
    assert point["optimizer"] == "gn" and point["micro_batches"] == 2 and point["grad_equivalents_to_target"] > 0
    assert point["status_reason"] is None and {"result_status", "status_reason"} <= set(table.columns)
    study = study_table_from_sweep(tmp_path / "study_smoke" / "results.csv")
    assert study["chosen"].all() and study["on_edge"].all()  # one LR per setting: flagged
    out = execute(
        "02_iteration_complexity",
        tmp_path,
        sweep_results=str(tmp_path / "study_smoke" / "results.csv"),
        directions_results=directions_table(tmp_path),
    )
    summary = pd.read_csv(out / "results.csv")
    assert summary[["optimizer", "steps_to_target"]].equals(study[["optimizer", "steps_to_target"]])
    assert summary["steps_to_early_target"].notna().all() and (out / "steps_vs_batch_early.png").exists()
    assert (out / "steps_vs_batch.png").exists() and (out / "gain_shares.csv").exists()


def test_layerwise_vs_full_notebook(tmp_path):
    out = execute(
        "03_layerwise_vs_full",
        tmp_path,
        partitions=["per_layer", "halves"],
        micro_batches=2,
        lr_grids={"adamw": [1e-2], "gn": [3e-2]},
        cosine_steps=[0, 2],
    )
    table = pd.read_csv(out / "results.csv")
    assert set(table["optimizer"]) == {"adamw", "gn", "gn_per_layer", "gn_halves"}
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert summary.loc["gn", "vs_full"] == 1.0 and pd.isna(summary.loc["adamw", "gain_share"])
    cosines = pd.read_csv(out / "directions.csv")
    assert len(cosines) == 4 and cosines["cosine"].between(0, 1 + 1e-6).all()
    assert sorted(cosines["step"].unique()) == [0, 2]
    assert (out / "direction_cosines.png").stat().st_size > 5000 and (out / "steps.png").exists()

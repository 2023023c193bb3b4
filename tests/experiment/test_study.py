"""The study: LR choice, warm-up cache, equal-token study specs, the batch-size study, critical batch size, ratios."""

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from gnlib.experiment.lr_choice import best_variants, choose_lr, collapse_variants, lr_sweep
from gnlib.experiment.method_comparison import (
    directions_against_steps,
    gain_share,
    gain_shares,
    gain_summary,
    ratio_table,
)
from gnlib.experiment.runs import RunSpec, run
from gnlib.experiment.study import (
    EARLY_TARGET_COLUMNS,
    STUDY_COLUMNS,
    at_early_target,
    batch_size_study,
    critical_batch_size,
    fit_critical_batch,
    study_spec,
    study_table_from_sweep,
    variant_label,
    warmup_checkpoint,
)
from gnlib.models import build_model

MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)
BASE = RunSpec(steps=6, batch_size=8, seq_len=32, eval_every=1, val_batches=2, model_overrides=MODEL)


def test_choose_lr_marks_best_and_edge():
    table = pd.DataFrame(
        {
            "optimizer": ["a"] * 6 + ["b"] * 2,
            "micro_batches": [1] * 8,
            "lr": [1e-3, 1e-3, 1e-2, 1e-2, 1e-1, 1e-1, 1e-3, 1e-2],
            "seed": [0, 1] * 4,
            "steps_to_target": [30, 32, 10, 14, None, 12, None, None],
            "final_val_loss": [3.0, 3.0, 2.0, 2.1, 9.0, 2.0, 3.5, 3.2],
        }
    )
    marked = choose_lr(table)
    a = marked.loc[marked["optimizer"] == "a"]
    assert a.loc[a["chosen"], "lr"].unique().tolist() == [1e-2]  # median steps 12 beats inf-containing 1e-1
    assert not a["on_edge"].any()
    b = marked.loc[marked["optimizer"] == "b"]
    assert b.loc[b["chosen"], "lr"].tolist() == [1e-2] and b["on_edge"].all()  # neither reached: lower loss
    with pytest.raises(ValueError, match="lacks column"):
        choose_lr(table.drop(columns="lr"))


def test_choose_lr_compares_lrs_on_the_seeds_they_share():
    """Tuned on seed 0, repeated at the winner with seeds 1 and 2: worse repeats do not move the choice."""
    table = pd.DataFrame(
        {
            "optimizer": ["a"] * 5,
            "micro_batches": [1] * 5,
            "lr": [1e-3, 1e-2, 1e-1, 1e-2, 1e-2],
            "seed": [0, 0, 0, 1, 2],
            "steps_to_target": [20, 10, 15, 30, 40],  # all seeds at 1e-2: median 30, worse than 1e-1's 15
            "final_val_loss": [2.0] * 5,
        }
    )
    marked = choose_lr(table)
    assert marked.loc[marked["chosen"], "seed"].tolist() == [0, 1, 2]
    assert set(marked.loc[marked["chosen"], "lr"]) == {1e-2}
    assert choose_lr(table.drop(columns="seed")).loc[lambda t: t["chosen"], "lr"].tolist() == [1e-1]


def test_choose_lr_weighs_variants_tuned_with_the_lr_against_each_other():
    """K-FAC-like dampings tuned with the LR: only the best damping is a tuned point, flagged at its ends."""

    def variants(steps: dict[str, list], key: str = "damping") -> pd.DataFrame:
        rows = [
            dict(
                optimizer=f"kfac ({key}={value})",
                variant_of="kfac",
                micro_batches=4,
                lr=lr * float(value),
                seed=0,
                steps_to_target=s,
                final_val_loss=2.0 if s else 2.5,
            )
            for value, lr_steps in steps.items()
            for lr, s in zip((0.3, 1.0, 3.0), lr_steps)
        ]
        return pd.DataFrame(rows)

    # damping 0.1 wins inside both its LR grid and the dampings: no edge anywhere, though 1.0's best LR is its 0.3
    inner = variants({"0.01": [50, 40, None], "0.1": [30, 20, 25], "1.0": [35, 45, 60]})
    marked = choose_lr(inner)
    assert not marked["on_edge"].any()
    assert marked.loc[marked["chosen"], ["optimizer", "lr"]].values.tolist()[1] == ["kfac (damping=0.1)", 0.1]
    assert best_variants(marked) == {("kfac", 4): "kfac (damping=0.1)"}
    # without the column each damping is a setting of its own: 1.0's best LR is on its edge
    separate = choose_lr(inner.drop(columns="variant_of"))
    assert separate.loc[separate["on_edge"], "optimizer"].unique().tolist() == ["kfac (damping=1.0)"]
    # the smallest damping wins: on the edge of the dampings although its LR is inside its grid
    low = choose_lr(variants({"0.01": [30, 10, 25], "0.1": [30, 20, 25], "1.0": [35, 45, 60]}))
    assert low.loc[low["on_edge"], "optimizer"].unique().tolist() == ["kfac (damping=0.01)"]
    # the middle damping wins at the edge of its own LRs: still on the edge
    own = choose_lr(variants({"0.01": [50, 40, 45], "0.1": [30, 20, 10], "1.0": [35, 45, 60]}))
    assert own.loc[own["on_edge"], "optimizer"].unique().tolist() == ["kfac (damping=0.1)"]
    # variants of different options have no common scale: only the LR edge counts
    mixed = pd.concat(
        [variants({"0.01": [30, 10, 25]}), variants({"10": [30, 20, 25]}, key="inverse_every")], ignore_index=True
    )
    assert not choose_lr(mixed)["on_edge"].any()
    # a lone variant at a batch is judged by its LR alone
    assert not choose_lr(variants({"0.1": [30, 20, 25]}))["on_edge"].any()
    # a run at the default options takes part without a value: the largest damping still wins on the edge
    default = variants({"0.01": [50, 40, 45], "0.1": [30, 20, 25], "1.0": [35, 15, 60]})
    default = pd.concat([default, default.iloc[3:6].assign(optimizer="kfac", steps_to_target=[40, 30, 35])])
    flagged = choose_lr(default.reset_index(drop=True))
    assert flagged.loc[flagged["on_edge"], "optimizer"].unique().tolist() == ["kfac (damping=1.0)"]


def test_collapse_variants_keeps_each_batchs_best_variant_under_its_optimizers_name():
    rows = [
        dict(optimizer=f"kfac (damping={d})", variant_of="kfac", micro_batches=m, lr=lr, seed=0, steps_to_target=s)
        for d, m, lr, s in [(0.1, 1, 0.1, 30), (1.0, 1, 1.0, 40), (0.1, 4, 0.1, None), (1.0, 4, 1.0, 12)]
    ]
    rows.append(dict(optimizer="muon", variant_of=None, micro_batches=1, lr=0.01, seed=0, steps_to_target=20))
    table = choose_lr(pd.DataFrame(rows).assign(final_val_loss=2.0))
    collapsed = collapse_variants(table)
    assert collapsed[["optimizer", "micro_batches", "variant"]].fillna("-").values.tolist() == [
        ["kfac", 1, "kfac (damping=0.1)"],  # 30 steps against 40
        ["kfac", 4, "kfac (damping=1.0)"],  # the one that reached the target
        ["muon", 1, "-"],
    ]
    assert collapse_variants(table.drop(columns="variant_of")).equals(table.drop(columns="variant_of"))


def test_lr_sweep_flags_an_optimum_at_the_grid_edge():
    spec = dataclasses.replace(BASE, steps=4, eval_every=4)
    table, best = lr_sweep(spec, [1e-4, 3e-4, 1e-3], target=0.0)  # unreachable: ranked by final loss
    assert len(table) == 3 and table["final_val_loss"].is_monotonic_decreasing
    assert best["lr"] == 1e-3 and best["on_edge"] is True


def test_warmup_checkpoint_is_cached_and_shared(tmp_path):
    path = warmup_checkpoint(BASE, 3, lr=1e-2, root=tmp_path)
    stamp = path.stat().st_mtime_ns
    assert warmup_checkpoint(dataclasses.replace(BASE, seed=7, optimizer="gn"), 3, lr=1e-2, root=tmp_path) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not retrained
    other = warmup_checkpoint(BASE, 4, lr=1e-2, root=tmp_path)
    assert other != path and other.parent.parent == path.parent.parent
    state = torch.load(path, weights_only=True)
    fresh = build_model("tiny", seed=0, **MODEL).state_dict()
    assert state.keys() == fresh.keys() and not torch.equal(state["embed.weight"], fresh["embed.weight"])
    starts = [
        run(dataclasses.replace(BASE, steps=1, seed=s, init_checkpoint=str(path)), progress=False) for s in (0, 1)
    ]
    starts = [h.rows[0]["val_loss"] for h in starts]
    assert starts[0] == starts[1]  # every seed starts from the same point, evaluated on the same set
    with pytest.raises(ValueError, match="steps"):
        warmup_checkpoint(BASE, 0, root=tmp_path)
    wide = dataclasses.replace(BASE, batch_size=4 * BASE.batch_size)  # other micro-batches, one warm-up
    assert warmup_checkpoint(wide, 3, lr=1e-2, root=tmp_path, batch_size=BASE.batch_size) == path
    assert warmup_checkpoint(wide, 3, lr=1e-2, root=tmp_path) not in (path, other)


def test_study_spec_gives_equal_tokens_per_outer_step():
    gn = study_spec(BASE, "gn", 4, 0.01, 1)
    adamw = study_spec(BASE, "adamw", 4, 0.01, 1)
    assert gn.hyperparameters["inner_steps"] == 4 and gn.accumulation == 1 and adamw.accumulation == 4
    assert gn.tokens_per_step == adamw.tokens_per_step == 4 * 8 * 32
    budget = 10 * 4 * 8 * 32  # ten steps of 4 micro-batches, five of 8; BASE.steps (6) caps the smaller batch
    assert [study_spec(BASE, name, m, 0.01, 1, max_tokens=budget).steps for name, m in [("gn", 8), ("adamw", 4)]] == [
        5,
        6,
    ]
    assert study_spec(BASE, "adamw", 4, 0.01, 1, max_tokens=1).steps == 1 and adamw.steps == BASE.steps
    halves = {"gn_halves": {"optimizer": "gn", "hyperparameters": {"blocks": "halves"}}}
    variant = study_spec(BASE, "gn_halves", 2, 0.01, 0, halves)
    assert variant.optimizer == "gn" and variant.hyperparameters == {"blocks": "halves", "inner_steps": 2}
    paper = study_spec(RunSpec(preset="paper45m", seq_len=1024, batch_size=32), "gn", 122, 0.01, 0)
    paper.validate()  # the study's configuration is a valid spec (run it with device="cuda")
    assert paper.tokens_per_step == 122 * 32 * 1024
    with pytest.raises(ValueError, match="micro_batches"):
        study_spec(BASE, "gn", 0, 0.01, 0)
    with pytest.raises(ValueError, match=r"inner_steps=8.*micro_batches=4"):  # not silently replaced
        study_spec(BASE, "gn", 4, 0.01, 0, hyperparameters={"gn": {"inner_steps": 8}})
    assert study_spec(BASE, "gn", 4, 0.01, 0, hyperparameters={"gn": {"inner_steps": 4}}).hyperparameters == {
        "inner_steps": 4
    }
    with pytest.raises(ValueError, match="optimizer"):
        study_spec(BASE, "gn_diagonal", 2, 0.01, 0)
    with pytest.raises(ValueError, match="lrs"):
        batch_size_study(["adamw", "gn"], [1], {"adamw": [0.01]}, [0], 3.0, BASE)


def test_batch_size_study_table(tmp_path):
    table = batch_size_study(
        ["adamw", "gn"],
        [1, 2],
        {"adamw": [1e-2], "gn": [1e-2, 3e-2]},
        [0],
        5.0,
        dataclasses.replace(BASE, steps=2),
        tmp_path,
    )
    assert list(table.columns) == [*STUDY_COLUMNS, "chosen", "on_edge"] and len(table) == 6
    chosen = table.loc[table["chosen"]]
    assert (chosen["steps_to_target"] <= 2).all()  # 5.0: below the initial loss ln 256 ≈ 5.55 after a step or two
    assert (table.groupby("micro_batches")["tokens_per_step"].nunique() == 1).all()
    assert table.groupby(["optimizer", "micro_batches"])["chosen"].sum().eq(1).all()
    gn = chosen.loc[chosen["optimizer"] == "gn"]
    assert (gn["grad_equivalents_to_target"] > gn["micro_batches"] * gn["steps_to_target"]).all()  # inner step > 1
    assert (tmp_path / "study.csv").exists()
    assert (tmp_path / "gn" / "m=2" / "lr=0.03" / "seed=0" / "history.jsonl").exists()


def test_an_early_target_is_a_second_reading_of_the_same_runs(tmp_path):
    args = (["adamw"], [1], {"adamw": [1e-2]}, [0], 5.0, dataclasses.replace(BASE, steps=2), tmp_path)
    with pytest.raises(ValueError, match="early_target=4.0 is invalid; allowed: a loss above target=5.0"):
        batch_size_study(*args, early_target=4.0)
    table = batch_size_study(*args, early_target=5.5)
    assert list(table.columns) == [*STUDY_COLUMNS, *EARLY_TARGET_COLUMNS, "chosen", "on_edge"]
    early = at_early_target(table)
    assert early.loc[0, "steps_to_target"] == table.loc[0, "steps_to_early_target"] <= table.loc[0, "steps_to_target"]
    assert list(early.columns) == list(table.drop(columns=list(EARLY_TARGET_COLUMNS)).columns)
    with pytest.raises(ValueError, match="no early target"):
        at_early_target(early)


def study(steps: dict) -> pd.DataFrame:
    rows = [
        {
            "optimizer": name,
            "micro_batches": m,
            "tokens_per_step": m * 100,
            "lr": 0.1,
            "seed": seed,
            "steps_to_target": s,
            "final_val_loss": 1.0,
        }
        for name, per_batch in steps.items()
        for m, s in per_batch.items()
        for seed in (0, 1)
    ]
    return choose_lr(pd.DataFrame(rows))


def test_critical_batch_size_on_hand_made_tables():
    table = study(
        {
            "sgd": {1: 100, 2: 50, 4: 26, 8: 20},  # per-doubling ratios 0.5, 0.52, 0.77: critical 4
            "gn": {1: 100, 2: 50, 4: 25, 8: 12.5},  # perfect scaling throughout: at least 8
            "adamw": {1: None, 2: 80, 4: 40, 8: 20},  # misses at the smallest batch
            "muon": {1: 100, 2: 60, 4: None, 8: 10},  # misses at 4: the walk stops at 2
            "soap": {1: 100, 4: 30, 8: 20},  # 1 -> 4 is two doublings: (0.3)^(1/2) = 0.548 per doubling
        }
    )
    got = critical_batch_size(table).set_index("optimizer")
    # bracketed: scaling held 1 -> 2 -> 4 and failed 4 -> 8
    assert got.loc["sgd", "critical_micro_batches"] == 4 and got.loc["sgd", "critical_tokens"] == 400
    assert got.loc["sgd", "next_tokens"] == 800 and got.loc["sgd", "critical"] == "between 400 and 800 tokens"
    assert got.loc["sgd", "ratios"] == "0.50, 0.52, 0.77" and not got.loc["sgd", "beyond_grid"]
    # never failed: no number, beyond the grid
    assert pd.isna(got.loc["gn", "critical_micro_batches"]) and got.loc["gn", "beyond_grid"]
    assert got.loc["gn", "critical"] == "beyond the grid (at least 800 tokens)"
    assert pd.isna(got.loc["adamw", "critical_micro_batches"])
    assert got.loc["adamw", "critical"] == "target missed at the smallest batch"
    # a miss at 4 is a failed step: between 2 and 4
    assert got.loc["muon", "critical_micro_batches"] == 2 and got.loc["muon", "next_tokens"] == 400
    assert got.loc["soap", "critical_micro_batches"] == 4
    # failing at the first step: below the grid, no number from the smallest batch alone
    strict = critical_batch_size(table, max_ratio=0.53).set_index("optimizer")
    assert pd.isna(strict.loc["soap", "critical_micro_batches"]) and strict.loc["soap", "below_grid"]
    assert strict.loc["soap", "critical"] == "below the grid (at most 100 tokens)"
    one_batch = critical_batch_size(study({"gn": {4: 10}})).set_index("optimizer")
    assert pd.isna(one_batch.loc["gn", "critical_tokens"])
    assert one_batch.loc["gn", "critical"] == "needs two batch sizes"
    with pytest.raises(ValueError, match="max_ratio"):
        critical_batch_size(table, max_ratio=0.4)


def test_ratio_table_and_gain_share():
    table = study({"gn": {1: 10, 4: 5}, "soap": {1: 20, 4: 27}, "adamw": {1: None, 4: 50}})
    ratios = ratio_table(table, reference="gn")
    assert list(ratios.columns) == ["soap", "adamw"] and list(ratios.index) == [1, 4]
    assert ratios.loc[4, "soap"] == pytest.approx(5.4) and ratios.loc[4, "adamw"] == 10
    assert math.isnan(ratios.loc[1, "adamw"])
    with pytest.raises(ValueError, match="reference"):
        ratio_table(table, reference="muon")
    assert gain_share(100, 60, 50) == pytest.approx(0.8)
    assert gain_share(100, 100, 50) == 0 and math.isnan(gain_share(50, 40, 60))


def test_study_table_from_sweep_reads_outcomes(tmp_path):
    raw = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "status": ["ok", "ok", "failed"],
            "optimizers": ["gn", "gn", "gn"],
            "lr": [0.01, 0.03, 0.1],
            "micro_batches": [2, 2, 2],
            "optimizer": ["gn"] * 3,
            "result_micro_batches": [2, 2, None],
            "tokens_per_step": [512] * 3,
            "result_lr": [0.01, 0.03, None],
            "seed": [0, 0, None],
            "steps_to_target": [9, None, None],
            "final_val_loss": [2.5, 2.9, None],
            "steps": [9, 30, None],
            "tokens": [1, 2, None],
            "grad_equivalents": [1.0, 2.0, None],
            "grad_equivalents_to_target": [1.0, None, None],
            "wall_time_s": [1.0, 1.0, None],
            "result_status": ["reached_target", "completed", None],
        }
    )
    raw.to_csv(tmp_path / "results.csv", index=False)
    table = study_table_from_sweep(tmp_path / "results.csv")
    assert len(table) == 2 and table.loc[table["chosen"], "lr"].tolist() == [0.01]
    assert table["status"].tolist() == ["reached_target", "completed"]


def test_study_table_from_an_ablation_sweep_labels_each_variant(tmp_path):
    """Grid keys besides optimizer, batch, LR and seed (an ablation's options) make settings of their own."""
    grid = [
        {"hyperparameters": [{}, {"gn": {"warm_start": False}}], "batch_size": [32]},
        {"hyperparameters": [{}], "batch_size": [128]},
    ]
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": grid}))
    options = ["{}", '{"gn": {"warm_start": false}}', "{}"]
    raw = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "status": ["ok"] * 3,
            "hyperparameters": options,
            "batch_size": [32, 32, 128],
            "optimizer": ["gn"] * 3,
            "micro_batches": [8, 8, 2],
            "tokens_per_step": [16384] * 3,
            "lr": [0.01] * 3,
            "seed": [0] * 3,
            "steps_to_target": [5, 9, 6],
        }
    )
    raw.to_csv(tmp_path / "results.csv", index=False)
    table = study_table_from_sweep(tmp_path / "results.csv")
    assert table["optimizer"].tolist() == [
        "gn (batch_size=32)",
        "gn (warm_start=False, batch_size=32)",
        "gn (batch_size=128)",
    ]
    assert table["chosen"].all()  # each variant is its own setting, not an LR candidate of another
    (tmp_path / "sweep.json").unlink()
    assert study_table_from_sweep(tmp_path / "results.csv")["optimizer"].tolist() == ["gn"] * 3
    assert variant_label("adamw", {"hyperparameters": {"gn": {"ema": 0.999}}}) == "adamw"


def test_a_setting_whose_seeds_mostly_miss_counts_as_missed():
    rows = []
    for seed, steps in enumerate([50.0, None, None]):
        rows.append(
            dict(
                optimizer="gn",
                micro_batches=2,
                tokens_per_step=64,
                lr=0.01,
                seed=seed,
                steps_to_target=steps,
                chosen=True,
            )
        )
    for seed in range(3):
        rows.append(
            dict(
                optimizer="adamw",
                micro_batches=2,
                tokens_per_step=64,
                lr=0.01,
                seed=seed,
                steps_to_target=90.0,
                chosen=True,
            )
        )
    ratios = ratio_table(pd.DataFrame(rows), reference="gn")
    assert ratios.isna().all().all()  # GN's median is a miss, so no finite ratio to it


def test_gain_summary_by_hand():
    rows = []
    for name, lr, steps in [
        ("adamw", 0.01, (30, 30)),
        ("gn", 0.01, (10, 12)),
        ("gn", 0.03, (40, 40)),
        ("gn_per_layer", 0.01, (20, 20)),
        ("gn_halves", 0.01, (15, None)),
    ]:
        for seed, s in enumerate(steps):
            rows.append(
                dict(
                    optimizer=name,
                    micro_batches=4,
                    tokens_per_step=512,
                    lr=lr,
                    seed=seed,
                    steps_to_target=s,
                    final_val_loss=2.0,
                    grad_equivalents_to_target=None if s is None else 2.0 * s,
                )
            )
    summary = gain_summary(choose_lr(pd.DataFrame(rows)), full="gn", baseline="adamw")
    assert list(summary.index) == ["adamw", "gn", "gn_per_layer", "gn_halves"]
    assert summary.loc["gn", "lr"] == 0.01 and summary.loc["gn", "steps_to_target"] == 11  # tuned LR, median of seeds
    assert summary.loc["gn", "grad_equivalents_to_target"] == 22
    assert summary.loc["gn_per_layer", "vs_full"] == 20 / 11
    assert summary.loc["gn_per_layer", "gain_share"] == (30 - 20) / (30 - 11)  # keeps 10 of full GN's 19 steps
    assert math.isnan(summary.loc["gn_halves", "steps_to_target"])  # one of two seeds missed: the median misses
    assert math.isnan(summary.loc["gn_halves", "gain_share"])
    assert summary.loc[["gn", "adamw"], "gain_share"].isna().all()
    with pytest.raises(ValueError, match="micro_batches"):
        gain_summary(choose_lr(pd.DataFrame(rows).assign(micro_batches=[1, 2] * 5)))
    with pytest.raises(ValueError, match="baseline"):
        gain_summary(choose_lr(pd.DataFrame(rows)), baseline="soap")


def test_fit_critical_batch_recovers_the_model_and_flags_no_floor_or_no_gain():
    """Steps made by S = S_min (1 + B_crit/B) give back S_min and B_crit; a pure 1/B law has no floor."""
    tokens = [1024, 4096, 16384, 131072]
    steps = [50 * (1 + 2000 / b) for b in tokens]
    steps_min, critical = fit_critical_batch(tokens, steps)
    assert steps_min == pytest.approx(50) and critical == pytest.approx(2000)
    assert fit_critical_batch(tokens, [1e6 / b for b in tokens])[1] == math.inf  # perfect scaling throughout
    assert fit_critical_batch(tokens, [40, 40, 41, 42])[1] == 0.0  # no gain from the batch
    with pytest.raises(ValueError, match="three or more"):
        fit_critical_batch(tokens[:2], steps[:2])
    rows = [
        {"optimizer": "sgd", "micro_batches": b // 1024, "tokens_per_step": b, "steps_to_target": s}
        for b, s in zip(tokens, steps)
    ]
    found = critical_batch_size(pd.DataFrame(rows)).iloc[0]
    assert found["fit"] == "about 2,000 tokens" and found["fit_critical_tokens"] == pytest.approx(2000)


def _sweep(
    folder: Path,
    grid: list[dict],
    parameters: dict,
    rows: list[dict],
    extends: str | None = None,
    replicate: dict | None = None,
) -> Path:
    """A published sweep folder: results.csv of ok runs and its sweep.json (as gnlib.tools.sweep writes them)."""
    folder.mkdir(parents=True)
    base = {"status": "ok", "micro_batches": 4, "tokens_per_step": 4096, "seed": 0}
    pd.DataFrame([{"run_id": f"r{i}", **base, **row} for i, row in enumerate(rows)]).to_csv(
        folder / "results.csv", index=False
    )
    manifest = {"name": folder.name, "notebook": "/any/02_iteration_complexity.ipynb", "parameters": parameters}
    (folder / "sweep.json").write_text(
        json.dumps({**manifest, "grid": grid, "extends": extends, "replicate": replicate})
    )
    return folder / "results.csv"


def test_a_sweep_that_extends_a_published_one_is_read_as_one_study(tmp_path, monkeypatch):
    """The extended sweep's runs come first; its rows have no value for the new grid key and keep their names."""
    monkeypatch.chdir(tmp_path)
    setup = {"preset": "tiny", "target_loss": 2.2}
    _sweep(
        tmp_path / "published" / "base",
        [{"optimizers": ["gn", "muon"], "lr": [0.1]}],
        setup,
        [dict(optimizer="gn", lr=0.1, steps_to_target=5), dict(optimizer="muon", lr=0.1, steps_to_target=30)],
    )
    options = ['{"kfac": {"damping": 0.1}}', '{"kfac": {"damping": 1.0}}']
    new = _sweep(
        tmp_path / "outputs" / "more",
        [{"optimizers": ["kfac"], "lr": [0.3], "hyperparameters": [json.loads(o) for o in options]}],
        setup,
        [dict(optimizer="kfac", lr=0.3, hyperparameters=o, steps_to_target=s) for o, s in zip(options, (20, 25))],
        extends="published/base",
    )
    table = study_table_from_sweep(new)
    assert table["optimizer"].tolist() == ["gn", "muon", "kfac (damping=0.1)", "kfac (damping=1.0)"]
    assert table["steps_to_target"].tolist() == [5, 30, 20, 25] and "hyperparameters" not in table.columns
    shares = gain_shares(table)
    assert shares[["method", "setting", "first_order"]].values.tolist() == [["kfac", "kfac (damping=0.1)", "muon"]]
    assert shares["gain_share"].tolist() == [pytest.approx((30 - 20) / (30 - 5))]
    (tmp_path / "published" / "base" / "results.csv").unlink()
    with pytest.raises(ValueError, match="extends the sweep 'published/base'"):
        study_table_from_sweep(new)


def test_options_tuned_with_the_lr_make_variants_of_one_optimizer(tmp_path):
    """replicate.at_best naming hyperparameters: every run of an optimizer with options, defaults too, is a variant."""
    options = ["{}", '{"kfac": {"damping": 0.1}}', '{"kfac": {"damping": 1.0}}']
    rows = [dict(optimizer="kfac", lr=0.3, hyperparameters=o, steps_to_target=s) for o, s in zip(options, (30, 20, 25))]
    rows.append(dict(optimizer="muon", lr=0.1, hyperparameters="{}", steps_to_target=40))
    grid = [{"optimizers": ["kfac", "muon"], "lr": [0.3], "hyperparameters": [json.loads(o) for o in options]}]
    tuned = _sweep(tmp_path / "tuned", grid, {}, rows, replicate={"key": "seeds", "at_best": ["lr", "hyperparameters"]})
    table = study_table_from_sweep(tuned)
    assert table["variant_of"].fillna("-").tolist() == ["kfac", "kfac", "kfac", "-"]
    assert collapse_variants(table)[["optimizer", "variant"]].fillna("-").values.tolist() == [
        ["kfac", "kfac (damping=0.1)"],
        ["muon", "-"],
    ]
    plain = _sweep(tmp_path / "plain", grid, {}, rows, replicate={"key": "seeds", "at_best": "lr"})
    assert "variant_of" not in study_table_from_sweep(plain).columns  # options define settings of their own
    # a grid key not tuned with the LR keeps its values apart: one family per batch_size
    by_size = [{**row, "batch_size": size} for row in rows for size in (8, 16)]
    sized = _sweep(
        tmp_path / "sized",
        [{**grid[0], "batch_size": [8, 16]}],
        {},
        by_size,
        replicate={"key": "seeds", "at_best": ["lr", "hyperparameters"]},
    )
    families = study_table_from_sweep(sized)["variant_of"].dropna().unique().tolist()
    assert families == ["kfac (batch_size=8)", "kfac (batch_size=16)"]
    # the default options winning: the report names them
    rows[0]["steps_to_target"] = 10
    won = _sweep(tmp_path / "won", grid, {}, rows, replicate={"key": "seeds", "at_best": ["lr", "hyperparameters"]})
    assert collapse_variants(study_table_from_sweep(won))["variant"].dropna().tolist() == ["kfac"]


def test_gain_shares_by_hand():
    """Share = (S_fo − S) / (S_fo − S_GN) over the best first-order method at each batch; NaN where undefined."""
    table = study(
        {
            "gn": {1: 20, 4: 10},
            "adamw": {1: 40, 4: 50},
            "muon": {1: None, 4: 30},
            "kfac (damping=0.1)": {1: 30, 4: None},
            "kfac (damping=1.0)": {1: 35, 4: 24},
            "shampoo": {1: 45, 4: 26},
        }
    )
    shares = gain_shares(table).set_index(["method", "micro_batches"])
    assert shares.loc[("kfac", 1), ["setting", "first_order"]].tolist() == ["kfac (damping=0.1)", "adamw"]
    assert shares.loc[("kfac", 1), "gain_share"] == pytest.approx((40 - 30) / (40 - 20))
    assert shares.loc[("kfac", 4), "setting"] == "kfac (damping=1.0)"  # the damping that reached it
    assert shares.loc[("kfac", 4), "gain_share"] == pytest.approx((30 - 24) / (30 - 10))  # over Muon, not AdamW
    assert shares.loc[("shampoo", 1), "gain_share"] == pytest.approx((40 - 45) / (40 - 20))  # slower: negative
    all_missed = study(
        {"gn": {1: 10}, "muon": {1: 30}, "kfac (damping=0.1)": {1: None}, "kfac (damping=1.0)": {1: None}}
    )
    all_missed["variant_of"] = all_missed["optimizer"].where(all_missed["optimizer"].str.startswith("kfac ("))
    all_missed["variant_of"] = all_missed["variant_of"].str.partition(" (")[0]
    all_missed.loc[all_missed["optimizer"] == "kfac (damping=0.1)", "final_val_loss"] = 0.5
    assert gain_shares(all_missed)["setting"].tolist() == ["kfac (damping=0.1)"]  # none reached: the lower loss
    missed = study({"gn": {1: 50}, "adamw": {1: 40}, "psgd": {1: None}})
    assert math.isnan(gain_shares(missed)["gain_share"].item())  # GN gains nothing here, and PSGD missed
    assert gain_shares(study({"gn": {1: 5}, "adamw": {1: 9}})).empty
    budgeted = study({"gn": {1: 10}, "muon": {1: 30}, "kfac": {1: None}, "shampoo": {1: 35}})
    budgeted["steps"] = budgeted["steps_to_target"].fillna(60)  # the missed runs stopped at the 60-step budget
    bounds = gain_shares(budgeted).set_index("method")
    assert math.isnan(bounds.loc["kfac", "gain_share"])
    assert bounds.loc["kfac", "gain_share_at_most"] == pytest.approx((30 - 60) / (30 - 10))  # needs S > 60
    assert bounds.loc["shampoo", "gain_share_at_most"] == bounds.loc["shampoo", "gain_share"] == -0.25
    split = study({"gn": {1: 10}, "muon": {1: 30}, "psgd": {1: 40}})  # seeds 0 and 1 reach it at 40 ...
    split.loc[(split["optimizer"] == "psgd") & (split["seed"] == 1), "steps_to_target"] = None  # ... 1 misses
    split["steps"] = split["steps_to_target"].fillna(60)
    psgd = gain_shares(split).set_index("method").loc["psgd"]
    assert math.isnan(psgd["gain_share"])  # the median of [40, inf] is inf: missed
    assert psgd["gain_share_at_most"] == pytest.approx((30 - 50) / (30 - 10))  # S ≥ median(40, 60) = 50
    with pytest.raises(ValueError, match="first_order"):
        gain_shares(study({"gn": {1: 5}, "kfac": {1: 9}}))


def test_directions_against_steps_pairs_each_methods_direction_with_its_share():
    """Notebook 05's direction at its last checkpoint beside the share at the largest batch, first-order methods too."""
    table = study({"gn": {1: 20, 4: 10}, "adamw": {1: 40, 4: 50}, "muon": {1: 30, 4: 30}, "kfac": {1: 35, 4: 20}})
    shares = gain_shares(table, include_first_order=True)
    assert set(shares["method"]) == {"adamw", "muon", "kfac"}
    directions = pd.DataFrame(
        [(step, m, 0.1 * step, 0.2 * step) for step in (0, 1) for m in ("exact GN", "K-FAC", "Adam", "gradient")],
        columns=["step", "method", "cosine", "reduction_ratio"],
    )
    points = directions_against_steps(shares, directions).set_index("method")
    assert list(points.index) == ["kfac", "adamw"] and (points["step"] == 1).all()
    assert points.loc["kfac", "gain_share"] == pytest.approx((30 - 20) / (30 - 10))  # at 400 tokens, over Muon
    assert points.loc["adamw", "gain_share"] == pytest.approx((30 - 50) / (30 - 10))
    assert points.loc["kfac", "reduction_ratio"] == pytest.approx(0.2)
    first = directions_against_steps(shares, directions, tokens_per_step=100, step=0).set_index("method")
    assert first.loc["kfac", "gain_share"] == pytest.approx((30 - 35) / (30 - 20)) and first["cosine"].eq(0).all()

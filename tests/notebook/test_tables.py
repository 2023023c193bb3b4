"""Tables as a page shows them: misses spelled out, short headers, rounded numbers."""

import pandas as pd
import pytest

from gnlib.experiment.lr_choice import choose_lr
from gnlib.notebook.tables import readable_summary, study_to_target


def summary_rows():
    common = dict(final_val_loss=2.71234, steps=30, tokens=100, grad_equivalents=120.4, wall_time_s=3.14159)
    return pd.DataFrame(
        [
            dict(
                optimizer="adamw",
                steps_to_target=None,
                tokens_to_target=None,
                wall_time_to_target_s=None,
                grad_equivalents_to_target=None,
                cost_model=None,
                status="completed",
                **common,
            ),
            dict(
                optimizer="gn",
                steps_to_target=12.0,
                tokens_to_target=65536,
                wall_time_to_target_s=1.26,
                grad_equivalents_to_target=64.2,
                cost_model="measured",
                status="reached_target",
                **common,
            ),
        ]
    )


def test_misses_read_not_reached_and_numbers_are_rounded():
    shown = readable_summary(summary_rows(), 30)
    assert list(shown.index) == ["adamw", "gn"] and shown.index.name == "optimizer"
    assert list(shown.columns) == [
        "steps to target",
        "tokens to target",
        "time to target (s)",
        "cost to target",
        "final val loss",
        "steps run",
        "cost",
        "time (s)",
        "pass costs",
        "status",
    ]
    assert shown.loc["adamw", "steps to target"] == "not reached in 30 steps"
    assert (shown.loc["adamw", ["tokens to target", "time to target (s)", "cost to target", "pass costs"]] == "-").all()
    assert shown.loc["gn", "tokens to target"] == "65,536" and shown.loc["gn", "time to target (s)"] == "1.3"
    assert shown.loc["gn", "pass costs"] == "measured"
    assert shown.loc["gn", "steps to target"] == "12" and shown.loc["gn", "cost to target"] == "64"
    assert shown.loc["gn", "final val loss"] == 2.712 and shown.loc["gn", "time (s)"] == 3.1
    assert shown.loc["gn", "cost"] == 120
    assert "NaN" not in shown.to_string() and "nan" not in shown.to_string()


def test_refuses_a_table_without_summary_columns():
    with pytest.raises(ValueError, match="status"):
        readable_summary(summary_rows().drop(columns="status"), 30)


def test_study_to_target_reports_medians_at_the_tuned_lr_and_spells_out_misses():
    rows = []
    for seed, (steps, tokens, time, cost) in enumerate([(4, 400, 2.0, 20.0), (6, 600, 3.0, 30.0), (None,) * 4]):
        rows.append(
            dict(
                optimizer="gn",
                micro_batches=2,
                tokens_per_step=100,
                lr=0.01,
                seed=seed,
                steps_to_target=steps,
                tokens_to_target=tokens,
                wall_time_to_target_s=time,
                grad_equivalents_to_target=cost,
                final_val_loss=2.0,
            )
        )
        rows.append(
            dict(
                optimizer="gn",
                micro_batches=2,
                tokens_per_step=100,
                lr=1.0,
                seed=seed,  # a worse LR
                steps_to_target=None,
                tokens_to_target=None,
                wall_time_to_target_s=None,
                grad_equivalents_to_target=None,
                final_val_loss=3.0,
            )
        )
        rows.append(
            dict(
                optimizer="adamw",
                micro_batches=2,
                tokens_per_step=100,
                lr=0.01,
                seed=seed,
                steps_to_target=None if seed else 9,
                tokens_to_target=None if seed else 900,
                wall_time_to_target_s=None if seed else 1.0,
                grad_equivalents_to_target=None if seed else 18.0,
                final_val_loss=2.5,
            )
        )
    shown = study_to_target(choose_lr(pd.DataFrame(rows)))
    assert list(shown.columns) == [
        "tokens/step",
        "seeds reached",
        "steps to target",
        "tokens to target",
        "time to target (s)",
        "cost to target",
    ]
    gn = shown.loc[("gn", 2)]
    # median over 3 seeds with one miss (infinite): the larger of the two reached
    assert gn["seeds reached"] == "2/3" and gn["steps to target"] == "6" and gn["tokens to target"] == "600"
    assert gn["time to target (s)"] == "3.0" and gn["cost to target"] == "30"
    adamw = shown.loc[("adamw", 2)]
    assert adamw["seeds reached"] == "1/3" and adamw["steps to target"] == "-" and adamw["cost to target"] == "-"
    with pytest.raises(ValueError, match="tokens_to_target"):
        study_to_target(pd.DataFrame(rows).drop(columns="tokens_to_target"))


def test_study_to_target_shows_the_raw_iterate_beside_an_ema_and_only_then():
    base = dict(micro_batches=2, tokens_per_step=100, lr=0.01, seed=0, final_val_loss=2.0)
    to_target = dict(steps_to_target=9, tokens_to_target=900, wall_time_to_target_s=9.0, grad_equivalents_to_target=9)
    raw = dict(steps_to_target_raw=5, tokens_to_target_raw=500, wall_time_to_target_raw_s=5.0)
    rows = [
        {**base, **to_target, **raw, "optimizer": "gn", "grad_equivalents_to_target_raw": 5, "final_val_loss_raw": 1.8},
        {
            **base,
            **to_target,
            "optimizer": "muon",
            "steps_to_target_raw": 9,
            "tokens_to_target_raw": 900,
            "wall_time_to_target_raw_s": 9.0,
            "grad_equivalents_to_target_raw": 9,
            "final_val_loss_raw": 2.0,
        },
    ]
    shown = study_to_target(pd.DataFrame(rows))
    assert shown.loc[("gn", 2), ["steps to target", "steps to target (raw)"]].tolist() == ["9", "5"]
    assert shown.loc[("muon", 2), "steps to target (raw)"] == "9"
    no_ema = study_to_target(pd.DataFrame(rows[1:]))
    assert "steps to target (raw)" not in no_ema.columns


def test_study_to_target_times_runs_by_cpu_time_when_every_run_recorded_it():
    base = dict(optimizer="gn", micro_batches=2, tokens_per_step=100, lr=0.01, final_val_loss=2.0)
    reached = dict(steps_to_target=4, tokens_to_target=400, wall_time_to_target_s=8.0, grad_equivalents_to_target=4)
    rows = [
        {**base, **reached, "seed": 0, "cpu_time_to_target_s": 3.0},
        {**base, **reached, "seed": 1, "cpu_time_to_target_s": 5.0},
    ]
    shown = study_to_target(pd.DataFrame(rows))
    assert "time to target (s)" not in shown.columns and shown.loc[("gn", 2), "CPU time to target (s)"] == "4.0"
    rows[1]["cpu_time_to_target_s"] = None  # a run from before runs recorded CPU time: wall time for all
    assert study_to_target(pd.DataFrame(rows)).loc[("gn", 2), "time to target (s)"] == "8.0"

"""Results tables as a reader sees them: short headers, rounded numbers, misses spelled out.

The tidy tables of :mod:`gnlib.experiment.runs` and :mod:`gnlib.experiment.study` keep every column and NaN
for a target that was not reached (what files and code need); these functions turn them into the few
columns a notebook page shows.
Every table reports, to the target: outer steps, training tokens, time and gradient-step equivalents;
where a run is evaluated on an EMA of its iterates, the same for the raw iterate beside them. The study
tables' time is each run's process CPU time where every run recorded one (the time a one-thread run takes
alone on a core, comparable across runs that shared the machine), else its wall time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = {
    "steps_to_target": "steps to target",
    "tokens_to_target": "tokens to target",
    "wall_time_to_target_s": "time to target (s)",
    "grad_equivalents_to_target": "cost to target",
    "final_val_loss": "final val loss",
    "steps": "steps run",
    "grad_equivalents": "cost",
    "wall_time_s": "time (s)",
    "cost_model": "pass costs",
    "status": "status",
}

#: Columns of :func:`study_to_target`, as shown.
TO_TARGET_COLUMNS = {
    "tokens_per_step": "tokens/step",
    "reached": "seeds reached",
    "steps_to_target": "steps to target",
    "tokens_to_target": "tokens to target",
    "wall_time_to_target_s": "time to target (s)",
    "cpu_time_to_target_s": "CPU time to target (s)",
    "grad_equivalents_to_target": "cost to target",
}

#: :data:`TO_TARGET_COLUMNS`' values on the raw iterate, shown beside them when a run has an EMA.
RAW_TO_TARGET_COLUMNS = {
    "reached_raw": "seeds reached (raw)",
    "steps_to_target_raw": "steps to target (raw)",
    "tokens_to_target_raw": "tokens to target (raw)",
    "wall_time_to_target_raw_s": "time to target (s, raw)",
    "cpu_time_to_target_raw_s": "CPU time to target (s, raw)",
    "grad_equivalents_to_target_raw": "cost to target (raw)",
}


def has_ema(table: pd.DataFrame) -> bool:
    """Whether some run of ``table`` was evaluated on an EMA: its raw iterate's final loss differs."""
    if "final_val_loss_raw" not in table.columns:
        return False
    raw, evaluated = table["final_val_loss_raw"].astype(float), table["final_val_loss"].astype(float)
    return bool((raw.notna() & (raw != evaluated)).any())


def _to_target(values: pd.Series, reached: pd.Series, fmt: str) -> list[str]:
    return [format(float(v), fmt) if hit else "-" for v, hit in zip(values, reached)]


def readable_summary(table: pd.DataFrame, max_steps: int, *, by: str = "optimizer") -> pd.DataFrame:
    """One row per run of :func:`gnlib.experiment.runs.summarize` rows, as a page shows them.

    Steps to target read "not reached in ``max_steps`` steps" instead of NaN (and tokens, time and cost
    to target "-"); costs are in gradient-step equivalents, rounded like the losses and times; ``pass
    costs`` names how GN's passes were priced (``measured`` or ``flops``; "-" for first-order runs, which
    pay one gradient step per micro-batch); the index is ``by``.

    Args:
        table: rows of ``summarize`` with a ``by`` column.
        max_steps: the runs' step budget, named for a target not reached.
        by: column that names each run (the index of the result).

    Raises:
        ValueError: ``table`` lacks ``by`` or a column of ``summarize``.
    """
    missing = [c for c in [by, *SUMMARY_COLUMNS] if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; it has {list(table.columns)}")
    reached = table["steps_to_target"].notna()
    shown = pd.DataFrame(
        {
            "steps_to_target": [
                f"{steps:.0f}" if hit else f"not reached in {max_steps} steps"
                for steps, hit in zip(table["steps_to_target"], reached)
            ],
            "tokens_to_target": _to_target(table["tokens_to_target"], reached, ",.0f"),
            "wall_time_to_target_s": _to_target(table["wall_time_to_target_s"], reached, ".1f"),
            "grad_equivalents_to_target": _to_target(table["grad_equivalents_to_target"], reached, ".0f"),
            "final_val_loss": table["final_val_loss"].astype(float).round(3),
            "steps": table["steps"],
            "grad_equivalents": table["grad_equivalents"].astype(float).round(0).astype(int),
            "wall_time_s": table["wall_time_s"].astype(float).round(1),
            "cost_model": table["cost_model"].fillna("-"),
            "status": table["status"],
        },
    )
    return shown.rename(columns=SUMMARY_COLUMNS).set_axis(pd.Index(table[by], name=by))


def study_to_target(table: pd.DataFrame) -> pd.DataFrame:
    """The batch-size study to the target, one row per optimizer and batch size, at each setting's tuned LR.

    Medians over seeds of the outer steps, training tokens, time (s; :func:`time_to_target_column`) and
    gradient-step equivalents to the target; a seed that missed the target counts as infinitely many, so a
    setting is reported only when most of its seeds reached it ("-" otherwise), and ``seeds reached`` says
    how many did. When a run
    was evaluated on an EMA (:func:`has_ema`), the same on the raw iterate follow (:data:`RAW_TO_TARGET_COLUMNS`).

    Args:
        table: :func:`gnlib.experiment.study.batch_size_study`'s table (columns ``optimizer``, ``micro_batches``,
            ``tokens_per_step``, the ``*_to_target`` columns, and ``chosen``: then only the tuned-LR runs count).

    Returns:
        Index (optimizer, micro_batches), columns :data:`TO_TARGET_COLUMNS` (shown names).

    Raises:
        ValueError: ``table`` lacks one of those columns.
    """
    values = ["steps_to_target", "tokens_to_target", "wall_time_to_target_s", "grad_equivalents_to_target"]
    missing = [c for c in ["optimizer", "micro_batches", "tokens_per_step", *values] if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; it has {list(table.columns)}")
    chosen = table.loc[table["chosen"].astype(bool)] if "chosen" in table.columns else table
    groups = chosen.groupby(["optimizer", "micro_batches"], sort=False)
    shown = pd.DataFrame({"tokens_per_step": groups["tokens_per_step"].first().map("{:,}".format)})
    shown = shown.join(_medians_to_target(chosen, ""))
    if has_ema(chosen):
        shown = shown.join(_medians_to_target(chosen, "_raw"))
    return shown.rename(columns={**TO_TARGET_COLUMNS, **RAW_TO_TARGET_COLUMNS})


def time_to_target_column(table: pd.DataFrame, suffix: str = "") -> str:
    """The time column a study table is read by: CPU time where every run that reached the target has one.

    Returns ``cpu_time_to_target{suffix}_s``, else ``wall_time_to_target{suffix}_s`` (results from before
    runs recorded their CPU time).
    """
    cpu, reached = f"cpu_time_to_target{suffix}_s", table[f"steps_to_target{suffix}"].notna()
    if cpu in table.columns and table.loc[reached, cpu].notna().all() and reached.any():
        return cpu
    return f"wall_time_to_target{suffix}_s"


def _medians_to_target(chosen: pd.DataFrame, suffix: str) -> pd.DataFrame:
    """Seeds reached and the medians to target of the ``*_to_target{suffix}`` columns, per (optimizer, batch)."""
    steps, tokens, cost = f"steps_to_target{suffix}", f"tokens_to_target{suffix}", f"grad_equivalents_to_target{suffix}"
    time = time_to_target_column(chosen, suffix)
    chosen = chosen.assign(**{v: chosen[v].astype(float).fillna(np.inf) for v in (steps, tokens, time, cost)})
    groups = chosen.groupby(["optimizer", "micro_batches"], sort=False)
    medians = groups[[steps, tokens, time, cost]].median().replace(np.inf, np.nan)
    reached = medians[steps].notna()
    hits = groups[steps].apply(lambda s: int(np.isfinite(s).sum()))
    return pd.DataFrame(
        {
            f"reached{suffix}": [f"{h}/{n}" for h, n in zip(hits, groups.size())],
            steps: _to_target(medians[steps], reached, "g"),
            tokens: _to_target(medians[tokens], reached, ",.0f"),
            time: _to_target(medians[time], reached, ".1f"),
            cost: _to_target(medians[cost], reached, ".0f"),
        },
        index=medians.index,
    )


def pass_costs_line(name: str, metadata: dict) -> str:
    """One line naming how a run priced its passes (``metadata["pass_costs"]`` of :func:`gnlib.experiment.runs.run`).

    E.g. "gn: passes priced by measured costs (forward 0.31, tangent 1.05, backward 0.69 gradient steps;
    an inner step 2.05)"; a first-order run pays one gradient step per micro-batch.
    """
    record = metadata.get("pass_costs")
    if not isinstance(record, dict):
        return f"{name}: one gradient step per micro-batch"
    inner = record["forward"] + record["tangent"] + record["backward"]
    return (
        f"{name}: passes priced by {record['model']} costs (forward {record['forward']:.2f}, tangent "
        f"{record['tangent']:.2f}, backward {record['backward']:.2f} gradient steps; an inner step {inner:.2f})"
    )

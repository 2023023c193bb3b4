"""Results tables as a reader sees them: short headers, rounded numbers, misses spelled out.

The tidy tables of :mod:`gnlib.runs` and :mod:`gnlib.study` keep every column and NaN for a target that was not
reached (what files and code need); these functions turn them into the few columns a notebook page shows.
Every table reports, to the target: outer steps, training tokens, wall time and gradient-step equivalents.
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
    "grad_equivalents_to_target": "cost to target",
}


def _to_target(values: pd.Series, reached: pd.Series, fmt: str) -> list[str]:
    return [format(float(v), fmt) if hit else "-" for v, hit in zip(values, reached)]


def readable_summary(table: pd.DataFrame, max_steps: int, *, by: str = "optimizer") -> pd.DataFrame:
    """One row per run of :func:`gnlib.runs.summarize` rows, as a page shows them.

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

    Medians over seeds of the outer steps, training tokens, wall time (s) and gradient-step equivalents
    to the target; a seed that missed the target counts as infinitely many, so a setting is reported only
    when most of its seeds reached it ("-" otherwise), and ``seeds reached`` says how many did.

    Args:
        table: :func:`gnlib.study.batch_size_study`'s table (columns ``optimizer``, ``micro_batches``,
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
    chosen = chosen.assign(**{v: chosen[v].astype(float).fillna(np.inf) for v in values})
    groups = chosen.groupby(["optimizer", "micro_batches"], sort=False)
    medians = groups[values].median().replace(np.inf, np.nan)
    reached = medians["steps_to_target"].notna()
    hits = groups["steps_to_target"].apply(lambda s: int(np.isfinite(s).sum()))
    shown = pd.DataFrame(
        {
            "tokens_per_step": groups["tokens_per_step"].first().map("{:,}".format),
            "reached": [f"{h}/{n}" for h, n in zip(hits, groups.size())],
            "steps_to_target": _to_target(medians["steps_to_target"], reached, "g"),
            "tokens_to_target": _to_target(medians["tokens_to_target"], reached, ",.0f"),
            "wall_time_to_target_s": _to_target(medians["wall_time_to_target_s"], reached, ".1f"),
            "grad_equivalents_to_target": _to_target(medians["grad_equivalents_to_target"], reached, ".0f"),
        },
        index=medians.index,
    )
    return shown.rename(columns=TO_TARGET_COLUMNS)


def pass_costs_line(name: str, metadata: dict) -> str:
    """One line naming how a run priced its passes (``metadata["pass_costs"]`` of :func:`gnlib.runs.run`).

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

"""Results tables as a reader sees them: short headers, rounded numbers, misses spelled out.

The tidy tables of :mod:`gnlib.runs` and :mod:`gnlib.study` keep every column and NaN for a target that was not
reached (what files and code need); these functions turn them into the few columns a notebook page shows.
"""

from __future__ import annotations

import pandas as pd

SUMMARY_COLUMNS = {
    "steps_to_target": "steps to target",
    "final_val_loss": "final val loss",
    "steps": "steps run",
    "grad_equivalents_to_target": "cost to target",
    "grad_equivalents": "cost",
    "wall_time_s": "time (s)",
    "status": "status",
}


def readable_summary(table: pd.DataFrame, max_steps: int, *, by: str = "optimizer") -> pd.DataFrame:
    """One row per run of :func:`gnlib.runs.summarize` rows, as a page shows them.

    Steps to target read "not reached in ``max_steps`` steps" instead of NaN (and its cost "-"); costs
    are in gradient-step equivalents, rounded like the losses and times; the index is ``by``.

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
            "final_val_loss": table["final_val_loss"].astype(float).round(3),
            "steps": table["steps"],
            "grad_equivalents_to_target": [
                f"{cost:.0f}" if hit else "-" for cost, hit in zip(table["grad_equivalents_to_target"], reached)
            ],
            "grad_equivalents": table["grad_equivalents"].astype(float).round(0).astype(int),
            "wall_time_s": table["wall_time_s"].astype(float).round(1),
            "status": table["status"],
        },
    )
    return shown.rename(columns=SUMMARY_COLUMNS).set_axis(pd.Index(table[by], name=by))

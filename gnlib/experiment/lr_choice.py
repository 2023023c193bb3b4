"""LR tuning: each setting's best learning rate on its grid, flagged when it lies at an edge of the grid.

Best = fewest median steps to the target over seeds, ties (or no LR reaching it) broken by the median final
validation loss. :func:`choose_lr` marks the tuned runs of a study table; :func:`lr_sweep` runs one spec
over an LR grid and picks its best. An optimizer's variants tuned together with its LR (e.g. K-FAC's
dampings, settings labelled ``kfac (damping=0.1)``, marked by :data:`VARIANT_OF`) are weighed against one
another by the same rule.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from gnlib.experiment.runs import RunSpec, run, summarize
from gnlib.runtime import atomic_write_text


def _best_lr(group: pd.DataFrame) -> tuple[float, bool]:
    """The best LR of one setting's runs (columns lr, steps_to_target, final_val_loss) and whether it is on the edge.

    Best = fewest median steps to target over the runs at that LR (a run that misses the target counts
    as infinitely many); ties, or no LR reaching it, are broken by the median final validation loss. LRs
    are compared on the seeds that every LR of the setting ran (with a ``seed`` column), so seeds repeated
    at the winner only (a sweep's ``replicate``) do not change the choice. The best is *on the edge* when
    it is the smallest or largest LR of the grid, or the grid has one LR.
    """
    by_lr = _ranked(group, "lr")
    best = float(by_lr.index[0])
    grid = sorted(by_lr.index)
    return best, len(grid) < 2 or best in (grid[0], grid[-1])


def _ranked(group: pd.DataFrame, key: str) -> pd.DataFrame:
    """The values of ``key`` in ``group``, best first: median steps to target (missed = inf), then final loss.

    Medians are taken over the seeds that every value of ``key`` ran (with a ``seed`` column).
    """
    if "seed" in group.columns:
        shared = set.intersection(*(set(seeds) for _, seeds in group.groupby(key)["seed"]))
        group = group.loc[group["seed"].isin(shared)] if shared else group
    by_key = (
        group.assign(
            _steps=group["steps_to_target"].astype(float).fillna(np.inf),
            _loss=group["final_val_loss"].astype(float).fillna(np.inf),
        )
        .groupby(key)[["_steps", "_loss"]]
        .median()
    )
    return by_key.sort_values(["_steps", "_loss"])


#: Column of a study table naming, for a run whose optimizer options were tuned together with its LR (a sweep's
#: ``replicate.at_best`` holds ``hyperparameters``), the optimizer its variant belongs to: ``kfac`` for
#: ``kfac (damping=0.1)``. Absent, or empty for a row, where the options define settings of their own.
VARIANT_OF = "variant_of"
#: A ``key=number`` option of a variant's label (:func:`~gnlib.experiment.study.variant_label`).
_NUMERIC_OPTION = re.compile(r"(\w+)=([-+0-9.eE]+)")


def best_variants(table: pd.DataFrame) -> dict[tuple[str, int], str]:
    """The best variant of each optimizer tuned over options and LR, at each batch size.

    Args:
        table: a study table with ``chosen`` marked (:func:`choose_lr`) and a :data:`VARIANT_OF` column.

    Returns:
        (optimizer, micro_batches) → the setting (e.g. ``kfac (damping=0.01)``) whose tuned runs have the
        fewest median steps to target, then the lowest median final validation loss, as LRs are ranked.
        Empty without a :data:`VARIANT_OF` column.
    """
    if VARIANT_OF not in table.columns:
        return {}
    variants = table.loc[table[VARIANT_OF].notna() & table["chosen"]]
    return {
        (family, int(m)): str(_ranked(group, "optimizer").index[0])
        for (family, m), group in variants.groupby([VARIANT_OF, "micro_batches"], sort=False)
    }


def collapse_variants(table: pd.DataFrame) -> pd.DataFrame:
    """One setting per optimizer tuned over an option with its LR: at each batch, its best variant's runs.

    Args:
        table: a study table with ``chosen`` marked (:func:`choose_lr`), maybe with a :data:`VARIANT_OF` column.

    Returns:
        ``table`` without the other variants' runs, the best's renamed to their optimizer (``kfac``), and a
        column ``variant`` holding the variant's label (``kfac (damping=0.1)``; empty for other settings).
        ``table`` itself where no setting is such a variant.
    """
    if VARIANT_OF not in table.columns or table[VARIANT_OF].isna().all():
        return table
    winners = best_variants(table)
    keep = [
        pd.isna(family) or winners.get((family, int(m))) == setting
        for family, m, setting in zip(table[VARIANT_OF], table["micro_batches"], table["optimizer"])
    ]
    out = table.loc[keep].copy()
    tuned = out[VARIANT_OF].notna()
    out["variant"] = out["optimizer"].where(tuned)
    out.loc[tuned, "optimizer"] = out.loc[tuned, VARIANT_OF]
    return out


def _option_value(setting: str) -> tuple[str, float] | None:
    """The option of a variant's label with one numeric option, e.g. ``("damping", 0.1)``; else None."""
    options = setting.partition(" (")[2].removesuffix(")").split(", ")
    found = _NUMERIC_OPTION.fullmatch(options[0]) if len(options) == 1 else None
    return (found[1], float(found[2])) if found else None


def _mark_variant_edges(out: pd.DataFrame) -> None:
    """Among an optimizer's variants tuned with the LR, at one batch, flag the best variant only.

    The best (:func:`best_variants`) keeps its own LR's edge flag, and is also on the edge when its option's
    value is the smallest or largest tried at that batch (variants differing in one numeric option; a run at
    the default options takes part but has no value to place). The
    other variants' runs are not tuned points, so their flags are cleared; a lone variant keeps its LR's flag.
    Edits ``out`` in place.
    """
    winners = best_variants(out)
    for (family, m), group in out.loc[out[VARIANT_OF].notna()].groupby([VARIANT_OF, "micro_batches"], sort=False):
        if group["optimizer"].nunique() < 2:
            continue
        best = group.index[group["optimizer"] == winners[(family, int(m))]]
        own = bool(out.loc[best, "on_edge"].any())
        options = {setting: _option_value(setting) for setting in group["optimizer"].unique()}
        keys = {option[0] for option in options.values() if option}
        values = sorted(option[1] for option in options.values() if option)
        value = options[winners[(family, int(m))]]  # None: the default options, off the values' scale
        at_end = len(keys) == 1 and value is not None and value[1] in (values[0], values[-1])
        out.loc[group.index, "on_edge"] = False
        out.loc[best, "on_edge"] = own or at_end


def choose_lr(table: pd.DataFrame, by: Sequence[str] = ("optimizer", "micro_batches")) -> pd.DataFrame:
    """Mark each setting's tuned LR: adds columns ``chosen`` (run at the best LR) and ``on_edge``.

    Args:
        table: one row per run with columns ``lr``, ``steps_to_target``, ``final_val_loss`` and ``by``.
        by: columns that define one setting whose LR is tuned (default: per optimizer and batch size).

    Returns:
        A copy of ``table`` with ``chosen`` (bool) and ``on_edge`` (bool, the same for all rows of a
        setting: its best LR is at an end of its grid, so the true optimum may lie outside). With a
        :data:`VARIANT_OF` column, an optimizer's variants tuned with the LR (``kfac (damping=0.1)``,
        ``kfac (damping=1.0)``) are weighed against each other at each batch: only the best can be on the
        edge, of its LR grid or of the option's values.
    """
    missing = [c for c in ("lr", "steps_to_target", "final_val_loss", *by) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; it has {list(table.columns)}")
    out = table.copy()
    out["chosen"], out["on_edge"] = False, False
    for _, group in out.groupby(list(by), sort=False):
        best, edge = _best_lr(group)
        out.loc[group.index, "chosen"] = np.isclose(group["lr"].astype(float), best, rtol=1e-12, atol=0)
        out.loc[group.index, "on_edge"] = edge
    if VARIANT_OF in out.columns and {"optimizer", "micro_batches"} <= set(by):
        _mark_variant_edges(out)
    return out


def lr_sweep(
    spec: RunSpec,
    lrs: Sequence[float],
    target: float,
    output_dir: str | Path | None = None,
    *,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run ``spec`` at each learning rate in ``lrs`` and pick the best.

    Best = fewest steps to ``target``; ties (or no run reaching it) are broken by the final
    validation loss. A best LR at either end of the grid is flagged (``on_edge=True``) since the true
    optimum may lie outside it.

    Args:
        spec: settings shared by every run; its ``lr`` is replaced.
        lrs: the learning-rate grid (at least two values, e.g. ``np.geomspace(1e-4, 1e-1, 7)``).
        target: validation-loss target.
        output_dir: each run goes to ``output_dir/lr=<value>``; the table to ``output_dir/lr_sweep.csv``.
        progress: print each run's evaluations.

    Returns:
        ``(table, best)``: one row per LR, and the best row as a dict with ``on_edge`` added.
    """
    grid = sorted(float(lr) for lr in lrs)
    if len(grid) < 2:
        raise ValueError(f"lrs must hold at least two learning rates, got {list(lrs)!r}")
    rows = []
    for lr in grid:
        run_spec = dataclasses.replace(spec, lr=lr, target_loss=target)
        run_dir = Path(output_dir) / f"lr={lr:.6g}" if output_dir is not None else None
        rows.append({"lr": lr, **summarize(run(run_spec, run_dir, progress=progress), target)})
    table = pd.DataFrame(rows)
    best_lr, on_edge = _best_lr(table)
    best = {**table.loc[table["lr"] == best_lr].iloc[0].to_dict(), "on_edge": on_edge}
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "lr_sweep.csv", table.to_csv(index=False))
    return table, best

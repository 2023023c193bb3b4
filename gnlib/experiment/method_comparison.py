"""Methods of a study compared at their tuned LRs: each one's steps over a reference's, and gain shares.

Every number is a median over seeds at each setting's tuned LR (:func:`tuned_medians`); a seed that missed
the target counts as infinitely many steps. :func:`ratio_table` divides each optimizer's steps (or cost) by a
reference's at every batch size; :func:`gain_summary` sets each method against full GN and a baseline at one
batch size, with the share of full GN's gain it keeps (:func:`gain_share`); :func:`gain_shares` gives every
method's share over the best first-order method at every batch size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gnlib.experiment.lr_choice import best_variants
from gnlib.runtime import check_choice

#: The study's first-order baselines: :func:`gain_shares` measures gains over the best of them at each batch.
FIRST_ORDER = ("adamw", "muon", "soap")
#: Notebook 05's direction names (:func:`gnlib.optim.direction_comparison.standard_directions`) -> the
#: optimizer that steps along each; PSGD fits its preconditioner over steps and has no one-batch direction.
DIRECTION_OPTIMIZERS = {
    "layerwise GN": "gn_layerwise",
    "K-FAC": "kfac",
    "Shampoo": "shampoo",
    "SOAP": "soap",
    "Adam": "adamw",
    "Muon": "muon",
}


def tuned_medians(table: pd.DataFrame, value: str = "steps_to_target") -> pd.DataFrame:
    """Median of ``value`` over seeds at each setting's tuned LR: index (optimizer, micro_batches).

    A seed that missed the target counts as infinitely many steps, so a setting counts as reached only
    when most of its seeds reached it (else its median is NaN: missed).
    """
    chosen = table.loc[table["chosen"]] if "chosen" in table.columns else table
    chosen = chosen.assign(**{value: chosen[value].astype(float).fillna(np.inf)})
    medians = chosen.groupby(["optimizer", "micro_batches"])[[value, "tokens_per_step"]].median()
    return medians.replace(np.inf, np.nan)


def ratio_table(table: pd.DataFrame, reference: str = "gn", value: str = "steps_to_target") -> pd.DataFrame:
    """Each other optimizer's ``value`` over ``reference``'s at every batch size (median over seeds, tuned LR).

    Returns:
        Index ``micro_batches``, one column per non-reference optimizer: ratio > 1 means the reference
        needs fewer (steps, or gradient-step equivalents with ``value="grad_equivalents_to_target"``).
        NaN where either missed the target.
    """
    check_choice("reference", reference, list(dict.fromkeys(table["optimizer"])))
    wide = tuned_medians(table, value)[value].astype(float).unstack("optimizer")
    others = [c for c in dict.fromkeys(table["optimizer"]) if c != reference]
    return wide[others].div(wide[reference], axis=0)


def gain_share(steps_baseline: float, steps_variant: float, steps_full: float) -> float:
    """Share of full GN's gain over a baseline that a variant keeps: (S_base − S_variant) / (S_base − S_full).

    1: the variant (e.g. layerwise GN) is as fast as full GN; 0: no faster than the baseline (e.g. AdamW);
    NaN when full GN gains nothing.
    """
    gain = steps_baseline - steps_full
    return float("nan") if gain <= 0 else (steps_baseline - steps_variant) / gain


def gain_summary(table: pd.DataFrame, full: str = "gn", baseline: str = "adamw") -> pd.DataFrame:
    """Each method at its tuned LR against full GN and a baseline, at one token batch.

    With S the median steps to target over seeds at the method's tuned LR (the ``chosen`` rows of
    :func:`~gnlib.experiment.lr_choice.choose_lr`; a seed that missed counts as infinitely many, as in
    :func:`ratio_table`), ``vs_full`` is S / S_full and ``gain_share`` is :func:`gain_share` (S_baseline, S,
    S_full) for every method other than ``full`` and ``baseline`` (e.g. the layerwise partitions).

    Args:
        table: a :func:`~gnlib.experiment.study.batch_size_study` table at one ``micro_batches`` value, with
            ``chosen`` marked.
        full: the full-GN method's name in ``table``.
        baseline: the first-order baseline's name in ``table``.

    Returns:
        Index ``optimizer`` (in the table's order), columns ``lr``, ``on_edge``, ``steps_to_target``,
        ``grad_equivalents_to_target`` (medians; NaN when missed), ``vs_full``, ``gain_share`` (NaN for
        ``full`` and ``baseline``).

    Raises:
        ValueError: several batch sizes in ``table``, or ``full``/``baseline`` not among its optimizers.
    """
    needed = ("optimizer", "micro_batches", "lr", "steps_to_target", "grad_equivalents_to_target", "chosen", "on_edge")
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; pass a batch_size_study table (choose_lr marks chosen)")
    batches = sorted(set(table["micro_batches"]))
    if len(batches) != 1:
        raise ValueError(f"table holds micro_batches {batches}; gain_summary compares methods at one batch size")
    names = list(dict.fromkeys(table["optimizer"]))
    check_choice("full", full, names)
    check_choice("baseline", baseline, names)
    tuned = table.loc[table["chosen"]].groupby("optimizer", sort=False)[["lr", "on_edge"]].first()
    summary = tuned.assign(
        steps_to_target=tuned_medians(table)["steps_to_target"].droplevel("micro_batches"),
        grad_equivalents_to_target=tuned_medians(table, "grad_equivalents_to_target")[
            "grad_equivalents_to_target"
        ].droplevel("micro_batches"),
    ).loc[names]
    full_steps, base_steps = summary.loc[full, "steps_to_target"], summary.loc[baseline, "steps_to_target"]
    summary["vs_full"] = summary["steps_to_target"] / full_steps
    summary["gain_share"] = [
        float("nan") if name in (full, baseline) else gain_share(base_steps, s, full_steps)
        for name, s in summary["steps_to_target"].items()
    ]
    summary.index.name = "optimizer"
    return summary


def gain_shares(
    table: pd.DataFrame,
    full: str = "gn",
    first_order: tuple[str, ...] = FIRST_ORDER,
    *,
    include_first_order: bool = False,
) -> pd.DataFrame:
    """Each method's share of full GN's step reduction over the best first-order method, at every batch size.

    With S the median steps to target over seeds at the tuned LR (:func:`tuned_medians`), S_fo the fewest
    among ``first_order`` at that batch and S_GN full GN's, a method's share is (S_fo − S) / (S_fo − S_GN)
    (:func:`gain_share`): 1 as fast as full GN, 0 no faster than the best first-order method. The variants
    of one optimizer (e.g. K-FAC's dampings, ``kfac (damping=0.1)``) count as one method at the best of them:
    :func:`~gnlib.experiment.lr_choice.best_variants` where they were tuned with the LR (fewest steps, then
    lowest final loss), else the fewest steps.

    Args:
        table: a study table with ``chosen`` marked (:func:`~gnlib.experiment.study.study_table_from_sweep`).
        full: the full-GN setting.
        first_order: the first-order settings (those present are used).
        include_first_order: also give the first-order methods' shares (0 for the best, negative for the others).

    Returns:
        One row per method other than ``full`` and ``first_order`` and per batch it ran at: ``method``, ``setting``
        (the variant chosen), ``micro_batches``, ``tokens_per_step``, ``steps_to_target``, ``first_order``
        (the best one's name), ``first_order_steps``, ``full_steps``, ``gain_share``, ``gain_share_at_most``.
        Steps are NaN where the target was missed; the share is NaN where the method, full GN or every
        first-order method missed it, or full GN gains nothing. ``gain_share_at_most`` bounds a share that a
        missed target leaves unknown (with a ``steps`` column): each seed at the tuned LR needs at least its
        steps to target, or more than the steps it ran where it missed, so the median S is at least the
        median N of these and the share at most that of S = N; where the method reached the target it equals
        ``gain_share``. Empty without another method.

    Raises:
        ValueError: ``full`` or every ``first_order`` setting absent from ``table``.
    """
    names = list(dict.fromkeys(table["optimizer"]))
    check_choice("full", full, names)
    baselines = [name for name in first_order if name in names]
    if not baselines:
        raise ValueError(f"first_order={list(first_order)}: none is in the table; its settings are {names}")
    medians = tuned_medians(table)
    winners = best_variants(table)
    steps = medians["steps_to_target"].astype(float).unstack("optimizer")
    tokens = medians["tokens_per_step"].groupby("micro_batches").first()
    ran = table.groupby("micro_batches")["optimizer"].agg(set)
    at_least = _steps_at_least(table)
    rows = []
    for m, row in steps.iterrows():
        reached = row[baselines].dropna()
        best = reached.idxmin() if len(reached) else None
        s_fo = float("nan") if best is None else float(reached[best])
        s_full = float(row[full])
        methods: dict[str, tuple[str, float]] = {}
        for setting in names:
            method = setting.split(" (")[0]
            if setting not in ran[m] or method == full or (method in first_order and not include_first_order):
                continue
            s = float(row[setting])
            if (method, int(m)) in winners:  # numeric variants: the best by steps, then final loss
                if winners[(method, int(m))] == setting:
                    methods[method] = (setting, s)
            elif method not in methods or s < methods[method][1] or np.isnan(methods[method][1]):
                methods[method] = (setting, s)
        for method, (setting, s) in methods.items():
            share = _share_if_known(s_fo, s, s_full)
            at_most = share if not np.isnan(s) else _share_if_known(s_fo, at_least.get((setting, m), np.nan), s_full)
            rows.append(
                dict(
                    method=method,
                    setting=setting,
                    micro_batches=m,
                    tokens_per_step=int(tokens[m]),
                    steps_to_target=s,
                    first_order=best,
                    first_order_steps=s_fo,
                    full_steps=s_full,
                    gain_share=share,
                    gain_share_at_most=at_most,
                )
            )
    columns = ["method", "setting", "micro_batches", "tokens_per_step", "steps_to_target", "first_order"]
    return pd.DataFrame(rows, columns=[*columns, "first_order_steps", "full_steps", "gain_share", "gain_share_at_most"])


def _share_if_known(steps_baseline: float, steps_variant: float, steps_full: float) -> float:
    """:func:`gain_share`, NaN where any of the three step counts is NaN (a missed target)."""
    known = not np.isnan([steps_baseline, steps_variant, steps_full]).any()
    return gain_share(steps_baseline, steps_variant, steps_full) if known else float("nan")


def _steps_at_least(table: pd.DataFrame) -> pd.Series:
    """Median over seeds at the tuned LR of a lower bound on each seed's steps to target: index (optimizer, m).

    A seed that reached the target needed its ``steps_to_target``; one that missed it needs more than the
    ``steps`` it ran. Empty without a ``steps`` column.
    """
    if "steps" not in table.columns:
        return pd.Series(dtype=float)
    chosen = table.loc[table["chosen"]] if "chosen" in table.columns else table
    bound = chosen["steps_to_target"].astype(float).fillna(chosen["steps"].astype(float))
    return bound.groupby([chosen["optimizer"], chosen["micro_batches"]]).median()


def directions_against_steps(
    shares: pd.DataFrame, directions: pd.DataFrame, tokens_per_step: int | None = None, step: int | None = None
) -> pd.DataFrame:
    """Each method's direction-level agreement with exact GN beside its share of full GN's step gain.

    Args:
        shares: :func:`gain_shares` (with ``include_first_order``, so AdamW, Muon and SOAP get points too).
        directions: notebook 05's ``results.csv`` (``method``, ``step``, ``cosine``, ``reduction_ratio``).
        tokens_per_step: the batch whose shares are read (default: the largest in ``shares``).
        step: the checkpoint of ``directions`` (default: its last).

    Returns:
        One row per optimizer found in both (:data:`DIRECTION_OPTIMIZERS`): ``method`` (the optimizer),
        ``direction`` (notebook 05's name), ``cosine``, ``reduction_ratio``, ``gain_share``,
        ``gain_share_at_most`` (the bound where the method missed the target; see :func:`gain_shares`),
        ``tokens_per_step`` and ``step``.
    """
    tokens = int(shares["tokens_per_step"].max()) if tokens_per_step is None else tokens_per_step
    step = int(directions["step"].max()) if step is None else step
    at = directions.loc[directions["step"] == step].set_index("method")
    share = shares.loc[shares["tokens_per_step"] == tokens].set_index("method")
    rows = [
        dict(
            method=optimizer,
            direction=name,
            cosine=float(at.loc[name, "cosine"]),
            reduction_ratio=float(at.loc[name, "reduction_ratio"]),
            gain_share=float(share.loc[optimizer, "gain_share"]),
            gain_share_at_most=float(share.loc[optimizer, "gain_share_at_most"]),
            tokens_per_step=tokens,
            step=step,
        )
        for name, optimizer in DIRECTION_OPTIMIZERS.items()
        if name in at.index and optimizer in share.index
    ]
    columns = ["method", "direction", "cosine", "reduction_ratio", "gain_share", "gain_share_at_most"]
    columns += ["tokens_per_step", "step"]
    return pd.DataFrame(rows, columns=columns)

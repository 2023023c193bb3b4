"""Figures of the batch-size study (tables from :mod:`gnlib.experiments`) → matplotlib Figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from gnlib.plots import style


def _require(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; it has {list(frame.columns)}")


def steps_vs_batch(
    table: pd.DataFrame, *, value: str = "steps_to_target", x: str = "tokens_per_step", title: str | None = None
) -> Figure:
    """Log-log steps (or cost) to target against the token batch, one line per optimizer: the critical-batch picture.

    Only runs at each setting's tuned LR count (column ``chosen`` when present). Each seed is a dot; the
    line joins the medians over seeds; the dotted grey line has slope −1 (perfect scaling: doubling the
    batch halves the steps), anchored at the highest median of the smallest batch. Runs that missed the
    target are left out.

    Args:
        table: study table (:func:`gnlib.experiments.batch_size_study`): columns ``optimizer``, ``x``, ``value``.
        value: ``"steps_to_target"`` or ``"grad_equivalents_to_target"``.
        x: ``"tokens_per_step"`` or ``"micro_batches"``.
        title: axes title.
    """
    _require(table, ["optimizer", x, value])
    data = table.loc[table["chosen"]] if "chosen" in table.columns else table
    data = data.dropna(subset=[value]).astype({value: float, x: float})
    medians = data.groupby(["optimizer", x], sort=False)[value].median().reset_index()
    with style():
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        order = list(dict.fromkeys(table["optimizer"]))
        palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
        sns.lineplot(data=medians, x=x, y=value, hue="optimizer", hue_order=order, palette=palette, marker="o",
                     ax=ax)
        sns.scatterplot(data=data, x=x, y=value, hue="optimizer", hue_order=order, palette=palette, alpha=0.4,
                        s=18, legend=False, ax=ax)
        if len(medians):
            smallest = medians[x].min()
            start = medians.loc[medians[x] == smallest, value].max()
            xs = np.array(sorted(medians[x].unique()))
            ax.plot(xs, start * smallest / xs, linestyle=":", color="0.5", label="perfect scaling")
            ax.legend()
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(value.replace("_", " "))
        if title:
            ax.set_title(title)
    return fig


def direction_cosines(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Cosine between each partition's GN direction and full GN's along a run (one line per partition).

    Args:
        frame: :func:`gnlib.experiments.direction_cosines` table: columns ``step``, ``partition``, ``cosine``.
        title: axes title.
    """
    _require(frame, ["step", "partition", "cosine"])
    with style():
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        sns.lineplot(data=frame, x="step", y="cosine", hue="partition", marker="o", ax=ax)
        ax.set_ylim(min(0.0, float(frame["cosine"].min())), 1.02)
        ax.set_xlabel("outer step of the full-GN run")
        ax.set_ylabel("cosine with the full-GN direction")
        if title:
            ax.set_title(title)
    return fig

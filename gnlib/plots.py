"""Figures: functions from data (DataFrames, arrays) to a matplotlib Figure.

No function changes global matplotlib state: seaborn styling is applied inside a local
``plt.rc_context``, and figures are made as ``matplotlib.figure.Figure`` objects outside pyplot, so
they work with any backend and are never shown twice; the caller saves them or displays them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure


@contextmanager
def style() -> Iterator[None]:
    """Seaborn's whitegrid look, for the figures made inside this block only."""
    with plt.rc_context(sns.axes_style("whitegrid") | sns.plotting_context("notebook", font_scale=0.9)):
        yield


def loss_curves(
    frame: pd.DataFrame,
    *,
    x: str = "step",
    y: str = "val_loss",
    hue: str | None = "optimizer",
    target: float | None = None,
    logx: bool = False,
    title: str | None = None,
) -> Figure:
    """Loss against steps (or tokens, or time), one line per ``hue`` value.

    Args:
        frame: long-format table with columns ``x``, ``y`` and ``hue``; rows with missing ``y`` are skipped.
        x: column for the horizontal axis.
        y: column for the vertical axis.
        hue: column that separates lines (None: one line).
        target: draw a horizontal line at this loss.
        logx: logarithmic horizontal axis.
        title: axes title.
    """
    missing = [c for c in (x, y, hue) if c is not None and c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; it has {list(frame.columns)}")
    data = frame.dropna(subset=[y])
    with style():
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        sns.lineplot(data=data, x=x, y=y, hue=hue, ax=ax, marker="o", markersize=3)
        if target is not None:
            ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:g}")
            ax.legend()
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(y.replace("_", " "))
        if title:
            ax.set_title(title)
    return fig

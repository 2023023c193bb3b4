"""Figures that set methods against full GN: their share of its gain by batch size, and direction against step gains.

The share is :func:`gnlib.experiment.method_comparison.gain_shares`' (S_first-order − S) / (S_first-order − S_GN);
the directions' agreement with exact GN comes from :mod:`gnlib.optim.direction_comparison` (notebook 05).
Each function returns a :class:`~gnlib.notebook.plots.NotebookFigure`.
"""

from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from gnlib.notebook.plots import _label, _require_columns, new_figure, style


def gain_shares(shares: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Each method's share of full GN's gain against the token batch, one line per method.

    Args:
        shares: :func:`~gnlib.experiment.method_comparison.gain_shares`' table (``method``, ``tokens_per_step``,
            ``gain_share``); a missed target or a batch where GN gains nothing has no point.
        title: axes title.
    """
    _require_columns(shares, ["method", "tokens_per_step", "gain_share"])
    data = shares.dropna(subset=["gain_share"]).astype({"tokens_per_step": float})
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        order = list(dict.fromkeys(shares["method"]))
        sns.lineplot(data=data, x="tokens_per_step", y="gain_share", hue="method", hue_order=order, marker="o", ax=ax)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="full GN")
        ax.axhline(0.0, color="0.6", linestyle=":", linewidth=1, label="best first-order method")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize="small")
        _label(ax, "tokens per step", "share of full GN's step reduction", title)
    return fig


def directions_vs_steps(
    points: pd.DataFrame, *, x: str = "reduction_ratio", y: str = "gain_share", title: str | None = None
) -> Figure:
    """One point per method: its direction's agreement with exact GN against its share of GN's step gain.

    A method that missed the target has no share; with a ``<y>_at_most`` column (from
    :func:`~gnlib.experiment.method_comparison.gain_shares`) it is drawn at that bound as an open downward
    triangle, its true share lying below. Points are labelled with the ``direction`` column where there is
    one (notebook 05's names), else ``method``. The horizontal axis is logarithmic when the agreements span
    more than a decade.

    Args:
        points: one row per ``method`` with columns ``x`` (e.g. ``reduction_ratio`` or ``cosine``) and ``y``.
        x: the direction-level measure.
        y: the step-level measure.
        title: axes title.
    """
    _require_columns(points, ["method", x, y])
    bound = f"{y}_at_most"
    data = points.assign(plot_y=points[y].fillna(points[bound]) if bound in points.columns else points[y])
    data = data.assign(missed=data[y].isna()).dropna(subset=[x, "plot_y"])
    names = data["direction"] if "direction" in data.columns else data["method"]
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        colours = dict(zip(data["method"], sns.color_palette(n_colors=max(len(data), 1))))
        labels = []
        for row, name in zip(data.itertuples(index=False), names):
            colour = colours[row.method]
            at = (getattr(row, x), row.plot_y)
            if row.missed:
                ax.scatter(*at, s=70, marker="v", facecolors="none", edgecolors=colour, linewidths=1.5)
                labels.append((f"{name} (missed: share ≤ {row.plot_y:.2f})", at))
            else:
                ax.scatter(*at, s=60, color=colour)
                labels.append((name, at))
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
        ax.axhline(0.0, color="0.6", linestyle=":", linewidth=1)
        low, high = data[x].min(), data[x].max()
        if len(data) and low > 0 and high > 10 * low:  # ratios spread over decades: a log axis separates them
            ax.set_xscale("log")
        to_axes = ax.transData + ax.transAxes.inverted()
        for label, at in labels:  # labels of points in the right third run leftwards, inside the axes
            right = to_axes.transform(at)[0] > 2 / 3
            offset, align = ((-6, -12), "right") if right else ((5, 4), "left")
            ax.annotate(label, at, textcoords="offset points", xytext=offset, ha=align)
        _label(ax, x.replace("_", " ") + " (directions, vs exact GN)", y.replace("_", " ") + " (steps)", title)
    return fig

"""Figures: functions from data (DataFrames, arrays) to a matplotlib Figure.

No function changes global matplotlib state: seaborn styling is applied inside a local
``plt.rc_context``, and figures are made outside pyplot, so they work with any backend and are never
shown twice. Each is a :class:`NotebookFigure`: a ``matplotlib.figure.Figure`` that shows itself as a
sharp PNG wherever IPython displays it (the last line of a notebook cell, ``display(figure)``), in
JupyterLab, papermill's output notebook and nbval alike, whatever matplotlib backend is active; the
caller may also save it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import LogLocator


class NotebookFigure(Figure):
    """A Figure that IPython displays as a PNG drawn at ``pixel_ratio`` times its size in pixels.

    The figure is ``figsize · dpi`` pixels on the page (600×400 for 6×4 inches at dpi 100); its PNG
    holds ``pixel_ratio``² as many pixels and carries the page size as display metadata, so it stays
    sharp on high-density screens instead of being upscaled. IPython finds ``_ipython_display_`` before
    any formatter registered for ``Figure`` (such as matplotlib's inline backend, which would otherwise
    render it at the screen's resolution), so every figure of gnlib displays the same way, once.
    """

    pixel_ratio: int = 2

    def display_size(self) -> tuple[int, int]:
        """Width and height in page pixels."""
        width, height = self.get_size_inches() * self.dpi
        return round(width), round(height)

    def _repr_png_(self) -> tuple[bytes, dict[str, int]]:
        """PNG bytes at ``pixel_ratio`` × the page size, and the page size as display metadata."""
        width, height = self.display_size()
        return to_png(self, dpi=self.dpi * self.pixel_ratio), {"width": width, "height": height}

    def _ipython_display_(self) -> None:
        """Publish the PNG (with its page size) and a plain-text summary."""
        from IPython.display import publish_display_data

        data, size = self._repr_png_()
        publish_display_data({"image/png": data, "text/plain": repr(self)}, metadata={"image/png": size})


def new_figure(figsize: tuple[float, float]) -> NotebookFigure:
    """A constrained-layout :class:`NotebookFigure` of ``figsize`` inches at 100 dpi (``figsize`` · 100 page pixels)."""
    return NotebookFigure(figsize=figsize, dpi=100, layout="constrained")


@contextmanager
def style() -> Iterator[None]:
    """Seaborn's whitegrid look, for the figures made inside this block only."""
    with plt.rc_context(sns.axes_style("whitegrid") | sns.plotting_context("notebook", font_scale=0.9)):
        yield


def _label(ax: Axes, xlabel: str, ylabel: str, title: str | None) -> None:
    """Axis labels, and the title when there is one."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)


def _require_columns(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; it has {list(frame.columns)}")


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
    _require_columns(frame, [c for c in (x, y, hue) if c is not None])
    data = frame.dropna(subset=[y])
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        sns.lineplot(data=data, x=x, y=y, hue=hue, ax=ax, marker="o", markersize=3)
        if target is not None:
            ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:g}")
            ax.legend()
        if logx:
            ax.set_xscale("log")
        _label(ax, x.replace("_", " "), y.replace("_", " "), title)
    return fig


Matrix = np.ndarray | torch.Tensor | Sequence[Sequence[float]]
#: Tick labels of a heatmap: shared by every panel, or panel title → labels; None: no tick labels.
Labels = Sequence[str] | Mapping[str, Sequence[str] | None] | None
MASKED_COLOUR = "0.82"  # cells a log colour scale cannot show (entries <= 0)


def log_ticks(low: float, high: float) -> LogLocator:
    """Colour-bar ticks on a log scale from ``low`` to ``high``: 1, 2, 5 per decade up to two decades, else decades."""
    decades = np.log10(high / low) if low > 0 and high > low else 0.0
    return LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,))


def short_name(name: str) -> str:
    """The short label of a parameter tensor or block, the same in every figure and explorer.

    ``blocks.0.attn.wq.weight`` → ``block0.attn.wq`` (like the per-layer block ``block0``),
    ``embed.weight`` → ``embed``; biases keep ``.bias``; other names are returned unchanged.
    """
    return re.sub(r"^blocks\.(\d+)\.", r"block\1.", name).removesuffix(".weight")


def _array(values: object) -> np.ndarray:
    """A float NumPy array from a tensor, array or nested sequence."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=float)


def _grid(count: int, ncols: int | None, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with ``count`` panels, ``ncols`` per row (default: all in one row)."""
    ncols = min(count, ncols or count)
    nrows = -(-count // ncols)
    fig = new_figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes


def _heatmap_ticks(
    arrays: Mapping[str, np.ndarray],
    row_labels: Labels,
    col_labels: Labels,
) -> dict[str, tuple[Sequence[str] | None, Sequence[str] | None]]:
    """Each panel's (row, column) tick labels, checked against its matrix (see :func:`heatmap`).

    Raises:
        ValueError: a matrix that is not 2-D, or labels whose count does not match it.
    """

    def labels_of(labels: object, name: str) -> Sequence[str] | None:
        return labels.get(name) if isinstance(labels, Mapping) else labels

    ticks = {}
    for name, a in arrays.items():
        rows = labels_of(row_labels, name)
        cols = (
            labels_of(col_labels, name)
            if col_labels is not None
            else (rows if a.ndim == 2 and a.shape[0] == a.shape[1] else None)
        )
        if (
            a.ndim != 2
            or (rows is not None and len(rows) != a.shape[0])
            or (cols is not None and len(cols) != a.shape[1])
        ):
            expected = (len(rows) if rows is not None else "r", len(cols) if cols is not None else "c")
            raise ValueError(
                f"panel {name!r} has shape {a.shape}, expected a matrix of shape {expected} from the labels"
            )
        ticks[name] = (rows, cols)
    return ticks


def _heatmap_legend(arrays: Mapping[str, np.ndarray], log: bool, missing_label: str) -> list[Patch]:
    """Legend entries for the cells a heatmap cannot colour: ≤ 0 on a log scale (grey), nan or infinite (hatched)."""
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays.values()])
    legend = []
    if log and (finite <= 0).any():
        zeros = "exactly 0" if (finite >= 0).all() else "≤ 0"
        legend.append(Patch(facecolor=MASKED_COLOUR, edgecolor="0.6", label=f"{zeros} (not on the log scale)"))
    if any((~np.isfinite(a)).any() for a in arrays.values()):
        legend.append(Patch(facecolor="white", edgecolor="0.4", hatch="///", label=missing_label))
    return legend


def _annotate_cells(ax: plt.Axes, a: np.ndarray, image: AxesImage, norm: Normalize, log: bool) -> None:
    """Write each colourable value of ``a`` in its cell, black or white for contrast with the cell's colour."""
    for (i, j), value in np.ndenumerate(a):
        if np.isfinite(value) and (value > 0 or not log):
            red, green, blue, _ = image.cmap(norm(value))
            shade = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6, color=shade)


def heatmap(
    panels: Mapping[str, Matrix] | Matrix,
    row_labels: Labels,
    col_labels: Labels = None,
    *,
    log: bool = False,
    shared_scale: bool = True,
    annotate: bool | None = None,
    highlight: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
    limits: tuple[float, float] | None = None,
    colorbar_label: str = "",
    cmap: str = "viridis",
    ncols: int | None = None,
    title: str | None = None,
    missing_label: str = "undefined (nan)",
) -> Figure:
    """One heatmap per panel (e.g. block norms of G at each checkpoint), rows and columns labelled.

    Args:
        panels: panel title → (r, c) matrix, or one matrix (a single untitled panel).
        row_labels: r labels shared by all panels, or panel title → labels; None: no tick labels.
        col_labels: c labels in the same form (default: ``row_labels`` when the panels are square).
        log: logarithmic colour scale; entries ≤ 0 are drawn grey, named in a legend below the panels.
        shared_scale: one colour scale for all panels (so panels compare); else one per panel.
        annotate: write each value in its cell (default: when the matrix has at most 12 rows and columns).
        highlight: (row, column) of a cell to outline in every panel, or panel title → cell.
        limits: fixed (low, high) of the colour scale (e.g. (−1, 1) for cosines), instead of the data's.
        colorbar_label: label of the colour bar(s).
        cmap: matplotlib colour map.
        ncols: panels per row (default: all in one row).
        title: figure title.
        missing_label: legend entry of nan (or infinite) entries, which are drawn hatched.

    Raises:
        ValueError: a matrix that is not 2-D, or labels whose count does not match it.
    """
    if not isinstance(panels, Mapping):
        panels = {"": panels}
    arrays = {name: _array(m) for name, m in panels.items()}
    ticks = _heatmap_ticks(arrays, row_labels, col_labels)
    visible = {name: a[np.isfinite(a) & ((a > 0) if log else True)] for name, a in arrays.items()}
    pooled = np.concatenate([v for v in visible.values()]) if visible else np.zeros(0)
    longest = max(max(len(t[0] or ()), len(t[1] or ())) for t in ticks.values())
    panel = (4.2, 3.6) if longest <= 12 else (2.2 + 0.22 * longest, 1.6 + 0.22 * longest)
    legend = _heatmap_legend(arrays, log, missing_label)
    with style():
        fig, axes = _grid(len(arrays), ncols, panel)
        for ax, (name, a) in zip(axes, arrays.items()):
            rows, cols = ticks[name]
            pool = pooled if shared_scale else visible[name]
            lo, hi = (pool.min(), pool.max()) if pool.size else ((1e-12, 1.0) if log else (0.0, 1.0))
            lo, hi = limits if limits is not None else (lo, hi)
            norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)) if log else Normalize(vmin=lo, vmax=hi)
            shown = np.ma.masked_where(~np.isfinite(a) | ((a <= 0) if log else False), a)
            image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            ax.set_facecolor(MASKED_COLOUR)  # what shows through masked cells
            ax.grid(False)
            for i, j in np.argwhere(~np.isfinite(a)):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="0.4", hatch="///"))
            if cols is not None:
                ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
            if rows is not None:
                ax.set_yticks(range(len(rows)), rows, fontsize=7)
            if annotate if annotate is not None else max(a.shape) <= 12:
                _annotate_cells(ax, a, image, norm, log)
            cell = highlight.get(name) if isinstance(highlight, Mapping) else highlight
            if cell is not None:
                i, j = cell
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
            if name:
                ax.set_title(name, fontsize=9)
            locator = log_ticks(norm.vmin, norm.vmax) if log else None
            colorbar = fig.colorbar(
                image, ax=ax, label=colorbar_label, shrink=0.85, ticks=locator, format="%g" if log else None
            )
            colorbar.minorticks_off()  # labelled ticks only: no 6×10⁰ between 5 and 10
        if legend:
            fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8, frameon=False)
        if title:
            fig.suptitle(title)
    return fig


def spectrum(
    eigenvalues: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor],
    *,
    log: bool = False,
    title: str | None = None,
    ylabel: str = "eigenvalue",
) -> Figure:
    """Eigenvalues against their rank (1 = largest), one marked line per series (e.g. dense vs Lanczos).

    Args:
        eigenvalues: series name → eigenvalues (any order; plotted sorted descending).
        log: logarithmic vertical axis (only positive values are shown).
        title: axes title.
        ylabel: vertical axis label.
    """
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        markers = "os^Dv<>"
        for k, (name, values) in enumerate(eigenvalues.items()):
            v = np.sort(_array(values).ravel())[::-1]
            if log:
                v = v[v > 0]
            ax.plot(
                np.arange(1, len(v) + 1), v, marker=markers[k % len(markers)], markersize=4, linewidth=1, label=name
            )
        if log:
            ax.set_yscale("log")
        ax.legend()
        _label(ax, "rank", ylabel, title)
    return fig


def density(
    curves: Mapping[
        str, tuple[Sequence[float] | np.ndarray | torch.Tensor, Sequence[float] | np.ndarray | torch.Tensor]
    ],
    *,
    log: bool = True,
    floor: float = 1e-8,
    xlabel: str = "eigenvalue",
    title: str | None = None,
) -> Figure:
    """Spectral densities (e.g. from stochastic Lanczos quadrature), one line per curve.

    Args:
        curves: name → (grid, density) of equal lengths.
        log: logarithmic vertical axis, values below ``floor`` clipped to it (the spike at 0 of a GGN
            and its small tails then share one axis).
        floor: clip level of the log axis.
        xlabel: horizontal axis label.
        title: axes title.

    Raises:
        ValueError: a grid and density of different lengths.
    """
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, (grid, values) in curves.items():
            x, y = _array(grid).ravel(), _array(values).ravel()
            if x.shape != y.shape:
                raise ValueError(f"curve {name!r}: grid has {x.size} points, density {y.size}")
            ax.plot(x, np.maximum(y, floor) if log else y, linewidth=1.2, label=name)
        if log:
            ax.set_yscale("log")
        ax.legend()
        _label(ax, xlabel, "density", title)
    return fig


def contour_trajectories(
    x: Sequence[float] | np.ndarray | torch.Tensor,
    y: Sequence[float] | np.ndarray | torch.Tensor,
    values: Matrix,
    trajectories: Mapping[str, Matrix],
    *,
    levels: int = 30,
    log: bool = True,
    shade: Matrix | None = None,
    shade_label: str = "",
    xlabel: str = "x",
    ylabel: str = "y",
    title: str | None = None,
) -> Figure:
    """Contours of a function of two parameters with optimizer paths drawn over them.

    Args:
        x: (nx,) grid of the first parameter.
        y: (ny,) grid of the second parameter.
        values: (ny, nx) function values, ``values[j, i]`` at ``(x[i], y[j])``.
        trajectories: name → (k, 2) iterates; start marked by a circle, end by a cross. Iterates outside
            the grid are drawn but the view stays on the grid.
        levels: number of contour levels.
        log: levels spaced logarithmically (values must be positive).
        shade: optional (ny, nx) boolean mask to shade (e.g. where the Hessian is indefinite).
        shade_label: legend entry of the shaded region.
        xlabel: label of the first parameter's axis.
        ylabel: label of the second parameter's axis.
        title: axes title.

    Raises:
        ValueError: ``values`` (or ``shade``) not of shape (ny, nx), or a trajectory not (k, 2).
    """
    gx, gy, z = _array(x).ravel(), _array(y).ravel(), _array(values)
    if z.shape != (gy.size, gx.size):
        raise ValueError(f"values has shape {z.shape}, expected (len(y), len(x)) = {(gy.size, gx.size)}")
    paths = {name: _array(t) for name, t in trajectories.items()}
    for name, t in paths.items():
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"trajectory {name!r} has shape {t.shape}, expected (k, 2)")
    with style():
        fig = new_figure(figsize=(6.5, 5))
        ax = fig.subplots()
        if log:
            positive = z[z > 0]
            bounds = np.geomspace(positive.min(), positive.max(), levels)
            contour = ax.contour(
                gx, gy, np.maximum(z, positive.min()), levels=bounds, norm=LogNorm(), cmap="viridis", linewidths=0.8
            )
        else:
            contour = ax.contour(gx, gy, z, levels=levels, cmap="viridis", linewidths=0.8)
        # round ticks (1, 2, 5 per decade on a log scale), not the contour levels themselves
        ticks = log_ticks(bounds[0], bounds[-1]) if log else None
        fig.colorbar(contour, ax=ax, label="loss", ticks=ticks, format="%g").minorticks_off()
        if shade is not None:
            mask = _array(shade)
            if mask.shape != z.shape:
                raise ValueError(f"shade has shape {mask.shape}, expected {z.shape}")
            ax.contourf(gx, gy, mask, levels=[0.5, 1.5], colors=["0.6"], alpha=0.3)
            ax.fill([], [], color="0.6", alpha=0.3, label=shade_label)
        for name, t in paths.items():
            (line,) = ax.plot(
                t[:, 0], t[:, 1], marker=".", markersize=4, linewidth=1.2, label=f"{name} ({len(t) - 1} steps)"
            )
            ax.plot(t[0, 0], t[0, 1], "o", color=line.get_color(), markersize=6)
            ax.plot(t[-1, 0], t[-1, 1], "x", color=line.get_color(), markersize=8, markeredgewidth=2)
        ax.set_xlim(gx.min(), gx.max())
        ax.set_ylim(gy.min(), gy.max())
        # below the axes, so it stays put from one render to the next (an explorer moving a slider)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, frameon=False)
        _label(ax, xlabel, ylabel, title)
    return fig


def bars(
    frame: pd.DataFrame,
    *,
    x: str,
    y: str,
    hue: str | None = None,
    reference: float | None = None,
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """Grouped bar chart of ``y`` per ``x`` category, one colour per ``hue`` value, values written on the bars.

    ``hue`` values are treated as categories (numbers too, e.g. training steps).

    Args:
        frame: long-format table with columns ``x``, ``y`` (and ``hue``).
        x: category column (order of first appearance).
        y: value column.
        hue: column that splits the bars of a category.
        reference: draw a horizontal line at this value (e.g. 1 for a ratio).
        ylim: vertical axis limits.
        title: axes title.

    Raises:
        ValueError: ``frame`` lacks a named column.
    """
    _require_columns(frame, [c for c in (x, y, hue) if c is not None])
    data = frame.assign(**{hue: frame[hue].astype(str)}) if hue is not None else frame  # categorical colours
    with style():
        fig = new_figure(
            figsize=(max(6.0, 0.6 * frame[x].nunique() * max(1, frame[hue].nunique() if hue else 1) ** 0.5), 4)
        )
        ax = fig.subplots()
        sns.barplot(data=data, x=x, y=y, hue=hue, ax=ax, errorbar=None)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2f", fontsize=6, padding=1)
        if reference is not None:
            ax.axhline(reference, color="0.4", linestyle="--", linewidth=1)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.tick_params(axis="x", labelrotation=30)
        _label(ax, x.replace("_", " "), y.replace("_", " "), title)
    return fig


def to_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes (for widgets and files)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def steps_vs_batch(
    table: pd.DataFrame, *, value: str = "steps_to_target", x: str = "tokens_per_step", title: str | None = None
) -> Figure:
    """Log-log steps (cost, time) to target against the token batch, one line per optimizer: the critical batch.

    Only runs at each setting's tuned LR count (column ``chosen`` when present). Each seed is a dot (none
    for a run that missed the target); the line joins the medians over seeds, a miss counting as
    infinitely many steps, so a setting most seeds missed has no point; the dotted grey line is perfect
    scaling (doubling the batch halves the steps): slope −1 for steps, flat for cost and time, which grow
    with the steps times the batch; it is anchored at the highest median of the smallest batch.

    Args:
        table: study table (:func:`gnlib.experiment.study.batch_size_study`): columns ``optimizer``, ``x``, ``value``.
        value: ``"steps_to_target"``, ``"grad_equivalents_to_target"``, ``"wall_time_to_target_s"`` or
            ``"cpu_time_to_target_s"`` (their ``_raw`` forms too).
        x: ``"tokens_per_step"`` or ``"micro_batches"``.
        title: axes title.
    """
    _require_columns(table, ["optimizer", x, value])
    data = table.loc[table["chosen"]] if "chosen" in table.columns else table
    data = data.astype({value: float, x: float})
    # a seed that missed counts as infinitely many steps, so a setting most seeds missed has no median
    missed_as_inf = data.assign(**{value: data[value].fillna(np.inf)})
    medians = missed_as_inf.groupby(["optimizer", x], sort=False)[value].median().reset_index()
    medians = medians.loc[np.isfinite(medians[value])]
    data = data.dropna(subset=[value])
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        order = list(dict.fromkeys(table["optimizer"]))
        palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
        sns.lineplot(data=medians, x=x, y=value, hue="optimizer", hue_order=order, palette=palette, marker="o", ax=ax)
        sns.scatterplot(
            data=data,
            x=x,
            y=value,
            hue="optimizer",
            hue_order=order,
            palette=palette,
            alpha=0.4,
            s=18,
            legend=False,
            ax=ax,
        )
        if len(medians):
            smallest = medians[x].min()
            start = medians.loc[medians[x] == smallest, value].max()
            xs = np.array(sorted(medians[x].unique()))
            ideal = start * smallest / xs if value == "steps_to_target" else np.full(len(xs), start)
            ax.plot(xs, ideal, linestyle=":", color="0.5", label="perfect scaling")
            ax.legend()
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _label(ax, x.replace("_", " "), value.replace("_", " "), title)
    return fig


def direction_cosines(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Cosine between each partition's GN direction and full GN's along a run (one line per partition).

    Args:
        frame: :func:`gnlib.experiment.probes.direction_cosines` table: columns ``step``, ``partition``, ``cosine``.
        title: axes title.
    """
    _require_columns(frame, ["step", "partition", "cosine"])
    with style():
        fig = new_figure(figsize=(6, 4))
        ax = fig.subplots()
        sns.lineplot(data=frame, x="step", y="cosine", hue="partition", marker="o", ax=ax)
        ax.set_ylim(min(0.0, float(frame["cosine"].min())), 1.02)
        _label(ax, "outer step of the full-GN run", "cosine with the full-GN direction", title)
    return fig

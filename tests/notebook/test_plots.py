"""Figures: each function returns a Figure built from its data, leaves matplotlib's global state alone."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gnlib.notebook import plots


@pytest.fixture(autouse=True)
def global_state_untouched():
    """Every test checks that rcParams are the same before and after making figures."""
    before = dict(matplotlib.rcParams)
    yield
    assert dict(matplotlib.rcParams) == before


def test_heatmap_panels_share_a_scale_and_mask_non_positive_entries_in_log():
    a = np.array([[1.0, 0.1], [0.0, 2.0]])
    fig = plots.heatmap({"a": a, "b": torch.tensor(a * 10)}, ["x", "y"], log=True, highlight=(0, 1))
    assert isinstance(fig, Figure)
    image_a, image_b = (ax.images[0] for ax in fig.axes[:2])
    assert image_a.get_clim() == image_b.get_clim() == (pytest.approx(0.1), pytest.approx(20.0))
    assert image_a.get_array().mask.tolist() == [[False, False], [True, False]]
    np.testing.assert_allclose(image_b.get_array().data, a * 10)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["x", "y"]
    outlined = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(outlined) == 1 and outlined[0].get_xy() == (0.5, -0.5)
    assert fig.axes[0].get_title() == "a"
    fig.savefig(__import__("io").BytesIO(), format="png")


def test_heatmap_single_matrix_own_scales_rectangular_and_unlabelled_panels():
    fig = plots.heatmap(np.arange(6.0).reshape(2, 3), ["r1", "r2"], ["c1", "c2", "c3"])
    assert fig.axes[0].images[0].get_clim() == (0.0, 5.0)
    assert len(fig.axes[0].texts) == 6  # small matrices are annotated
    fig = plots.heatmap(
        {"p": np.eye(2), "q": 5 + np.arange(1200.0).reshape(30, 40)},
        {"p": ["a", "b"], "q": None},
        shared_scale=False,
        highlight={"p": (1, 1)},
    )
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert fig.axes[1].images[0].get_clim() == (5.0, 1204.0)
    fig = plots.heatmap(np.array([[0.5, -0.2]]), ["m"], ["a", "b"], limits=(-1, 1), cmap="RdBu")
    assert fig.axes[0].images[0].get_clim() == (-1, 1)
    assert fig.axes[1].get_yticklabels() == [] or all(t.get_text() != "a" for t in fig.axes[1].get_yticklabels())
    assert not [p for p in fig.axes[1].patches if isinstance(p, Rectangle)]


def test_heatmap_rejects_labels_that_do_not_match():
    with pytest.raises(ValueError, match="shape"):
        plots.heatmap(np.ones((2, 2)), ["only one"])
    with pytest.raises(ValueError, match="shape"):
        plots.heatmap({"v": np.ones(3)}, ["a", "b", "c"])


def test_spectrum_sorts_descending_and_drops_non_positive_in_log():
    fig = plots.spectrum({"dense": [1.0, 5.0, -2.0], "lanczos": torch.tensor([5.0, 1.0])}, log=True)
    dense, lanczos = [line for line in fig.axes[0].get_lines()]
    assert dense.get_ydata().tolist() == [5.0, 1.0] and dense.get_xdata().tolist() == [1, 2]
    assert lanczos.get_label() == "lanczos" and fig.axes[0].get_yscale() == "log"


def test_density_clips_to_the_floor_in_log_and_checks_lengths():
    grid = np.linspace(-1, 1, 5)
    fig = plots.density({"G": (grid, np.array([0.0, 1e-12, 1.0, 2.0, 0.5]))}, floor=1e-6)
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == [1e-6, 1e-6, 1.0, 2.0, 0.5]
    with pytest.raises(ValueError, match="points"):
        plots.density({"G": (grid, np.ones(4))})


def test_contour_trajectories_draws_paths_and_shading():
    x, y = np.linspace(-1, 1, 20), np.linspace(-2, 2, 30)
    values = (x[None, :] ** 2 + y[:, None] ** 2) + 0.1
    path = np.array([[0.9, 1.8], [0.5, 0.5], [0.0, 0.0]])
    fig = plots.contour_trajectories(
        x, y, values, {"newton": path}, shade=values > 2, shade_label="far", xlabel="a", ylabel="b"
    )
    ax = fig.axes[0]
    line = next(line for line in ax.get_lines() if line.get_label().startswith("newton"))
    np.testing.assert_allclose(line.get_xydata(), path)
    assert line.get_label() == "newton (2 steps)" and ax.get_xlim() == (-1.0, 1.0)
    assert "far" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="values"):
        plots.contour_trajectories(x, y, values.T, {})
    with pytest.raises(ValueError, match="trajectory"):
        plots.contour_trajectories(x, y, values, {"bad": np.ones((3, 3))})


def test_bars_one_bar_per_row_with_labels_and_reference():
    frame = pd.DataFrame({"method": ["a", "b", "a", "b"], "cosine": [0.5, 0.2, 0.7, 0.1], "step": [0, 0, 10, 10]})
    fig = plots.bars(frame, x="method", y="cosine", hue="step", reference=1.0, ylim=(0, 1.1))
    ax = fig.axes[0]
    heights = sorted(p.get_height() for p in ax.patches if p.get_height() > 0)
    assert heights == pytest.approx([0.1, 0.2, 0.5, 0.7])
    assert ax.get_ylim() == (0, 1.1)
    with pytest.raises(ValueError, match="lacks"):
        plots.bars(frame, x="method", y="missing")


def test_to_png_and_loss_curves_still_work():
    frame = pd.DataFrame({"step": [0, 1, 2], "val_loss": [3.0, 2.0, None], "optimizer": ["adamw"] * 3})
    fig = plots.loss_curves(frame, target=2.5)
    assert plots.to_png(fig).startswith(b"\x89PNG")


def test_steps_vs_batch_draws_medians_with_misses_counted_and_seed_dots():
    rows = [
        dict(optimizer="gn", tokens_per_step=tokens, steps_to_target=steps, chosen=True)
        for tokens, steps in [(512, 40.0), (512, 20.0), (512, 30.0), (2048, 10.0), (2048, None), (2048, None)]
    ]
    fig = plots.steps_vs_batch(pd.DataFrame(rows))
    ax = fig.axes[0]
    (median_line,) = [line for line in ax.lines if line.get_label() != "perfect scaling" and len(line.get_xdata())]
    # at 2048 tokens two of three seeds missed: no median there; at 512 the median of 40, 20, 30
    assert list(median_line.get_xdata()) == [512.0] and list(median_line.get_ydata()) == [30.0]
    dots = np.concatenate([c.get_offsets() for c in ax.collections])
    dots = dots[(dots > 0).all(axis=1)]  # seaborn adds an empty collection at the origin; log axes have none
    assert sorted(map(tuple, dots.tolist())) == [(512, 20), (512, 30), (512, 40), (2048, 10)]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="steps_to_target"):
        plots.steps_vs_batch(pd.DataFrame(rows).drop(columns="steps_to_target"))


def test_perfect_scaling_halves_steps_and_keeps_cost_and_time_flat():
    rows = [
        dict(optimizer="gn", tokens_per_step=tokens, steps_to_target=steps, grad_equivalents_to_target=cost)
        for tokens, steps, cost in [(512, 40.0, 80.0), (2048, 20.0, 160.0), (8192, 10.0, 320.0)]
    ]
    for value, ideal in [("steps_to_target", [40.0, 10.0, 2.5]), ("grad_equivalents_to_target", [80.0] * 3)]:
        ax = plots.steps_vs_batch(pd.DataFrame(rows), value=value).axes[0]
        (line,) = [line for line in ax.lines if line.get_label() == "perfect scaling"]
        assert list(line.get_xdata()) == [512, 2048, 8192] and list(line.get_ydata()) == ideal


def png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_figures_display_in_ipython_as_sharp_png_whatever_the_backend():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    # matplotlib's inline backend registers a formatter for every Figure; gnlib's figures bypass it
    shell.display_formatter.formatters["image/png"].for_type(Figure, lambda figure: b"low-resolution")
    try:
        fig = plots.loss_curves(pd.DataFrame({"step": [0, 1], "val_loss": [3.0, 2.0], "optimizer": ["a", "a"]}))
        with capture_output() as captured:
            shell.display_formatter.format(fig)
    finally:
        shell.display_formatter.formatters["image/png"].pop(Figure)
    (output,) = captured.outputs
    assert output.data["text/plain"] == "<NotebookFigure size 600x400 with 1 Axes>"
    assert png_size(output.data["image/png"]) == (1200, 800)  # drawn at twice the size it is shown
    assert output.metadata["image/png"] == {"width": 600, "height": 400}


def test_short_names_are_one_form():
    assert plots.short_name("blocks.0.attn.wq.weight") == "block0.attn.wq"
    assert plots.short_name("blocks.11.mlp.w_up.weight") == "block11.mlp.w_up"
    assert plots.short_name("embed.weight") == "embed" and plots.short_name("2.bias") == "2.bias"
    assert plots.short_name("block0") == "block0"


def test_heatmap_names_zero_and_undefined_cells_in_a_legend():
    fig = plots.heatmap(np.array([[1.0, 0.0], [np.nan, 2.0]]), ["a", "b"], log=True, missing_label="no value")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["exactly 0 (not on the log scale)", "no value"]
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_xy() == (-0.5, 0.5)
    assert not plots.heatmap(np.eye(2) + 1, ["a", "b"], log=True).legends  # nothing to explain


def test_contour_colour_bar_ticks_are_round_and_the_legend_stays_below_the_axes():
    x, y = np.linspace(-1, 1, 20), np.linspace(-2, 2, 30)
    values = 0.9 + 90 * (x[None, :] ** 2 + y[:, None] ** 2) / 5
    positions = []
    for end in ([0.5, 0.5], [-0.9, -1.9]):  # paths in different corners: the legend does not move
        fig = plots.contour_trajectories(x, y, values, {"a": np.array([[0.0, 0.0], end])})
        fig.canvas.draw()
        colorbar = fig.axes[1]
        ticks = [t for t in colorbar.get_yticks() if values.min() <= t <= values.max()]
        assert ticks and all(float(f"{t:.0e}") == pytest.approx(t) and f"{t:.0e}"[0] in "125" for t in ticks)
        legend = fig.axes[0].get_legend()
        positions.append(tuple(legend.get_window_extent().bounds))
        assert legend.get_window_extent().y1 < fig.axes[0].get_window_extent().y0  # below the axes
    assert positions[0] == positions[1]


def test_log_colour_bars_label_round_values_only():
    fig = plots.heatmap(np.array([[0.51, 6.5], [2.5, 1.0]]), ["a", "b"], log=True)
    fig.canvas.draw()
    colorbar = fig.axes[1]
    low, high = colorbar.get_ylim()
    labels = [t.get_text() for t in colorbar.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert labels == ["1", "2", "5"] and not [t for t in colorbar.yaxis.get_minorticklabels() if t.get_text()]

"""Explorers without a browser: set a control's value, check what the callback rendered."""

import ipywidgets
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from gnlib.curvature import blocks
from gnlib.models import mlp
from gnlib.notebook import widgets
from gnlib.notebook.plots import spectrum
from gnlib.params import numel, params_of


@pytest.fixture(scope="module")
def setup():
    """An MLP 3 → 5 → 4 (44 parameters) and two checkpoints of random symmetric matrices."""
    model = mlp([3, 5, 4])
    like = params_of(model)
    a = torch.randn(numel(like), numel(like), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = a @ a.T
    matrices = {"step 0": {"GGN": a, "Hessian": a - 1.0}, "step 5": {"GGN": 2 * a, "Hessian": 2 * a - 1.0}}
    partitions = {"per layer": blocks.per_layer(model), "per tensor": blocks.per_tensor(model)}
    return like, matrices, partitions


def test_explorer_renders_on_creation_and_on_every_change():
    calls = []

    def render(scale: float, log: bool) -> Figure:
        calls.append((scale, log))
        return spectrum({"s": [scale, 1.0]}, log=log)

    explorer = widgets.Explorer(
        render, {"scale": ipywidgets.FloatLogSlider(value=2.0, min=-1, max=2), "log": ipywidgets.Checkbox(value=False)}
    )
    assert isinstance(explorer, ipywidgets.VBox) and calls == [(2.0, False)]
    assert bytes(explorer.image.value).startswith(b"\x89PNG")
    explorer.controls["log"].value = True
    assert calls[-1] == (2.0, True) and explorer.figure.axes[0].get_yscale() == "log"
    with explorer.hold():
        explorer.controls["scale"].value = 10.0
        explorer.controls["log"].value = False
    assert calls[-1] == (10.0, False) and len(calls) == 3
    explorer.controls["log"].value = False  # unchanged: no render
    assert explorer.renders == 3


def test_explorer_shows_value_errors_instead_of_raising():
    def render(k: int) -> Figure:
        if k < 0:
            raise ValueError("k must be >= 0")
        return spectrum({"s": [1.0] * (k + 1)})

    explorer = widgets.Explorer(render, {"k": ipywidgets.IntSlider(value=1, min=-3, max=3)})
    image = bytes(explorer.image.value)
    explorer.controls["k"].value = -1
    assert explorer.figure is None and "k must be &gt;= 0" in explorer.message.value
    assert bytes(explorer.image.value) == image  # the last good figure stays
    explorer.controls["k"].value = 2
    assert explorer.message.value == "" and len(explorer.figure.axes[0].get_lines()[0].get_xdata()) == 3


def test_curvature_view_shows_block_norms_and_the_selected_pair(setup):
    like, matrices, partitions = setup
    g = matrices["step 0"]["GGN"]
    fig = widgets.curvature_view(g, like, partitions["per layer"], normalize="none", row_block="2", col_block="0")
    norms = blocks.block_norms(g, partitions["per layer"], like, "none").numpy()
    np.testing.assert_allclose(fig.axes[0].images[0].get_array().data, norms)
    pair = blocks.block_view(g, partitions["per layer"], like, "2", "0").abs().numpy()
    np.testing.assert_allclose(fig.axes[1].images[0].get_array().data, pair)
    assert fig.axes[1].get_title() == "|G[2, 0]|"
    with pytest.raises(ValueError, match="row_block"):
        widgets.curvature_view(g, like, partitions["per layer"], row_block="nope")


def test_curvature_explorer_controls_drive_the_view(setup):
    like, matrices, partitions = setup
    explorer = widgets.curvature_explorer(matrices, like, partitions)
    assert explorer.renders == 1 and set(explorer.controls) == {
        "checkpoint",
        "matrix",
        "partition",
        "normalize",
        "log",
        "row_block",
        "col_block",
    }

    def shown_norms():
        return explorer.figure.axes[0].images[0].get_array().data

    explorer.controls["normalize"].value = "none"
    np.testing.assert_allclose(
        shown_norms(), blocks.block_norms(matrices["step 0"]["GGN"], partitions["per layer"], like)
    )
    explorer.controls["checkpoint"].value = "step 5"
    np.testing.assert_allclose(
        shown_norms(), blocks.block_norms(matrices["step 5"]["GGN"], partitions["per layer"], like)
    )
    explorer.controls["matrix"].value = "Hessian"
    np.testing.assert_allclose(
        shown_norms(), blocks.block_norms(matrices["step 5"]["Hessian"], partitions["per layer"], like)
    )
    renders = explorer.renders
    explorer.controls["partition"].value = "per tensor"  # block options follow, one render
    assert explorer.renders == renders + 1
    assert [value for _, value in explorer.controls["row_block"].options] == list(partitions["per tensor"])
    assert shown_norms().shape == (4, 4)
    explorer.controls["col_block"].value = "2.bias"
    assert explorer.figure.axes[1].images[0].get_array().shape == (15, 4)
    explorer.controls["log"].value = False
    assert explorer.figure.axes[0].images[0].norm.__class__.__name__ == "Normalize"


def test_curvature_explorer_rejects_inconsistent_inputs(setup):
    like, matrices, partitions = setup
    with pytest.raises(ValueError, match="at least one"):
        widgets.curvature_explorer({}, like, partitions)
    with pytest.raises(ValueError, match="do not hold"):
        widgets.curvature_explorer({**matrices, "x": {"GGN": matrices["step 0"]["GGN"]}}, like, partitions)


def test_explorer_image_is_drawn_at_twice_the_displayed_size():
    explorer = widgets.Explorer(lambda k: spectrum({"s": [1.0, k]}), {"k": ipywidgets.FloatSlider(value=2.0)})
    png = bytes(explorer.image.value)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (explorer.image.width, explorer.image.height) == ("600", "400") and (width, height) == (1200, 800)


def test_curvature_view_refuses_diag_normalization_of_zero_blocks(setup):
    like, matrices, partitions = setup
    g = matrices["step 0"]["GGN"].clone()
    layers = partitions["per layer"]
    first = [i for i, name in enumerate(like) if name in layers["0"]]
    flat = torch.cat([torch.arange(p.numel()) * 0 + i for i, p in enumerate(like.values())])
    inside = torch.isin(flat, torch.tensor(first))
    g[inside] = g[:, inside] = 0.0
    g[inside.nonzero()[0], inside.nonzero()[0]] = 1e-18  # rounding noise on a zero block
    fig = widgets.curvature_view(g, like, layers, normalize="diag", name="H − G", title="H − G at step 0")
    shown = fig.axes[0].images[0].get_array()
    assert np.isnan(shown.data[0]).all() and np.isnan(shown.data[:, 0]).all() and np.isfinite(shown.data[1:, 1:]).all()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "not normalizable: ‖(H − G)_bb‖ ≈ 0 for 0" in legend
    assert np.nanmax(shown.data) <= 1.0 + 1e-12  # no 1e14 from dividing by a rounding-error block
    assert fig.axes[0].get_title() == "‖(H − G)_bc‖ (normalize=diag)" and fig._suptitle.get_text() == "H − G at step 0"


def test_curvature_explorer_titles_and_labels_use_short_names():
    from gnlib.models import build_model

    model = build_model("tiny", seed=0, vocab_size=8, d_model=4, n_layers=1, n_heads=2, d_ff=4, max_seq_len=4)
    n = numel(params_of(model))
    g = torch.eye(n, dtype=torch.float64)
    explorer = widgets.curvature_explorer({"step 0": {"GGN": g}}, model, {"per tensor": blocks.per_tensor(model)})
    labels = [t.get_text() for t in explorer.figure.axes[0].get_yticklabels()]
    assert "block0.attn.wq" in labels and "embed" in labels and all(".weight" not in x for x in labels)
    assert explorer.figure.axes[0].get_title() == "‖G_bc‖ (normalize=diag)"
    assert explorer.figure._suptitle.get_text() == "GGN at step 0, per tensor blocks"
    assert ("block0.attn.wq", "blocks.0.attn.wq.weight") in explorer.controls["row_block"].options

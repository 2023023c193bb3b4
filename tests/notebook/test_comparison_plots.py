"""The figures that set methods against full GN: shares by batch, and directions against step gains."""

import numpy as np
import pandas as pd

from gnlib.notebook import comparison_plots


def test_directions_vs_steps_draws_a_missed_method_at_its_bound():
    points = pd.DataFrame(
        {
            "method": ["gn_layerwise", "kfac", "adamw"],
            "direction": ["layerwise GN", "K-FAC", "Adam"],
            "reduction_ratio": [0.7, 0.04, 0.007],
            "gain_share": [0.92, np.nan, -0.96],
            "gain_share_at_most": [0.92, -1.2, -0.96],
        }
    )
    ax = comparison_plots.directions_vs_steps(points).axes[0]
    drawn = {tuple(np.round(c.get_offsets()[0], 3)): c for c in ax.collections}
    assert set(drawn) == {(0.7, 0.92), (0.04, -1.2), (0.007, -0.96)}
    assert drawn[(0.04, -1.2)].get_facecolor().size == 0  # open marker: the share lies below
    assert drawn[(0.7, 0.92)].get_facecolor().size > 0
    assert sorted(t.get_text() for t in ax.texts) == ["Adam", "K-FAC (missed: share ≤ -1.20)", "layerwise GN"]
    assert ax.get_xscale() == "log"  # 0.007 to 0.7 spans two decades


def test_directions_vs_steps_without_bounds_leaves_a_missed_method_out():
    points = pd.DataFrame({"method": ["kfac", "muon"], "cosine": [0.3, 0.1], "gain_share": [np.nan, 0.0]})
    ax = comparison_plots.directions_vs_steps(points, x="cosine").axes[0]
    assert [t.get_text() for t in ax.texts] == ["muon"] and ax.get_xscale() == "linear"


def test_gain_shares_draws_one_line_per_method_without_missed_batches():
    shares = pd.DataFrame(
        {
            "method": ["shampoo", "shampoo", "kfac", "kfac"],
            "tokens_per_step": [1024, 4096, 1024, 4096],
            "gain_share": [-2.0, -1.0, np.nan, -7.0],
        }
    )
    ax = comparison_plots.gain_shares(shares).axes[0]
    drawn = [line.get_xydata().tolist() for line in ax.get_lines()]
    assert [[1024, -2.0], [4096, -1.0]] in drawn and [[4096, -7.0]] in drawn  # kfac's missed 1,024 left out
    assert {"shampoo", "kfac", "full GN", "best first-order method"} <= {t.get_text() for t in ax.get_legend().texts}

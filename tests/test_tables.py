"""Tables as a page shows them: misses spelled out, short headers, rounded numbers."""

import pandas as pd
import pytest

from gnlib.tables import readable_summary


def summary_rows():
    common = dict(final_val_loss=2.71234, steps=30, tokens=100, grad_equivalents=120.4, wall_time_s=3.14159)
    return pd.DataFrame(
        [
            dict(
                optimizer="adamw", steps_to_target=None, grad_equivalents_to_target=None, status="completed", **common
            ),
            dict(
                optimizer="gn", steps_to_target=12.0, grad_equivalents_to_target=64.2, status="reached_target", **common
            ),
        ]
    )


def test_misses_read_not_reached_and_numbers_are_rounded():
    shown = readable_summary(summary_rows(), 30)
    assert list(shown.index) == ["adamw", "gn"] and shown.index.name == "optimizer"
    assert list(shown.columns) == [
        "steps to target",
        "final val loss",
        "steps run",
        "cost to target",
        "cost",
        "time (s)",
        "status",
    ]
    assert shown.loc["adamw", "steps to target"] == "not reached in 30 steps"
    assert shown.loc["adamw", "cost to target"] == "-"
    assert shown.loc["gn", "steps to target"] == "12" and shown.loc["gn", "cost to target"] == "64"
    assert shown.loc["gn", "final val loss"] == 2.712 and shown.loc["gn", "time (s)"] == 3.1
    assert shown.loc["gn", "cost"] == 120
    assert "NaN" not in shown.to_string() and "nan" not in shown.to_string()


def test_refuses_a_table_without_summary_columns():
    with pytest.raises(ValueError, match="status"):
        readable_summary(summary_rows().drop(columns="status"), 30)

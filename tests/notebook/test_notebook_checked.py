"""Checked notebook outputs: a value inside its band prints the band alone, outside it the value too."""

import math

import pytest

from gnlib.notebook import fewer_steps, within


@pytest.mark.parametrize("value", [7, 8, 8.999, 10, 6.0])
def test_within_prints_only_the_band_for_any_value_inside_it(value):
    assert within(value, 8, 2) == "8 ± 2"


def test_within_shows_decimals_of_the_tolerance():
    assert within(0.4359, 0.44, 0.02) == "0.44 ± 0.02"
    assert within(2.9533, 2.95, 0.02) == "2.95 ± 0.02"
    assert within(0.2066, 0.207, 0.001) == "0.207 ± 0.001"
    assert within(1.0, 1.0, 0.0) == "1 ± 0"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (11, "11 (stored: 8 ± 2)"),
        (5.5, "5.5 (stored: 8 ± 2)"),
        (None, "not reached (stored: 8 ± 2)"),
        (math.nan, "not reached (stored: 8 ± 2)"),
        (math.inf, "not reached (stored: 8 ± 2)"),
    ],
)
def test_within_names_a_value_outside_the_band(value, shown):
    assert within(value, 8, 2) == shown


@pytest.mark.parametrize(
    ("expected", "tolerance", "named"),
    [(math.nan, 1, "expected=nan"), (1, -0.1, "tolerance=-0.1"), (1, math.inf, "tolerance=inf")],
)
def test_within_refuses_a_band_that_cannot_hold(expected, tolerance, named):
    with pytest.raises(ValueError, match=f"within: {named} is invalid; allowed: "):
        within(1.0, expected, tolerance)


def test_fewer_steps_counts_a_miss_as_more_steps_than_any_reached():
    steps = {"gn": 8, "gn_layerwise": 10, "adamw": None, "muon": math.nan, "soap": 17}
    assert fewer_steps(steps, ["gn", "gn_layerwise"], ["adamw", "muon", "soap"])
    assert not fewer_steps(steps, ["gn_layerwise"], ["gn"])
    assert not fewer_steps(steps, ["adamw"], ["gn"])  # a miss is never faster
    assert not fewer_steps(steps, ["gn", "absent"], ["soap"])  # an absent name counts as missed


def test_fewer_steps_needs_strictly_fewer_and_both_groups():
    assert not fewer_steps({"gn": 9, "soap": 9}, ["gn"], ["soap"])
    assert not fewer_steps({"gn": 9}, ["gn"], [])
    assert not fewer_steps({"gn": 9}, [], ["gn"])

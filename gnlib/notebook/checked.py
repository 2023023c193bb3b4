"""Checked notebook outputs that hold on every CPU.

float32 kernels differ between vector instruction sets (``ATEN_CPU_CAPABILITY``: default, avx2, avx512) and
thread counts, and a float64 run of a few hundred steps carries its last-digit differences forward. So the
last digits of a loss, and a step count read off a loss that crosses its target by a hair, move from one CPU
to another. A ``# NBVAL_CHECK_OUTPUT`` cell prints only what rounding cannot move: claims (orderings,
comparisons with a margin) and values against the stored run's value with a stated band.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def within(value: float | None, expected: float, tolerance: float) -> str:
    """``value`` as a checked output: ``"8 ± 2"`` when ``|value − expected| ≤ tolerance``, whatever the CPU.

    The text depends only on ``expected`` and ``tolerance`` while ``value`` lies in the band, so nbval
    compares it exactly; outside the band (or for a missing or non-finite value) it names the value, so
    the diff nbval shows says what moved.

    Args:
        value: the measured figure; None or NaN for "not reached" (a step count that missed its target).
        expected: the stored run's figure, written in the cell's source.
        tolerance: half-width of the band (≥ 0), wider than the spread between CPUs.

    Returns:
        ``"<expected> ± <tolerance>"`` at the tolerance's decimals, or ``"<value> (stored: <band>)"``.

    Raises:
        ValueError: ``expected`` is not finite, or ``tolerance`` is negative or not finite.
    """
    if not math.isfinite(expected):
        raise ValueError(f"within: expected={expected!r} is invalid; allowed: a finite number")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"within: tolerance={tolerance!r} is invalid; allowed: a finite number >= 0")
    decimals = _decimals(tolerance)
    band = f"{expected:.{decimals}f} ± {tolerance:.{decimals}f}"
    if _missing(value):
        return f"not reached (stored: {band})"
    if abs(value - expected) <= tolerance:
        return band
    return f"{value:.6g} (stored: {band})"


def fewer_steps(steps: Mapping[str, float | None], fast: Iterable[str], slow: Iterable[str]) -> bool:
    """Whether every name in ``fast`` reached its target in fewer steps than every name in ``slow``.

    Args:
        steps: name -> steps to target; None or NaN for a missed target, which counts as more steps than
            any reached one. A name absent from ``steps`` counts as missed.
        fast: the names claimed faster (an empty group claims nothing: False).
        slow: the names claimed slower (an empty group claims nothing: False).

    Returns:
        True when each of ``fast`` reached the target and needed fewer steps than each of ``slow``.
    """
    fast, slow = [steps.get(name) for name in fast], [steps.get(name) for name in slow]
    if not fast or not slow or any(_missing(s) for s in fast):
        return False
    return all(_missing(s) or f < s for f in fast for s in slow)


def _missing(value: float | None) -> bool:
    """None or a non-finite number: a target not reached, a value not measured."""
    return value is None or not math.isfinite(value)


def _decimals(tolerance: float) -> int:
    """Decimals that show ``tolerance`` as written (2 for 0.05, 0 for 2), at most 6."""
    for decimals in range(7):
        if abs(round(tolerance, decimals) - tolerance) <= 1e-12 * max(1.0, abs(tolerance)):
            return decimals
    return 6

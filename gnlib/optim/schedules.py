"""Learning-rate schedules: callables ``step -> multiplier`` in [0, 1].

The train loop sets ``group["lr"] = group["initial_lr"] * schedule(step)`` before update number
``step`` (counted from 0). Every schedule is a small frozen dataclass, so it prints its settings and
pickles into checkpoints.

Conventions (shared by all schedules, with ``T = total_steps`` and ``W = warmup_steps``):

* warmup: ``m(s) = (s + 1) / (W + 1)`` for ``s < W``, so the first update already moves and ``m(W) = 1``;
* decays reach their final value at ``s = T`` (the step after the last update), as in optax's
  ``cosine_decay_schedule``: the last update ``s = T - 1`` uses a small positive multiplier rather
  than wasting a step at zero; steps ``s >= T`` keep the final value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from gnlib.runtime import invalid, is_integer

Schedule = Callable[[int], float]


def _check_step(step: int) -> None:
    if step < 0:
        raise invalid("", "step", step, "an integer >= 0")


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if not is_integer(total_steps) or total_steps < 1:
        raise invalid("", "total_steps", total_steps, "an integer >= 1")
    if not is_integer(warmup_steps) or not 0 <= warmup_steps < total_steps:
        raise invalid("", "warmup_steps", warmup_steps, f"an integer in [0, total_steps={total_steps})")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / (warmup_steps + 1)


@dataclass(frozen=True)
class Constant:
    """Multiplier 1 at every step."""

    def __call__(self, step: int) -> float:
        """Return 1.0."""
        _check_step(step)
        return 1.0


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup, then cosine decay from 1 to ``final_fraction``.

    For ``W <= s``: ``m(s) = f + (1 - f) * (1 + cos(pi * min(s - W, T - W) / (T - W))) / 2`` with
    ``f = final_fraction``; ``m(W) = 1``, ``m(T) = f``.
    """

    total_steps: int
    warmup_steps: int = 0
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        """Validate the settings."""
        _check_steps(self.total_steps, self.warmup_steps)
        if not 0.0 <= self.final_fraction <= 1.0:
            raise invalid("", "final_fraction", self.final_fraction, "a number in [0, 1]")

    def __call__(self, step: int) -> float:
        """Multiplier before update ``step``."""
        _check_step(step)
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        span = self.total_steps - self.warmup_steps
        progress = min(step - self.warmup_steps, span) / span
        f = self.final_fraction
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warmup, constant 1, then linear decay to 0 over the last ``decay_fraction`` of the steps.

    With ``D = round(decay_fraction * T)`` decay steps: ``m(s) = 1`` for ``W <= s < T - D`` and
    ``m(s) = max(T - s, 0) / D`` for ``s >= T - D``; ``m(T) = 0``.
    """

    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        """Validate the settings."""
        _check_steps(self.total_steps, self.warmup_steps)
        if not 0.0 < self.decay_fraction <= 1.0:
            raise invalid("", "decay_fraction", self.decay_fraction, "a number in (0, 1]")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} plus decay steps {self.decay_steps} "
                f"(decay_fraction={self.decay_fraction}) exceed total_steps={self.total_steps}"
            )

    @property
    def decay_steps(self) -> int:
        """Number of steps ``D`` in the final linear decay (at least 1)."""
        return max(1, round(self.decay_fraction * self.total_steps))

    def __call__(self, step: int) -> float:
        """Multiplier before update ``step``."""
        _check_step(step)
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        return min(1.0, max(self.total_steps - step, 0) / self.decay_steps)


def constant() -> Constant:
    """Schedule with multiplier 1 everywhere."""
    return Constant()


def warmup_cosine(total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> WarmupCosine:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``final_fraction`` at ``total_steps``."""
    return WarmupCosine(total_steps, warmup_steps, final_fraction)


def warmup_stable_decay(total_steps: int, warmup_steps: int, decay_fraction: float = 0.2) -> WarmupStableDecay:
    """Warmup, a constant phase, and a linear decay to 0 over the last ``decay_fraction`` of the steps."""
    return WarmupStableDecay(total_steps, warmup_steps, decay_fraction)


def cosine_decay(n_steps: int) -> WarmupCosine:
    """Cosine from 1 at step 0 down to ~0 at the last step ``n_steps - 1`` (exactly 0 at ``n_steps``).

    ``m(k) = (1 + cos(pi * k / n_steps)) / 2``: the schedule of an inner loop of ``n_steps`` updates.
    """
    return WarmupCosine(n_steps, 0, 0.0)


#: Schedule name -> (factory of ``total_steps`` and keywords, the keywords it takes).
_FACTORIES: dict[str, tuple[Callable[..., Schedule], tuple[str, ...]]] = {
    "constant": (lambda total_steps: constant(), ()),
    "warmup_cosine": (warmup_cosine, ("warmup_steps", "final_fraction")),
    "warmup_stable_decay": (warmup_stable_decay, ("warmup_steps", "decay_fraction")),
    "cosine_decay": (cosine_decay, ()),
}


def make_schedule(name: str, total_steps: int, **kwargs) -> Schedule:
    """Build a schedule by name: ``constant``, ``warmup_cosine``, ``warmup_stable_decay``, ``cosine_decay``.

    Args:
        name: schedule name.
        total_steps: number of updates the schedule spans (ignored by ``constant``).
        **kwargs: the named schedule's remaining arguments (e.g. ``warmup_steps``, ``final_fraction``).

    Raises:
        ValueError: unknown name, unknown keyword or invalid value.
    """
    if name not in _FACTORIES:
        raise invalid("schedule", "name", name, f"one of {sorted(_FACTORIES)}")
    factory, allowed = _FACTORIES[name]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} got unknown argument(s) {unknown}; allowed: {list(allowed)}")
    return factory(total_steps, **kwargs)

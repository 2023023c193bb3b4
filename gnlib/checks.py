"""Checks of user input shared by the library, notebooks, the command line and the sweep runner.

One vocabulary: a :class:`Rule` is a predicate and the allowed values in words (:func:`integer`,
:func:`number`, :func:`optional`, :func:`choice`, :data:`FLAG`); :func:`check_fields` checks values
against their rules, and optimizer options (:class:`gnlib.optim.options.Schema`), training settings
(:class:`gnlib.experiment.train.TrainSettings`) and the checks below are declared with them. Every
refusal is :func:`gnlib.runtime.invalid`'s one message, before any long work starts;
:func:`check_writable` checks that an output folder can be written and has room.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gnlib.runtime import invalid, is_finite_number, is_integer


@dataclass(frozen=True)
class Rule:
    """One option's rule: ``test(value)`` is True for allowed values, ``allowed`` says which they are."""

    test: Callable[[Any], bool]
    allowed: str


def integer(low: int, high: int | None = None) -> Rule:
    """An int (not a bool) in ``[low, high]`` (``high`` None: no upper bound)."""
    if high is None:
        return Rule(lambda v: is_integer(v) and v >= low, f"an integer >= {low}")
    return Rule(lambda v: is_integer(v) and low <= v <= high, f"an integer in [{low}, {high}]")


def number(low: float = 0.0, *, strict: bool = False, below: float | None = None) -> Rule:
    """A finite int or float (not a bool) ``>= low`` (``> low`` if ``strict``) and ``< below`` if given."""
    if below is not None:
        left = "(" if strict else "["
        return Rule(
            lambda v: is_finite_number(v) and (v > low if strict else v >= low) and v < below,
            f"a number in {left}{low:g}, {below:g})",
        )
    bound = f"> {low:g}" if strict else f">= {low:g}"
    return Rule(lambda v: is_finite_number(v) and (v > low if strict else v >= low), f"a finite number {bound}")


def optional(rule: Rule) -> Rule:
    """``None`` or a value ``rule`` allows."""
    return Rule(lambda v: v is None or rule.test(v), f"None or {rule.allowed}")


def choice(values: Sequence[Any]) -> Rule:
    """One of ``values``."""
    values = tuple(values)
    return Rule(lambda v: isinstance(v, type(values[0])) and v in values, f"one of {list(values)}")


FLAG = Rule(lambda v: isinstance(v, bool), "True or False")
MAPPING = Rule(lambda v: isinstance(v, dict), "a mapping, e.g. {inner_steps: 4}")


def check_fields(owner: str, values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise :func:`~gnlib.runtime.invalid` for the first of ``values`` (name -> value) its rule refuses.

    ``owner`` names what the values belong to in the message (e.g. ``"train"``); every name of ``rules``
    must be in ``values``.
    """
    for name, rule in rules.items():
        if not rule.test(values[name]):
            raise invalid(owner, name, values[name], rule.allowed)


def check_positive_int(parameter: str, value: Any, *, owner: str = "", minimum: int = 1) -> None:
    """Raise :func:`~gnlib.runtime.invalid` unless ``value`` is an int (not a bool) ``>= minimum``.

    Args:
        parameter: the name the user wrote (e.g. ``"warmup_steps"``).
        value: what the user gave.
        owner: what the parameter belongs to, e.g. ``"optimizer 'gn'"`` or ``"config run.yaml"``.
        minimum: the smallest allowed value.
    """
    check_fields(owner, {parameter: value}, {parameter: integer(minimum)})


def check_positive_number(
    parameter: str, value: Any, *, owner: str = "", allow_zero: bool = False, example: str = "0.003"
) -> None:
    """Raise :func:`~gnlib.runtime.invalid` unless ``value`` is a finite number ``> 0`` (``>= 0`` with ``allow_zero``).

    An int or a float, not a bool; ``example`` shows an allowed value in the message.
    """
    rule = number(0.0, strict=not allow_zero)
    check_fields(owner, {parameter: value}, {parameter: Rule(rule.test, f"{rule.allowed}, e.g. {example}")})


def check_writable(path: str | Path, *, parameter: str = "output_dir", need_bytes: int = 0) -> Path:
    """Check that ``path`` can be created (if missing) and written, with ``need_bytes`` free.

    The check leaves nothing behind: a missing folder is not created; its nearest existing ancestor
    must accept a new entry instead, so a run refused later for another reason leaves no empty folder.

    Args:
        path: the output folder.
        parameter: its name for the message.
        need_bytes: room the run will need (checkpoints, History); 0 checks writability only.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: the folder cannot be created or written, or has less than ``need_bytes`` free.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(
            f"{parameter}={str(path)!r} cannot be written ({type(err).__name__}: {err.strerror or err}); "
            f"fix its permissions or choose another {parameter}"
        ) from err
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ValueError(
            f"{parameter}={str(path)!r} has {free / 2**20:.0f} MiB free; this run needs about "
            f"{need_bytes / 2**20:.0f} MiB (checkpoints and History): free some space or choose another {parameter}"
        )
    return path

"""Checks of user input shared by the library, notebooks, the command line and the sweep runner.

Each raises ``ValueError`` naming the parameter (and what it belongs to), the allowed values and the
likely fix, before any long work starts: :func:`check_positive_int` and :func:`check_positive_number`
(sizes, step counts, learning rates), :func:`check_writable` (an output folder can be written and has
room). Notebook parameters are checked by :mod:`gnlib.notebook.parameters`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from gnlib.runtime import invalid, is_finite_number, is_integer


def check_positive_int(parameter: str, value: Any, *, owner: str = "", minimum: int = 1) -> None:
    """Raise :func:`~gnlib.runtime.invalid` unless ``value`` is an int (not a bool) ``>= minimum``.

    Args:
        parameter: the name the user wrote (e.g. ``"warmup_steps"``).
        value: what the user gave.
        owner: what the parameter belongs to, e.g. ``"optimizer 'gn'"`` or ``"config run.yaml"``.
        minimum: the smallest allowed value.
    """
    if not is_integer(value) or value < minimum:
        raise invalid(owner, parameter, value, f"an integer >= {minimum}")


def check_positive_number(
    parameter: str, value: Any, *, owner: str = "", allow_zero: bool = False, example: str = "0.003"
) -> None:
    """Raise :func:`~gnlib.runtime.invalid` unless ``value`` is a finite number ``> 0`` (``>= 0`` with ``allow_zero``).

    An int or a float, not a bool; ``example`` shows an allowed value in the message.
    """
    if not is_finite_number(value) or value < 0 or (value == 0 and not allow_zero):
        raise invalid(owner, parameter, value, f"a finite number {'>= 0' if allow_zero else '> 0'}, e.g. {example}")


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

"""Small runtime helpers shared by every module: devices, seeds, atomic file writes, validation."""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml


def invalid(owner: str, parameter: str, value: Any, allowed: str) -> ValueError:
    """The one error for bad input: ``<owner>: <parameter>=<value> is invalid; allowed: <allowed>``.

    ``owner`` (what the parameter belongs to, e.g. ``"optimizer 'gn'"``) is left out when empty. A bool
    given for a number and a number given as text get a hint (:func:`numeric_text_hint`).
    """
    prefix = f"{owner}: " if owner else ""
    hint = " (a bool is not a number)" if isinstance(value, bool) else numeric_text_hint(value)
    return ValueError(f"{prefix}{parameter}={value!r} is invalid; allowed: {allowed}{hint}")


def check_choice(parameter: str, value: Any, allowed: Iterable[Any], *, owner: str = "") -> None:
    """Raise :func:`invalid` naming ``parameter`` and the allowed values unless ``value`` is one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise invalid(owner, parameter, value, f"one of {allowed}")


def is_finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """True for an int that is not a bool (``True`` is never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def numeric_text_hint(value: Any) -> str:
    """A hint for a message when a number arrived as text; empty otherwise.

    Numbers are never parsed from strings anywhere in gnlib: YAML 1.1 reads ``3e-3`` as a string, so the
    hint says how to write it (a dot and a signed exponent: ``3.0e-03``).
    """
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return ""
        return f" (a string: in YAML write floats with a dot and a signed exponent, e.g. {parsed:.1e})"
    return ""


class ConfigLoader(yaml.SafeLoader):
    """YAML loader for configs and sweep grids: ``1e-3`` is a float (YAML 1.1 alone reads it as a string).

    Dates stay strings, as papermill reads them. Values are never parsed from strings after loading
    (:func:`numeric_text_hint`): a quoted ``'1e-3'`` stays text and is refused where a number belongs.
    """


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``None`` (cpu) into a usable device.

    Raises:
        ValueError: unknown device type, or a device that is not available on this machine.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise invalid("", "device", device, "'cpu', 'cuda', 'cuda:N' or 'mps'") from err
    check_choice("device", dev.type, ["cpu", "cuda", "mps"])
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this machine; use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was requested but MPS is not available on this machine; use device='cpu'")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNGs and return a fresh CPU generator seeded with ``seed``."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, then renamed over ``path``.
    The file gets the permissions of any new file (``0o666`` less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` next to ``path``, opened for writing, with the umask's permissions.

    ``tempfile.mkstemp`` would make it ``0o600`` whatever the umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`, so a kill never leaves a torn checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def output_path(path: str | Path) -> Path:
    """Where a relative output path (a notebook's ``output_dir``, a cache folder) goes, wherever it runs.

    With ``GNLIB_OUTPUT_ROOT`` set, relative paths resolve from that folder (the test suite points it at a
    fresh temporary folder, so tests never read or change a user's ``outputs/``). Otherwise they resolve
    from the repository root when run inside ``notebooks/`` of a checkout (JupyterLab and nbval start
    kernels there, papermill usually in the root), so every way of running a notebook writes to the same
    place. Absolute paths are returned unchanged.
    """
    path = Path(path)
    if path.is_absolute():
        return path
    if os.environ.get("GNLIB_OUTPUT_ROOT"):
        return Path(os.environ["GNLIB_OUTPUT_ROOT"]) / path
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "gnlib").is_dir():
        return cwd.parent / path
    return path


_PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies


def die_with_parent() -> None:
    """Have the kernel kill this process (SIGKILL) when its parent dies; Linux only (elsewhere a no-op).

    For processes that must not outlive their launcher, such as torchrun's ranks or a sweep's workers: a
    ``kill -9`` of the launcher would otherwise leave them running as orphans that hold their run folder's
    lock. Work since a run's last checkpoint is lost, as when the process itself is killed.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

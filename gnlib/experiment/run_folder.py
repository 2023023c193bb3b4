"""A run's folder: its lock, its checkpoint and the weights files a run starts from, read with care.

:func:`run_folder_lock` holds an OS lock (a killed holder releases it); a checkpoint that cannot be read is
moved aside, not trusted; :func:`load_weights` reads a weights file without running anything in it; a
folder that holds a run with other settings is named with the settings that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import filelock
import torch
from torch import Tensor

from gnlib.experiment.history import METADATA, json_default

#: Keys ``train`` adds to the metadata it saves (not part of a run's settings).
RUN_KEYS = ("status", "status_reason", "fingerprint", "world_size")
CHECKPOINT = "checkpoint.pt"

LOCK = ".lock"

#: Metadata that describes how a run is priced, not what it computes: a run resumes whatever it says.
_NOT_FINGERPRINTED = ("pass_costs",)


class RunFolderBusy(RuntimeError):
    """Another process is writing to the run folder (it holds the folder's lock)."""


class CheckpointNotWritten(OSError):
    """History or checkpoint could not be written (e.g. a full disk); the message says what was kept."""


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path | None, *, wait: bool = False) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an OS file lock: a killed holder releases it) while the block runs.

    Args:
        run_dir: the folder (created if needed); None holds nothing.
        wait: wait for the holder to finish instead of refusing at once.

    Raises:
        RunFolderBusy: the folder is locked by another process and ``wait`` is False.
    """
    if run_dir is None:
        yield
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(Path(run_dir) / LOCK, timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except filelock.Timeout as err:
        raise RunFolderBusy(
            f"{run_dir} is in use by another run (it holds {Path(run_dir) / LOCK}); wait for it to finish, "
            "or write this run to another folder"
        ) from err
    try:
        yield
    finally:
        lock.release()


def fingerprint(metadata: dict[str, Any]) -> str:
    """A short hash of a run's settings (its metadata without how it is priced): equal for runs that compute alike."""
    kept = {k: v for k, v in metadata.items() if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what killed atomic writes left (``.<name>.<random>.tmp``); the caller holds the folder's lock."""
    for leftover in run_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def read_checkpoint(path: Path, device: torch.device, *, move_aside: bool) -> dict[str, Any] | None:
    """The checkpoint at ``path`` loaded onto ``device``; None when absent or unreadable.

    An unreadable file (truncated, corrupt, or not a gnlib checkpoint) is renamed
    ``<name>.unreadable-<UTC time>`` when ``move_aside`` (so nothing is lost) and reported.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"fingerprint", "model", "optimizer", "rows", "status"} <= set(state):
            raise ValueError("not a checkpoint written by gnlib.experiment.train")
    except Exception as err:  # torch.load raises many types on a torn or foreign file
        if move_aside:
            aside = path.with_name(f"{path.name}.unreadable-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
            path.rename(aside)
            print(
                f"{path} cannot be read ({type(err).__name__}: {_load_failure(err)}); moved it to {aside.name} and "
                "starting this run afresh"
            )
        return None
    return state


def _load_failure(err: Exception) -> str:
    """Why ``torch.load`` failed, as its first whole sentence.

    Torch's advice to load with ``weights_only=False`` is left out: that runs whatever code the file holds,
    which no one should do for a file that is not what it claims to be.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split("WeightsUnpickler error:")[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no details")
    return re.split(r"(?<=\.)\s", first, maxsplit=1)[0]


def load_weights(path: str | Path, device: str | torch.device, *, parameter: str) -> dict[str, Tensor]:
    """The model weights (a state dict saved by ``torch.save``) in the file ``path``, loaded onto ``device``.

    Loaded with ``weights_only=True``: nothing in the file is run.

    Args:
        path: the file.
        device: where the tensors go.
        parameter: the setting that named the file, for the error message (e.g. ``"init_checkpoint"``).

    Raises:
        ValueError: the file cannot be read, or holds something other than a mapping of names to tensors.
    """
    fix = "give a file saved by torch.save(model.state_dict(), path), e.g. a warm-up's model.pt"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch.load raises many types on a torn or foreign file
        failure = f"{type(err).__name__}: {_load_failure(err)}"
        raise ValueError(f"{parameter}={str(path)!r} cannot be read as model weights ({failure}); {fix}") from None
    stray = _not_a_tensor(state)
    if stray is not None:
        raise ValueError(f"{parameter}={str(path)!r} holds {stray}, where model weights hold tensors only; {fix}")
    return state


def _not_a_tensor(state: Any) -> str | None:
    """What in ``state`` is not a named tensor, in words (None when it is a mapping of names to tensors)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    return next(
        (f"{key!r}: a {type(value).__name__}" for key, value in state.items() if not isinstance(value, Tensor)), None
    )


def saved_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint recorded in ``run_dir/metadata.json``, if any."""
    try:
        return json.loads((run_dir / METADATA).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}


def conflict_message(run_dir: Path, metadata: dict[str, Any]) -> str:
    """Why ``run_dir`` is refused: the settings that differ between the run there and this one, and the ways out."""
    try:
        saved = json.loads((run_dir / METADATA).read_text())
    except (OSError, ValueError):
        saved = {}
    ours = json.loads(json.dumps(metadata, default=json_default))
    saved, ours = ({k: v for k, v in m.items() if k not in (*RUN_KEYS, *_NOT_FINGERPRINTED)} for m in (saved, ours))
    theirs, mine = _flat(saved), _flat(ours)
    differ = [k for k in sorted(theirs.keys() | mine.keys()) if theirs.get(k) != mine.get(k)]
    shown = "; ".join(f"{k.rstrip('.')}: {theirs.get(k, '-')!r} there, {mine.get(k, '-')!r} now" for k in differ[:8])
    more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
    return (
        f"{run_dir} holds a run with other settings ({shown or 'unreadable metadata.json'}{more}). Nothing was "
        "changed. To replace it pass overwrite=True (command line: --overwrite); to keep it, write this run to "
        "another folder (output_dir / --name)"
    )

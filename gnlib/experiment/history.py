"""A run's History: one row per outer step, its status, and its files (``history.jsonl``, ``history.csv``, metadata).

Rows are written as JSON lines (a non-finite value as null, named in the row's ``nonfinite`` field) and as
CSV (``nan``/``inf`` there; an empty cell means not evaluated); :meth:`History.load` restores them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from gnlib.runtime import atomic_write_json, atomic_write_text

HISTORY_JSONL = "history.jsonl"

HISTORY_CSV = "history.csv"

METADATA = "metadata.json"

#: Key of a ``history.jsonl`` row naming the values that were not finite (written as null): ``{"val_loss": "nan"}``.
NONFINITE = "nonfinite"


@dataclass
class History:
    """What a run did, one row per outer step (row 0 is the evaluation before the first step).

    Attributes:
        rows: dicts with at least ``step``, ``tokens`` (training tokens seen so far), ``wall_time``
            (seconds since the run started, summed across resumes), ``train_loss``, ``val_loss`` (None
            where not evaluated; the optimizer's ``eval_parameters``, e.g. its EMA, where it has them),
            ``val_loss_raw`` (the raw iterate's, only with such parameters), ``lr`` and the optimizer's
            diagnostics.
        status: ``"running"``, ``"completed"`` (all steps done), ``"reached_target"``, ``"diverged"``
            (non-finite or exploding loss, or a last validation loss above the start's) or ``"stalled"``
            (the optimizer took no step several times in a row).
        metadata: free-form run description (corpus hash, model config, optimizer settings, seed, ...).
        reason: why a run diverged or stalled, in words (None otherwise).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    metadata: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    def to_frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (one column per key ever recorded)."""
        return pd.DataFrame(self.rows)

    def evaluations(self) -> pd.DataFrame:
        """Rows where the validation loss was measured: ``step``, ``tokens``, ``wall_time``, ``val_loss`` (+ raw).

        ``val_loss_raw`` only when the optimizer evaluates other parameters (an EMA).
        """
        frame = self.to_frame()
        columns = ["step", "tokens", "wall_time", "val_loss", *(["val_loss_raw"] if "val_loss_raw" in frame else [])]
        return frame.loc[frame["val_loss"].notna(), columns].reset_index(drop=True)

    @property
    def final_val_loss(self) -> float | None:
        """The last measured validation loss."""
        values = [r["val_loss"] for r in self.rows if r.get("val_loss") is not None]
        return values[-1] if values else None

    def save(self, run_dir: str | Path) -> None:
        """Write ``history.jsonl``, ``history.csv`` and ``metadata.json`` (with the status) atomically.

        ``history.jsonl`` is strict JSON: a value that is not finite is written null and named, with its
        value, in the row's ``nonfinite`` mapping. In ``history.csv`` such a value reads ``nan``, ``inf`` or
        ``-inf``, and an empty cell is a value not measured at that step.
        """
        run_dir = Path(run_dir)
        atomic_write_text(run_dir / HISTORY_JSONL, "".join(json.dumps(_json_row(r)) + "\n" for r in self.rows))
        atomic_write_text(run_dir / HISTORY_CSV, self._csv())
        atomic_write_json(run_dir / METADATA, {**self.metadata, "status": self.status, "status_reason": self.reason})

    @classmethod
    def load(cls, run_dir: str | Path) -> "History":
        """Read a History written by :meth:`save`."""
        run_dir = Path(run_dir)
        rows = [_row_from_json(json.loads(line)) for line in (run_dir / HISTORY_JSONL).read_text().splitlines() if line]
        metadata = json.loads((run_dir / METADATA).read_text())
        status = metadata.pop("status", "completed")
        reason = metadata.pop("status_reason", None)
        return cls(rows=rows, status=status, metadata=metadata, reason=reason)

    def _csv(self) -> str:
        """``history.csv``'s text: non-finite values as ``nan``/``inf``, values not measured as empty cells."""
        rows = [{k: str(v) if _non_finite(v) else v for k, v in row.items()} for row in self.rows]
        return pd.DataFrame(rows).to_csv(index=False)


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` for ``history.jsonl``: tensors as numbers, non-finite values null and listed under ``nonfinite``."""
    row = {k: json_default(v) if isinstance(v, Tensor) else v for k, v in row.items()}
    bad = {k: str(v) for k, v in row.items() if _non_finite(v)}
    return {**{k: None if k in bad else v for k, v in row.items()}, **({NONFINITE: bad} if bad else {})}


def _row_from_json(row: dict[str, Any]) -> dict[str, Any]:
    """A row read from ``history.jsonl``, with its non-finite values restored."""
    bad = row.pop(NONFINITE, {})
    return {**row, **{k: float(v) for k, v in bad.items()}}


def json_default(value: Any) -> Any:
    """A tensor or NumPy value as JSON can hold it (``json.dumps(default=...)``)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)

"""A sweep's results table (``results.csv``) and its record in ``sweep.json``, checked whole before use.

:func:`gnlib.tools.sweep.run_sweep` writes the table and records its row count and SHA-256 in ``sweep.json``
(:func:`table_record`); :func:`read_results_table` refuses a table that is cut short, damaged or edited,
naming the file and the fix, for ``gnlib.tools.report``, notebook 02's ``sweep_results`` and the study tables.
A sweep whose grid ``extends`` a published one is read with that one's runs first (:func:`extended_folder`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pandas as pd

TABLE_FILE, MANIFEST_FILE = "results.csv", "sweep.json"


def read_results_table(path: str | Path, *, parameter: str = "results_csv") -> pd.DataFrame:
    """A sweep's ``results.csv``, checked whole before any of it is used.

    The file must be UTF-8 CSV text ending with a newline, with columns ``run_id`` and ``status``, every row
    as long as the header, every status one of ``ok``, ``failed``, ``incomplete``; with a ``sweep.json``
    beside it, the table must match the row count and SHA-256 the sweep recorded when it wrote the table
    (``results``) and hold a row for every run the sweep lists (``runs``).

    Args:
        path: the ``results.csv`` to read.
        parameter: the name the caller gave the file, for messages.

    Returns:
        The table.

    Raises:
        ValueError: naming ``parameter``, the file, what is wrong and how to get a complete table.
    """
    path = Path(path)
    label = f"{parameter}={str(path)!r}"
    if not path.is_file():
        raise ValueError(
            f"{label} does not exist; give the {TABLE_FILE} of a sweep of this notebook "
            f"(`python -m gnlib.tools.sweep GRID` writes <output-root>/<name>/{TABLE_FILE})"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
        problem = _table_problem(text, _manifest_beside(path))
    except UnicodeDecodeError:
        problem = "is not UTF-8 text (a damaged or binary file)"
    except csv.Error as err:
        problem = f"is not CSV text ({err})"
    except ValueError as err:
        problem = str(err)
    if problem:
        raise ValueError(
            f"{label} {problem}; nothing was read from it. Run `python -m gnlib.tools.sweep GRID` again for that "
            f"sweep: finished runs are skipped and {TABLE_FILE} and {MANIFEST_FILE} are written anew"
        )
    return pd.read_csv(io.StringIO(text))


def find_extended(extends: str, search: list[Path]) -> Path | None:
    """The first folder ``base / extends`` over ``search`` holding a sweep's table and record (None: none)."""
    for base in search:
        folder = base / extends
        if (folder / TABLE_FILE).is_file() and (folder / MANIFEST_FILE).is_file():
            return folder
    return None


def extended_folder(path: str | Path, *, parameter: str = "results_csv") -> Path | None:
    """The folder of the sweep that the sweep of ``path`` extends (None when its grid extends none).

    ``extends`` in ``sweep.json`` is a folder relative to the repository the sweep ran in: it is looked for
    under the current directory, then under each folder above ``path``.

    Raises:
        ValueError: naming ``parameter``: the extended sweep's folder is missing.
    """
    path = Path(path)
    extends = (_manifest_beside(path) or {}).get("extends")
    if not extends:
        return None
    folder = find_extended(extends, [Path.cwd(), *path.resolve().parents])
    if folder is None:
        raise ValueError(
            f"{parameter}={str(path)!r} extends the sweep {extends!r} (its {MANIFEST_FILE}), which is in neither "
            f"the current directory nor a folder above it; run from the repository that holds {extends}"
        )
    return folder


def _manifest_beside(path: Path) -> dict | None:
    """The ``sweep.json`` next to a results table (None when there is none)."""
    manifest = path.parent / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        found = _read_json(manifest)
    except (OSError, ValueError) as err:
        raise ValueError(f"has a {MANIFEST_FILE} beside it that cannot be read ({type(err).__name__})") from None
    if not isinstance(found, dict):
        raise ValueError(f"has a {MANIFEST_FILE} beside it that is not a sweep's record")
    return found


def table_record(text: str, rows: int) -> dict:
    """What ``sweep.json`` records of the table it wrote: its row count and the SHA-256 of its text."""
    return {"rows": rows, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _table_problem(text: str, manifest: dict | None) -> str | None:
    """Why ``text`` is not a complete results table of the sweep ``manifest`` describes (None: it is).

    A table needs a ``status`` column, and a ``run_id`` column when ``manifest`` lists the sweep's runs.
    """
    if not text.strip():
        return "is empty"
    if not text.endswith("\n"):
        return "ends in the middle of a line: it was cut short"
    header, *body = list(csv.reader(io.StringIO(text)))
    listed = (manifest or {}).get("runs") or []
    missing = [column for column in ("run_id", "status") if column not in header and (listed or column == "status")]
    if missing:
        return f"lacks the column(s) {missing}: it is not a {TABLE_FILE} written by gnlib.tools.sweep"
    recorded = (manifest or {}).get("results")
    if isinstance(recorded, dict) and recorded != table_record(text, len(body)):
        return (
            f"has {len(body)} row(s) and differs from the table of {recorded.get('rows')} row(s) the sweep "
            f"recorded in {MANIFEST_FILE} when it wrote it: it was cut short or edited"
        )
    short = next((i for i, row in enumerate(body, start=1) if len(row) != len(header)), None)
    if short is not None:
        return f"has a row {short} of {len(body[short - 1])} field(s) under a header of {len(header)}: it was cut short"
    statuses = [row[header.index("status")] for row in body]
    odd = next((s for s in statuses if s not in ("ok", "failed", "incomplete")), None)
    if odd is not None:
        return f"has a row of status {odd!r}; a run's status is ok, failed or incomplete"
    present = {row[header.index("run_id")] for row in body} if listed else set()
    absent = [rid for rid in listed if rid not in present]
    if absent:
        return (
            f"lacks the rows of {len(absent)} of the {len(listed)} runs its {MANIFEST_FILE} lists (first: "
            f"{absent[0]!r}): it was cut short, or the sweep did not finish"
        )
    return None if body else "has a header but no rows"


def _read_json(path: Path) -> object:
    """Parsed content of a UTF-8 JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))

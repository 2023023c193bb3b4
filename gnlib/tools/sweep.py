"""Run one notebook over a parameter grid with papermill: ``python -m gnlib.tools.sweep GRID.yaml``.

Usage::

    python -m gnlib.tools.sweep GRID.yaml [--jobs N] [--output-root outputs] [--dry-run] [--retry-failed]

Grid file (YAML mapping; no other top-level keys are accepted)::

    name: lr_sweep                    # sweep folder: <output-root>/lr_sweep/ (default: the grid file's stem)
    notebook: notebooks/train.ipynb   # relative to the working directory, else to the grid file's folder
    parameters: {steps: 200}          # fixed values given to every run
    grid:                             # param -> non-empty list; runs = cartesian product, the last key varying fastest
      optimizer: [gn, adamw]
      lr: [1e-3, 3e-3]                # exponents without a dot are read as floats, unlike plain YAML 1.1
    seeds: [0, 1]                     # shorthand for a last grid key ``seed``
    timeout: 600                      # seconds per cell (optional)
    replicate:                        # optional: after the grid, repeat each setting's best run (see below)
      key: seed
      values: [1, 2]
      at_best: lr
      minimize: [final_loss]

``grid`` may also be a list of such mappings, all naming the same keys: the runs are the union of their
products, in list order (e.g. one LR grid per optimizer)::

    grid:
      - {optimizer: [gn], lr: [0.01, 0.03]}
      - {optimizer: [adamw], lr: [0.001, 0.003, 0.01]}

``replicate`` tunes on a few seeds and repeats only the winner, instead of the full product: once the grid's
runs are done, the runs are grouped into *settings* (equal values of every grid key but ``key`` and
``at_best``); in each, the value of ``at_best`` whose runs have the best outcomes (``minimize``, read from
``results.json``: the median over the setting's runs at that value, a missing or non-finite outcome counting
as +inf, the later names of ``minimize`` breaking ties) is run again with each of ``values`` as ``key``.
The repeats are named like grid runs (``lr=0.01,seed=1``), are listed in ``sweep.json`` after the grid's,
and a re-run plans them from the grid's results again (a setting with a grid run not yet finished gets none).

Every key in ``parameters`` and ``grid`` must be declared in the notebook's ``parameters`` cell
(``papermill.inspect_notebook``); values must match simple annotations (``int``, ``float``, ``bool``, ``str``),
and every run's values pass the checks the workbook's notebooks make first (:func:`gnlib.checks.check_notebook_values`).
Bad grids raise ``ValueError`` naming the key before any run folder is created (the CLI exits with code 2).

Sweepable notebook convention: the parameters cell declares ``output_dir: str = "..."``; the sweep passes
each run's folder (an absolute path) there, and the notebook writes ``results.json`` into it: a flat JSON
object of outcomes (``{"final_loss": 3.1, "steps_to_target": 120}``), written atomically at the end.
Runs execute with kernel ``python3``, each with the machine's cores shared out as math-library threads
(:func:`threads_per_job`; an ``OMP_NUM_THREADS`` already set wins), and the working directory (``cwd``,
default: the current directory, normally the repository root) as their cwd, so relative paths in notebooks
resolve from there.

Layout of ``<output-root>/<name>/``: ``sweep.json`` (the checked spec and the run ids in grid order),
``results.csv`` (one row per run folder: run_id, status, error, seconds, parameters, outcomes) and one
folder per run, named by :func:`run_id`, holding ``params.json``, ``notebook.ipynb`` (executed),
``log.txt`` (papermill's log and the kernel's stderr), what the notebook wrote, and ``status.json``
(``{"status": "ok" | "failed", "error": ...}``), written atomically last: it is the completion marker.

Re-running a sweep skips runs whose status is ``ok`` and, unless ``retry_failed``, ``failed``; a folder
without ``status.json`` (a run that was killed) is deleted and executed again from scratch. Ctrl-C or SIGTERM
stops a sweep gently: each run in progress gets a kernel interrupt, so its training loop finishes the step
and writes a checkpoint, and the run is marked ``stopped.json``; re-running resumes it in its folder (a
second Ctrl-C stops at once). Workers and their kernels die with the sweep, even under ``kill -9`` (Linux),
and each run holds a lock (``.locks/<run id>.lock``) while it executes, so two sweeps over one folder never
run the same run at once. A finished ``ok`` run whose ``params.json`` differs from the grid's (fixed
parameters were edited) stops the sweep with a ``ValueError``: pick a new ``name`` instead; a failed run
made with other values is executed again. Folders of runs that a later grid no longer lists stay, and stay
in ``results.csv``. The CLI exits 0 when every run is ``ok``, 1 otherwise, 2 on bad input, 130 on Ctrl-C
and 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import pandas as pd
import papermill
import yaml
from papermill.exceptions import PapermillExecutionError
from tqdm.auto import tqdm

from gnlib.checks import check_writable
from gnlib.experiment.sweep_results import MANIFEST_FILE, TABLE_FILE, table_record
from gnlib.notebook.parameters import check_notebook_values
from gnlib.runtime import ConfigLoader, atomic_write_json, atomic_write_text, die_with_parent, is_integer

GRID_KEYS = ("name", "notebook", "parameters", "grid", "seeds", "timeout", "replicate")
REPLICATE_KEYS = ("key", "values", "at_best", "minimize")
KERNEL = "python3"
OUTPUT_PARAMETER = "output_dir"
PARAMS_FILE, STATUS_FILE, LOG_FILE, NOTEBOOK_FILE = "params.json", "status.json", "log.txt", "notebook.ipynb"
STOPPED_FILE = "stopped.json"
RESULTS_FILE = "results.json"
LOCKS_DIR = ".locks"
STOPPED_MESSAGE = "stopped: runs in progress keep their checkpoints and no status.json; run the same command to resume"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_ID = 96
_ANNOTATIONS = {"int": int, "float": (int, float), "bool": bool, "str": str}
_STOPPING = threading.Event()  # set in a worker when the sweep stops it (:func:`_stop_runs`)


def load_grid(path: str | Path, *, cwd: str | Path | None = None) -> dict:
    """Read and check a grid file; see the module docstring for its keys.

    Args:
        path: YAML grid file.
        cwd: folder that ``notebook`` is first resolved against (default: the current directory); the grid
            file's folder is tried next.

    Returns:
        The checked spec: ``name``, ``notebook`` (absolute path), ``parameters``, ``grid`` (``seeds`` folded
        in as the last key ``seed``) and ``timeout`` (seconds or None).

    Raises:
        ValueError: malformed file, naming the offending key.
    """
    path = Path(path)
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=ConfigLoader)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"grid file {str(path)!r} cannot be read: {err}") from err
    if isinstance(spec, Mapping):
        spec = {"name": path.stem, **spec}
    return _check_spec(spec, search=[Path(cwd or os.getcwd()), path.parent])


def expand_grid(spec: Mapping) -> list[dict]:
    """Parameters of every run: the fixed ``parameters`` updated by each point of the cartesian ``grid``.

    The product follows the grid's key order with the last key varying fastest (``seeds`` come last); a
    list of grids gives each one's product in turn. Pure: the notebook is neither opened nor checked.

    Raises:
        ValueError: malformed spec, naming the offending key.
    """
    spec = _check_structure(spec)
    return [
        {**spec["parameters"], **dict(zip(part, point))}
        for part in _grid_parts(spec)
        for point in itertools.product(*part.values())
    ]


def _grid_parts(spec: Mapping) -> list[dict]:
    """A checked spec's ``grid`` as a list of mappings (one for a single grid)."""
    return spec["grid"] if isinstance(spec["grid"], list) else [spec["grid"]]


def run_id(values: Mapping[str, Any]) -> str:
    """Folder name of a run from its grid values (in grid order), e.g. ``"optimizer=gn,lr=0.001,seed=0"``.

    Values print as ``str`` (floats as ``repr``, lists and dicts as JSON). When that text has characters
    outside ``[A-Za-z0-9._=,+-]`` or exceeds 96 characters, they become ``_`` and ``~`` plus 8 hex digits of
    a hash of the values is appended, so ids stay filesystem-safe and distinct. An empty grid gives ``"default"``.
    """
    if not values:
        return "default"
    readable = ",".join(f"{key}={_format(value)}" for key, value in values.items())
    safe = _UNSAFE.sub("_", readable)
    if safe == readable and len(safe) <= _MAX_ID and not safe.startswith("."):
        return safe
    digest = hashlib.sha1(json.dumps(dict(values), sort_keys=True).encode()).hexdigest()[:8]
    return f"{safe[: _MAX_ID - 9]}~{digest}"


def run_sweep(
    grid: str | Path | Mapping,
    jobs: int = 1,
    output_root: str | Path = "outputs",
    *,
    cwd: str | Path | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """Execute every pending run of a sweep with papermill and aggregate the results.

    Args:
        grid: grid file path, or a spec mapping (its ``notebook`` relative to ``cwd``).
        jobs: runs executed at once, each in its own worker process and kernel.
        output_root: parent of the sweep folder; relative paths are relative to ``cwd``.
        cwd: working directory of every run (default: the current directory).
        retry_failed: execute runs recorded as ``failed`` again.
        dry_run: only report what would run; nothing is written.
        verbose: print a header, one line per finished run and the table's path.

    Returns:
        The aggregated table (see :func:`aggregate`), also written to ``results.csv``; with ``dry_run``, the
        plan instead: run_id, state (``new``, ``incomplete``, ``ok``, ``failed``), will_run and the parameters.

    Raises:
        ValueError: malformed grid, unknown or mistyped notebook parameter, bad ``jobs``, or finished runs
            made with other parameters; all raised before any run starts.
    """
    cwd = Path(cwd or os.getcwd()).resolve()
    if isinstance(grid, (str, Path)):
        spec = load_grid(grid, cwd=cwd)
    else:
        spec = _check_spec(grid, search=[cwd])
    if not is_integer(jobs) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: must be a positive integer")
    keys = list(_grid_parts(spec)[0])
    runs = [(run_id({key: params[key] for key in keys}), params) for params in expand_grid(spec)]
    repeated = [rid for rid, count in collections.Counter(rid for rid, _ in runs).items() if count > 1]
    if repeated:
        raise ValueError(
            f"grid: the run {repeated[0]!r} appears twice (values that print alike, or grid entries that "
            "overlap); make them distinct"
        )
    _check_notebook_parameters(spec)
    sweep_dir = cwd / output_root / spec["name"]
    states = {rid: _state(sweep_dir / rid, params) for rid, params in runs}
    if dry_run:
        runs += _replicates(spec, sweep_dir, runs, states)
        states.update({rid: _state(sweep_dir / rid, params) for rid, params in runs if rid not in states})
        if verbose:
            for rid, params in runs:
                print(f"{'run ' if _should_run(states[rid], retry_failed) else 'skip'} {rid} ({states[rid]})")
            if spec["replicate"]:
                print("replicates of settings whose grid runs are not all finished are planned after them")
        return pd.DataFrame(
            [
                {"run_id": rid, "state": states[rid], "will_run": _should_run(states[rid], retry_failed), **params}
                for rid, params in runs
            ]
        )

    check_writable(sweep_dir, parameter="--output-root")
    atomic_write_json(sweep_dir / MANIFEST_FILE, {**spec, "runs": [rid for rid, _ in runs]})
    _execute_runs(spec, sweep_dir, runs, states, cwd, jobs, retry_failed, verbose)
    if spec["replicate"]:
        states.update({rid: _state(sweep_dir / rid, params) for rid, params in runs})
        replicates = _replicates(spec, sweep_dir, runs, states)
        states.update({rid: _state(sweep_dir / rid, params) for rid, params in replicates})
        atomic_write_json(sweep_dir / MANIFEST_FILE, {**spec, "runs": [rid for rid, _ in runs + replicates]})
        _execute_runs(spec, sweep_dir, replicates, states, cwd, jobs, retry_failed, verbose, what="replicate runs")
    table = aggregate(sweep_dir)
    text = table.to_csv(index=False)
    atomic_write_text(sweep_dir / TABLE_FILE, text)
    manifest = _read_json(sweep_dir / MANIFEST_FILE)
    atomic_write_json(sweep_dir / MANIFEST_FILE, {**manifest, "results": table_record(text, len(table))})
    if verbose:
        counts = table["status"].value_counts().to_dict()
        print(f"results: {sweep_dir / TABLE_FILE} ({', '.join(f'{n} {s}' for s, n in counts.items())})", flush=True)
    return table


def _execute_runs(
    spec: dict,
    sweep_dir: Path,
    runs: list[tuple[str, dict]],
    states: dict[str, str],
    cwd: Path,
    jobs: int,
    retry_failed: bool,
    verbose: bool,
    what: str = "runs",
) -> None:
    """Execute the pending ones of ``runs`` (run id, parameters), ``jobs`` at a time."""
    pending = [(rid, params) for rid, params in runs if _should_run(states[rid], retry_failed)]
    if verbose:
        done = sum(states[rid] == "ok" for rid, _ in runs)
        threads = os.environ.get("OMP_NUM_THREADS") or threads_per_job(jobs)
        print(
            f"sweep {spec['name']}: {len(runs)} {what}, {done} already ok, running {len(pending)} "
            f"with {jobs} job(s) of {threads} thread(s) -> {sweep_dir}",
            flush=True,
        )
    tasks = [
        (str(sweep_dir / rid), spec["notebook"], params, str(cwd), spec["timeout"], _status_mtime(sweep_dir / rid))
        for rid, params in pending
    ]
    _execute(tasks, jobs, verbose)


def best_points(
    runs: list[tuple[dict, Mapping | None]], setting_keys: list[str], at_best: str, minimize: list[str]
) -> list[dict]:
    """Per setting, the parameters of a run at the best value of ``at_best`` (pure; see the module docstring).

    Args:
        runs: (parameters, outcomes) of the grid's runs, outcomes None for a run that is not ``ok`` (it does not
            compete); a ``"pending"`` outcome marks a run not finished yet, and its setting is left out.
        setting_keys: the grid keys whose values define a setting.
        at_best: the grid key whose best value is chosen per setting.
        minimize: outcome names compared in order (median over the runs at one value; missing, None or
            non-finite counts as +inf).

    Returns:
        One parameters dict per setting with at least one ``ok`` run, in the order settings first appear.
    """
    settings: dict[str, list[tuple[dict, Mapping | None]]] = {}
    for params, outcomes in runs:
        settings.setdefault(run_id({key: params[key] for key in setting_keys}), []).append((params, outcomes))
    best = []
    for members in settings.values():
        if any(outcomes == "pending" for _, outcomes in members):
            continue
        by_value: dict[str, list[Mapping]] = {}
        first: dict[str, dict] = {}
        for params, outcomes in members:
            if outcomes is not None:
                label = _format(params[at_best])
                by_value.setdefault(label, []).append(outcomes)
                first.setdefault(label, params)
        if by_value:
            winner = min(by_value, key=lambda label: [_median_outcome(by_value[label], name) for name in minimize])
            best.append(first[winner])
    return best


def _median_outcome(outcomes: list[Mapping], name: str) -> float:
    """Median of one outcome over runs; a missing, None, non-numeric or non-finite value counts as +inf."""
    values = []
    for outcome in outcomes:
        value = outcome.get(name)
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        values.append(float(value) if finite else math.inf)
    return statistics.median(values)


def _replicates(spec: dict, sweep_dir: Path, runs: list[tuple[str, dict]], states: dict[str, str]) -> list[tuple]:
    """The replicate runs (run id, parameters) planned from the grid runs' results so far, grid runs excluded."""
    replicate = spec["replicate"]
    if not replicate:
        return []
    keys = list(_grid_parts(spec)[0])
    setting_keys = [key for key in keys if key not in (replicate["key"], replicate["at_best"])]
    outcomes = []
    for rid, params in runs:
        state = states.get(rid)
        if state == "ok":
            outcomes.append((params, _read_json(sweep_dir / rid / RESULTS_FILE)))
        else:
            outcomes.append((params, None if state == "failed" else "pending"))
    grid_ids = {rid for rid, _ in runs}
    planned = []
    for params in best_points(outcomes, setting_keys, replicate["at_best"], replicate["minimize"]):
        for value in replicate["values"]:
            repeat = {**params, replicate["key"]: value}
            rid = run_id({key: repeat[key] for key in keys})
            if rid not in grid_ids:
                planned.append((rid, repeat))
    return planned


def aggregate(sweep_dir: str | Path) -> pd.DataFrame:
    """Table of every run folder (one holding ``params.json``) under ``sweep_dir``, re-read from disk.

    Columns: run_id, status (``ok``, ``failed``, or ``incomplete`` without ``status.json``), error, seconds,
    started and finished (ISO times), the parameters (fixed ones, then grid keys), then the outcomes of
    ``results.json`` (ok runs only; a name already taken gets the prefix ``result_``). Lists and dicts are
    stored as JSON text. Rows follow ``sweep.json``'s grid order, then folders it does not list, by name.
    """
    sweep_dir = Path(sweep_dir)
    manifest = sweep_dir / MANIFEST_FILE
    order = _read_json(manifest)["runs"] if manifest.is_file() else []
    rank = {rid: i for i, rid in enumerate(order)}
    folders = [p for p in sweep_dir.iterdir() if (p / PARAMS_FILE).is_file()] if sweep_dir.is_dir() else []
    folders.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    empty = ["run_id", "status", "error", "seconds", "started", "finished"]
    return pd.DataFrame([_row(p) for p in folders], columns=None if folders else empty)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (0 all ok, 1 some run not ok, 2 bad input, 130 Ctrl-C)."""
    parser = argparse.ArgumentParser(
        prog="python -m gnlib.tools.sweep", description="Run a notebook over a parameter grid."
    )
    parser.add_argument("grid", help="YAML grid file")
    parser.add_argument("--jobs", type=int, default=1, help="runs executed at once (default 1)")
    parser.add_argument("--output-root", default="outputs", help="parent of the sweep folder (default outputs)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run, write nothing")
    parser.add_argument("--retry-failed", action="store_true", help="execute failed runs again")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: stop workers
    try:
        table = run_sweep(args.grid, args.jobs, args.output_root, retry_failed=args.retry_failed, dry_run=args.dry_run)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(STOPPED_MESSAGE, file=sys.stderr)
        return 130
    except SystemExit:
        print(STOPPED_MESSAGE, file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if args.dry_run or (table["status"] == "ok").all() else 1


def _check_spec(spec: Any, search: list[Path]) -> dict:
    """Check the structure and resolve ``notebook`` against the folders in ``search``, first match wins."""
    spec = _check_structure(spec)
    candidates = (
        [Path(spec["notebook"])]
        if Path(spec["notebook"]).is_absolute()
        else [base / spec["notebook"] for base in search]
    )
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise ValueError(f"notebook={spec['notebook']!r}: no such file; looked for {[str(p) for p in candidates]}")
    return {**spec, "notebook": str(found[0].resolve())}


def _check_structure(spec: Any) -> dict:
    """Validate a spec's keys and value types (no file access); fold ``seeds`` into the grid."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"grid spec must be a mapping with keys {list(GRID_KEYS)}, got {type(spec).__name__}")
    unknown = [key for key in spec if key not in GRID_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in grid spec; allowed keys: {list(GRID_KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"name={name!r}: must be a folder name of letters, digits, '.', '_', '-' "
            "(no path separators), not starting with '.'"
        )
    notebook = spec.get("notebook")
    if not isinstance(notebook, str) or not notebook:
        raise ValueError(f"notebook={notebook!r}: the grid spec needs the path of the notebook to run")
    parameters = _check_mapping("parameters", spec.get("parameters") or {})
    for key, value in parameters.items():
        _check_json(f"parameter {key!r}", value)
    raw = {} if spec.get("grid") is None else spec["grid"]
    if isinstance(raw, list) and not raw:
        raise ValueError("grid: an empty list; give a mapping, or a list of mappings with the same keys")
    parts = [
        _check_grid("grid" if isinstance(raw, Mapping) else f"grid[{i}]", part, parameters, spec.get("seeds"))
        for i, part in enumerate(raw if isinstance(raw, list) else [raw])
    ]
    for i, part in enumerate(parts[1:], start=1):
        if set(part) != set(parts[0]):
            raise ValueError(
                f"grid[{i}]: keys {sorted(part)} differ from grid[0]'s {sorted(parts[0])}; every entry names the "
                "same keys (run ids and result columns use them)"
            )
        parts[i] = {key: part[key] for key in parts[0]}
    grid = parts if isinstance(raw, list) else parts[0]
    timeout = spec.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout={timeout!r}: must be a positive number of seconds per cell, or omitted")
    replicate = _check_replicate(spec.get("replicate"), list(parts[0]))
    return {
        "name": name,
        "notebook": notebook,
        "parameters": dict(parameters),
        "grid": grid,
        "timeout": timeout,
        "replicate": replicate,
    }


def _check_replicate(value: Any, grid_keys: list[str]) -> dict | None:
    """``replicate`` checked against the grid's keys (None when absent)."""
    if value is None:
        return None
    value = _check_mapping("replicate", value)
    if set(value) != set(REPLICATE_KEYS):
        raise ValueError(f"replicate: give exactly the keys {list(REPLICATE_KEYS)}, got {sorted(value)}")
    for name in ("key", "at_best"):
        if value[name] not in grid_keys:
            raise ValueError(f"replicate {name}={value[name]!r}: must be one of the grid's keys {grid_keys}")
    if value["key"] == value["at_best"]:
        raise ValueError(f"replicate: key and at_best are both {value['key']!r}; repeat one key at the best of another")
    values = value["values"]
    if not isinstance(values, list) or not values:
        raise ValueError(f"replicate values={values!r}: must be a non-empty list of values for {value['key']!r}")
    for item in values:
        _check_json(f"replicate values of {value['key']!r}", item)
    minimize = value["minimize"]
    if not isinstance(minimize, list) or not minimize or not all(isinstance(name, str) for name in minimize):
        raise ValueError(f"replicate minimize={minimize!r}: must be a non-empty list of results.json outcome names")
    return {name: value[name] for name in REPLICATE_KEYS}


def _check_grid(where: str, part: Any, parameters: Mapping, seeds: Any) -> dict:
    """One grid mapping checked: non-empty lists of plain values, ``seeds`` folded in as the last key ``seed``."""
    grid = dict(_check_mapping(where, part))
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds:
            raise ValueError(f"seeds={seeds!r}: must be a non-empty list of seeds, e.g. seeds: [0, 1]")
        if "seed" in grid or "seed" in parameters:
            raise ValueError("seeds: 'seed' is already set in grid or parameters; give it once")
        grid["seed"] = seeds
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{where} key {key!r}: values must be a non-empty list, got {values!r}")
        for value in values:
            _check_json(f"{where} key {key!r}", value)
        grid[key] = list(values)
    for key in [*parameters, *grid]:
        if key == OUTPUT_PARAMETER:
            raise ValueError(f"{key!r} is set by the sweep (each run's folder); remove it from parameters and grid")
        if key in parameters and key in grid:
            raise ValueError(f"parameter {key!r} is both fixed in parameters and varied in grid; give it once")
    return grid


def _check_mapping(key: str, value: Any) -> Mapping:
    """``value`` must be a mapping from strings."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key}: must be a mapping from parameter names, got {value!r}")
    return value


def _check_json(what: str, value: Any) -> None:
    """Parameter values travel as JSON (params.json) and YAML (papermill): refuse anything else."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: value {value!r} is not plain data (numbers, strings, bools, lists, dicts)") from err


def _check_notebook_parameters(spec: dict) -> None:
    """Every swept key must be a parameter of the notebook, with a value matching a simple annotation.

    Every run's values (over the notebook's defaults) are checked as the notebook itself checks them first
    (:func:`gnlib.checks.check_notebook_values`: optimizers, sizes, preset, corpus, ...), so a run the
    notebook would refuse stops the sweep before the first kernel starts.
    """
    notebook = spec["notebook"]
    try:
        declared = papermill.inspect_notebook(notebook)
    except Exception as err:  # papermill reports unreadable notebooks with assorted exception types
        raise ValueError(f"notebook={notebook!r}: cannot read its parameters cell: {err}") from err
    if OUTPUT_PARAMETER not in declared:
        raise ValueError(
            f"notebook={notebook!r}: its parameters cell declares no {OUTPUT_PARAMETER!r}; a sweepable "
            f"notebook declares `{OUTPUT_PARAMETER}: str` and writes {RESULTS_FILE} there"
        )
    allowed = sorted(set(declared) - {OUTPUT_PARAMETER})
    values = {key: [value] for key, value in spec["parameters"].items()}
    for part in _grid_parts(spec):
        for key, candidates in part.items():
            values[key] = values.get(key, []) + candidates
    if spec["replicate"]:
        values[spec["replicate"]["key"]] += spec["replicate"]["values"]
    for key, candidates in values.items():
        if key not in declared:
            raise ValueError(f"parameter {key!r} is not in the parameters cell of {notebook}; allowed: {allowed}")
        annotation = declared[key]["inferred_type_name"]
        expected = _ANNOTATIONS.get(annotation)
        for value in candidates if expected else []:
            if not isinstance(value, expected) or (isinstance(value, bool) and annotation != "bool"):
                raise ValueError(f"parameter {key!r}: value {value!r} does not match its annotation {annotation}")
    defaults = {key: _literal(entry["default"]) for key, entry in declared.items()}
    for params in expand_grid(spec):
        try:
            check_notebook_values({**defaults, **params})
        except ValueError as err:
            raise ValueError(f"grid run {run_id(params)}: {err}") from None


def _literal(source: str) -> Any:
    """A parameter's default from its source text in the parameters cell (None when it is not a literal)."""
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None


def _format(value: Any) -> str:
    """Text of one grid value inside a run id."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (str, int)) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _state(run_dir: Path, params: dict) -> str:
    """``new``, ``incomplete`` (no status), ``ok``, ``failed`` or ``changed`` (failed, made with other params).

    A run that ended ``ok`` with other parameters is refused: its results would be read as this grid's.
    """
    if not run_dir.exists():
        return "new"
    status_file = run_dir / STATUS_FILE
    if not status_file.is_file():
        return "incomplete"
    status = _read_json(status_file)["status"]
    changed = _changed_params(run_dir, params)
    if changed and status == "ok":
        raise ValueError(
            f"run {run_dir} was made with other values of {changed}; give the sweep a new name or delete that folder"
        )
    return "changed" if changed else status


def _changed_params(run_dir: Path, params: dict) -> list[str]:
    """Names of the parameters whose value in the run folder's ``params.json`` differs from ``params``."""
    try:
        recorded = _read_json(run_dir / PARAMS_FILE)
    except (OSError, ValueError):
        return ["params.json"]
    expected = json.loads(json.dumps(params))
    return sorted(k for k in recorded.keys() | expected.keys() if recorded.get(k) != expected.get(k))


def _should_run(state: str, retry_failed: bool) -> bool:
    """New, killed and stopped runs and failed runs of other parameters always execute, failed ones on request."""
    return state in ("new", "incomplete", "changed") or (retry_failed and state == "failed")


def _execute(tasks: list[tuple], jobs: int, verbose: bool) -> None:
    """Run ``tasks`` in ``jobs`` worker processes, printing ``[k/n] run-id status seconds`` as each ends.

    Workers are forked where possible, so papermill is imported once. On Ctrl-C or SIGTERM (through
    :func:`main`) the runs in progress are stopped as a kernel interrupt stops them (:func:`_stop_runs`): the
    training loop finishes its step and writes a checkpoint, the run keeps no status, and the next sweep
    resumes it in its folder; no further run starts. A second Ctrl-C or SIGTERM terminates the workers at
    once. On Linux the workers also die with this process when it is killed outright (``kill -9``), and
    their kernels follow within a second (a kernel exits when its parent does); each run holds a lock on
    its folder while it executes (:func:`_run_one`).
    """
    if not tasks:
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    bar = tqdm(total=len(tasks), desc="sweep", unit="run", disable=not verbose)
    workers = min(jobs, len(tasks))
    with bar, context.Pool(workers, initializer=_init_worker, initargs=(os.getpid(), threads_per_job(jobs))) as pool:
        statuses = pool.imap_unordered(_run_one, tasks)
        try:
            _report(statuses, bar, len(tasks), verbose)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through main: runs write a checkpoint
            bar.write("stopping: the runs in progress finish their step and write a checkpoint (again: stop now)")
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal.SIGTERM)
            _report(statuses, bar, len(tasks), verbose)  # a second Ctrl-C leaves here: the pool is terminated
            raise
        finally:
            pool.close()
        pool.join()


def _report(statuses: Any, bar: tqdm, total: int, verbose: bool) -> None:
    """Consume the workers' statuses, printing ``[k/n] run-id status seconds`` as each run ends."""
    for status in statuses:
        bar.update()
        if verbose:
            error = f": {status['error'][:200]}" if status["error"] else ""
            bar.write(f"[{bar.n}/{total}] {status['run_id']} {status['status']} {status['seconds']:.1f}s{error}")


def threads_per_job(jobs: int) -> int:
    """Math-library threads for each of ``jobs`` concurrent runs: the usable cores shared out, at least 1.

    Runs that each start a thread per core oversubscribe the machine: with two runs of two threads on two
    cores, OpenMP's waiting threads made one training run about 20 times slower than with one thread each.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def _init_worker(parent: int, threads: int) -> None:
    """Worker setup: die with the sweep process ``parent``, leave Ctrl-C and SIGTERM to it, log to log.txt.

    The worker's kernels use ``threads`` math-library threads unless ``OMP_NUM_THREADS`` (or
    ``MKL_NUM_THREADS``) is already set. Papermill logs only to each run's log.txt.
    """
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    die_with_parent()
    if os.getppid() != parent:  # the sweep died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_runs)
    logger = logging.getLogger("papermill")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _stop_runs(signum: int, frame: Any) -> None:
    """A worker's first SIGTERM (from the sweep): interrupt its kernel, start no further run; the next kills it.

    The kernel gets SIGINT, as JupyterLab's interrupt sends: a ``KeyboardInterrupt`` in the running cell,
    on which the training loop finishes its step and writes a checkpoint. The run then ends with
    ``stopped.json`` instead of ``status.json`` (:func:`_execute_run`). A kernel interrupted between
    cells goes on with the next cell.
    """
    _STOPPING.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for pid in _children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)


def _children() -> list[int]:
    """Ids of this process's child processes (its kernel), read from ``/proc``; none where there is no ``/proc``."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(stat.parent.name))
    return children


def _status_mtime(run_dir: Path) -> int | None:
    """Modification time (ns) of a run's ``status.json``; None when it has none."""
    try:
        return (run_dir / STATUS_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _run_one(task: tuple) -> dict:
    """Execute one run from scratch in its folder, holding its lock; write params.json first, status.json last.

    The lock (``<sweep>/.locks/<run id>.lock``, an OS lock freed when its holder dies) makes a second sweep
    over the same folder wait for a run in progress; if that run ended meanwhile (its ``status.json``
    changed since this sweep planned it), its status is returned and it is not executed again.
    """
    run_dir, notebook, params, cwd, timeout, planned = task
    run_dir = Path(run_dir)
    if _STOPPING.is_set():
        return _stopped(run_dir, 0.0)
    locks = run_dir.parent / LOCKS_DIR
    locks.mkdir(exist_ok=True)
    with filelock.FileLock(locks / f"{run_dir.name}.lock"):
        if _status_mtime(run_dir) != planned:
            return _read_json(run_dir / STATUS_FILE)
        return _execute_run(run_dir, notebook, params, cwd, timeout)


def _execute_run(run_dir: Path, notebook: str, params: dict, cwd: str, timeout: float | None) -> dict:
    """Execute one run in ``run_dir`` (its lock held); returns its status.

    A run stopped by the sweep (:func:`_stop_runs`) writes ``stopped.json`` instead of ``status.json``; its
    folder is kept by the next attempt with the same parameters, so the notebook resumes its training runs
    from their checkpoints and the log goes on. Any other folder (a killed or failed attempt, or one of
    other parameters) is replaced.
    """
    resumed = (run_dir / STOPPED_FILE).is_file() and not (run_dir / STATUS_FILE).exists()
    if run_dir.exists() and not (resumed and not _changed_params(run_dir, params)):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    atomic_write_text(run_dir / PARAMS_FILE, json.dumps(params, indent=2) + "\n")  # spec order: table columns
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    with open(run_dir / LOG_FILE, "a", encoding="utf-8", buffering=1) as log:
        error = _execute_notebook(notebook, run_dir, params, cwd, timeout, log)
    if error and _STOPPING.is_set():
        atomic_write_json(run_dir / STOPPED_FILE, {"stopped": datetime.now(timezone.utc).isoformat(), "error": error})
        return _stopped(run_dir, time.perf_counter() - clock)
    status = {
        "run_id": run_dir.name,
        "status": "failed" if error else "ok",
        "error": error,
        "seconds": round(time.perf_counter() - clock, 3),
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    atomic_write_json(run_dir / STATUS_FILE, status)
    return status


def _stopped(run_dir: Path, seconds: float) -> dict:
    """The status of a run the sweep stopped or never started once stopping (not written: it runs next time)."""
    return {"run_id": run_dir.name, "status": "stopped", "error": None, "seconds": round(seconds, 3)}


def _execute_notebook(notebook: str, run_dir: Path, params: dict, cwd: str, timeout: float | None, log) -> str | None:
    """Papermill execution logging to ``log``, which also takes file descriptors 1 and 2 (the kernel's output).

    Returns:
        None on success, else the error message (``"RuntimeError: ..."``); the traceback goes to the log.
    """
    handler = logging.StreamHandler(log)
    logging.getLogger("papermill").addHandler(handler)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        papermill.execute_notebook(
            notebook,
            str(run_dir / NOTEBOOK_FILE),
            parameters={**params, OUTPUT_PARAMETER: str(run_dir)},
            kernel_name=KERNEL,
            cwd=cwd,
            progress_bar=False,
            log_output=True,
            execution_timeout=timeout,
        )
        return _check_results(run_dir / RESULTS_FILE)
    except Exception as err:  # any failure of the notebook or its kernel fails this run, not the sweep
        traceback.print_exc(file=log)
        if isinstance(err, PapermillExecutionError):
            return f"{err.ename}: {err.evalue}"
        return f"{type(err).__name__}: {next(iter(str(err).strip().splitlines()), '')}"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        logging.getLogger("papermill").removeHandler(handler)


def _check_results(path: Path) -> str | None:
    """A present ``results.json`` must be a JSON object; its absence is allowed (no outcomes)."""
    if not path.is_file():
        return None
    try:
        outcomes = _read_json(path)
    except ValueError as err:
        return f"{RESULTS_FILE} is not valid JSON: {err}"
    return None if isinstance(outcomes, dict) else f"{RESULTS_FILE} must be a JSON object of outcomes"


def _row(run_dir: Path) -> dict:
    """One table row from a run folder."""
    status = _read_json(run_dir / STATUS_FILE) if (run_dir / STATUS_FILE).is_file() else {"status": "incomplete"}
    row = {
        "run_id": run_dir.name,
        "status": status["status"],
        "error": status.get("error"),
        "seconds": status.get("seconds"),
        "started": status.get("started"),
        "finished": status.get("finished"),
    }
    row.update({key: _cell(value) for key, value in _read_json(run_dir / PARAMS_FILE).items()})
    results = run_dir / RESULTS_FILE
    if status["status"] == "ok" and results.is_file():
        for key, value in _read_json(results).items():
            row[f"result_{key}" if key in row else key] = _cell(value)
    return row


def _cell(value: Any) -> Any:
    """Scalars as they are; lists and dicts as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _read_json(path: Path) -> Any:
    """Parsed content of a UTF-8 JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(main())

"""Run one notebook over a parameter grid with papermill: ``python -m gnlib.tools.sweep GRID.yaml``.

Usage::

    python -m gnlib.tools.sweep GRID.yaml [--jobs N] [--output-root outputs] [--dry-run] [--retry-failed]

The grid's runs (:mod:`gnlib.tools.sweep_grid`) execute ``--jobs`` at a time, each in a worker process and
its own kernel (:mod:`gnlib.tools.sweep_worker`); a rerun skips finished runs and resumes stopped ones,
``replicate`` runs are planned from the grid's results, and every run folder is aggregated into
``results.csv``. Ctrl-C or SIGTERM stops the sweep gently.

The grid file, the sweep folder and what a rerun or a stop does: docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from gnlib.checks import check_writable
from gnlib.experiment.sweep_results import MANIFEST_FILE, TABLE_FILE, table_record
from gnlib.runtime import atomic_write_json, atomic_write_text, is_integer
from gnlib.tools.sweep_grid import (
    RESULTS_FILE,
    at_best_keys,
    check_notebook_parameters,
    check_spec,
    format_value,
    grid_keys,
    grid_runs,
    load_grid,
    run_id,
)
from gnlib.tools.sweep_worker import (
    PARAMS_FILE,
    STATUS_FILE,
    changed_params,
    init_worker,
    read_json,
    run_one,
    status_mtime,
)

STOPPED_MESSAGE = "stopped: runs in progress keep their checkpoints and no status.json; run the same command to resume"


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
        spec = check_spec(grid, search=[cwd])
    if not is_integer(jobs) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: must be a positive integer")
    runs = grid_runs(spec)
    check_notebook_parameters(spec)
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
    manifest = read_json(sweep_dir / MANIFEST_FILE)
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
        (str(sweep_dir / rid), spec["notebook"], params, str(cwd), spec["timeout"], status_mtime(sweep_dir / rid))
        for rid, params in pending
    ]
    _execute(tasks, jobs, verbose)


def best_points(
    runs: list[tuple[dict, Mapping | None]], setting_keys: list[str], at_best: str | list[str], minimize: list[str]
) -> list[dict]:
    """Per setting, the parameters of a run at the best value of ``at_best`` (pure).

    The rule is ``replicate``'s: docs/sweeps.md, section "Replicates".

    Args:
        runs: (parameters, outcomes) of the grid's runs, outcomes None for a run that is not ``ok`` (it does not
            compete); a ``"pending"`` outcome marks a run not finished yet, and its setting is left out.
        setting_keys: the grid keys whose values define a setting.
        at_best: the grid key whose best value is chosen per setting, or a list of keys whose best
            combination of values is.
        minimize: outcome names compared in order (median over the runs at one value; missing, None or
            non-finite counts as +inf).

    Returns:
        One parameters dict per setting with at least one ``ok`` run, in the order settings first appear.
    """
    keys = at_best if isinstance(at_best, list) else [at_best]
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
                label = format_value([params[key] for key in keys])
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
    keys = grid_keys(spec)
    setting_keys = [key for key in keys if key not in (replicate["key"], *at_best_keys(replicate))]
    outcomes = []
    for rid, params in runs:
        state = states.get(rid)
        if state == "ok":
            outcomes.append((params, read_json(sweep_dir / rid / RESULTS_FILE)))
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
    order = read_json(manifest)["runs"] if manifest.is_file() else []
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
    # Ctrl-C stops gently even where the sweep was started with SIGINT ignored (a script's background job)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
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
        signal.signal(signal.SIGINT, previous_int)
    return 0 if args.dry_run or (table["status"] == "ok").all() else 1


def _state(run_dir: Path, params: dict) -> str:
    """``new``, ``incomplete`` (no status), ``ok``, ``failed`` or ``changed`` (failed, made with other params).

    A run that ended ``ok`` with other parameters is refused: its results would be read as this grid's.
    """
    if not run_dir.exists():
        return "new"
    status_file = run_dir / STATUS_FILE
    if not status_file.is_file():
        return "incomplete"
    status = read_json(status_file)["status"]
    changed = changed_params(run_dir, params)
    if changed and status == "ok":
        raise ValueError(
            f"run {run_dir} was made with other values of {changed}; give the sweep a new name or delete that folder"
        )
    return "changed" if changed else status


def _should_run(state: str, retry_failed: bool) -> bool:
    """New, killed and stopped runs and failed runs of other parameters always execute, failed ones on request."""
    return state in ("new", "incomplete", "changed") or (retry_failed and state == "failed")


def _execute(tasks: list[tuple], jobs: int, verbose: bool) -> None:
    """Run ``tasks`` in ``jobs`` worker processes, printing ``[k/n] run-id status seconds`` as each ends.

    Workers are forked where possible, so papermill is imported once. On Ctrl-C or SIGTERM (through
    :func:`main`) the runs in progress are stopped as a kernel interrupt stops them
    (:mod:`gnlib.tools.sweep_worker`): the training loop finishes its step and writes a checkpoint, the run
    keeps no status, and the next sweep resumes it in its folder; no further run starts. A second Ctrl-C or
    SIGTERM terminates the workers at once. On Linux the workers also die with this process when it is
    killed outright (``kill -9``), and their kernels follow within a second (a kernel exits when its parent
    does); each run holds a lock on its folder while it executes (:func:`run_one`).
    """
    if not tasks:
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    bar = tqdm(total=len(tasks), desc="sweep", unit="run", disable=not verbose)
    workers = min(jobs, len(tasks))
    with bar, context.Pool(workers, initializer=init_worker, initargs=(os.getpid(), threads_per_job(jobs))) as pool:
        statuses = pool.imap_unordered(run_one, tasks)
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


def _row(run_dir: Path) -> dict:
    """One table row from a run folder."""
    status = read_json(run_dir / STATUS_FILE) if (run_dir / STATUS_FILE).is_file() else {"status": "incomplete"}
    row = {
        "run_id": run_dir.name,
        "status": status["status"],
        "error": status.get("error"),
        "seconds": status.get("seconds"),
        "started": status.get("started"),
        "finished": status.get("finished"),
    }
    row.update({key: _cell(value) for key, value in read_json(run_dir / PARAMS_FILE).items()})
    results = run_dir / RESULTS_FILE
    if status["status"] == "ok" and results.is_file():
        for key, value in read_json(results).items():
            row[f"result_{key}" if key in row else key] = _cell(value)
    return row


def _cell(value: Any) -> Any:
    """Scalars as they are; lists and dicts as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


if __name__ == "__main__":
    sys.exit(main())

"""One run of a sweep in a worker process: its lock, the papermill execution, its status, and stopping.

A worker executes a run from scratch in its folder while holding the run's lock, writes ``params.json``
first and ``status.json`` (the completion marker) last, and sends papermill's log and the kernel's output
to ``log.txt``. Asked to stop by the sweep, it interrupts its kernel, so the run writes a checkpoint, and
marks the run ``stopped.json`` instead; the next sweep resumes it in its folder.

The run folder and what a rerun or a stop does: docs/sweeps.md, section "Rerunning and stopping".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import papermill
from papermill.exceptions import PapermillExecutionError

from gnlib.runtime import atomic_write_json, atomic_write_text, die_with_parent
from gnlib.tools.sweep_grid import OUTPUT_PARAMETER, RESULTS_FILE

KERNEL = "python3"
PARAMS_FILE, STATUS_FILE, LOG_FILE, NOTEBOOK_FILE = "params.json", "status.json", "log.txt", "notebook.ipynb"
STOPPED_FILE = "stopped.json"
LOCKS_DIR = ".locks"
_STOPPING = threading.Event()  # set in a worker when the sweep stops it (:func:`_stop_runs`)


def init_worker(parent: int, threads: int) -> None:
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


def status_mtime(run_dir: Path) -> int | None:
    """Modification time (ns) of a run's ``status.json``; None when it has none."""
    try:
        return (run_dir / STATUS_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return None


def run_one(task: tuple) -> dict:
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
        if status_mtime(run_dir) != planned:
            return read_json(run_dir / STATUS_FILE)
        return _execute_run(run_dir, notebook, params, cwd, timeout)


def _execute_run(run_dir: Path, notebook: str, params: dict, cwd: str, timeout: float | None) -> dict:
    """Execute one run in ``run_dir`` (its lock held); returns its status.

    A run stopped by the sweep (:func:`_stop_runs`) writes ``stopped.json`` instead of ``status.json``; its
    folder is kept by the next attempt with the same parameters, so the notebook resumes its training runs
    from their checkpoints and the log goes on. Any other folder (a killed or failed attempt, or one of
    other parameters) is replaced.
    """
    resumed = (run_dir / STOPPED_FILE).is_file() and not (run_dir / STATUS_FILE).exists()
    if run_dir.exists() and not (resumed and not changed_params(run_dir, params)):
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
        outcomes = read_json(path)
    except ValueError as err:
        return f"{RESULTS_FILE} is not valid JSON: {err}"
    return None if isinstance(outcomes, dict) else f"{RESULTS_FILE} must be a JSON object of outcomes"


def changed_params(run_dir: Path, params: dict) -> list[str]:
    """Names of the parameters whose value in the run folder's ``params.json`` differs from ``params``."""
    try:
        recorded = read_json(run_dir / PARAMS_FILE)
    except (OSError, ValueError):
        return ["params.json"]
    expected = json.loads(json.dumps(params))
    return sorted(k for k in recorded.keys() | expected.keys() if recorded.get(k) != expected.get(k))


def read_json(path: Path) -> Any:
    """Parsed content of a UTF-8 JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))

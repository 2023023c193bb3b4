"""A sweep's grid file: its format, loading, expansion into runs, run ids, and every check before any run.

A grid names a notebook, fixed ``parameters`` and a ``grid`` of values (or a list of grids) whose cartesian
products are the runs, with optional ``seeds``, ``timeout``, ``replicate`` and ``extends`` (a published sweep
of the same notebook and parameters whose runs this one adds settings to). Every swept key must be
declared in the notebook's parameters cell, and every run's values pass the checks the notebook makes
first. A bad grid raises ``ValueError`` naming the key before any run folder is created.

The format and the sweepable-notebook convention: docs/sweeps.md, section "The grid file".
"""

from __future__ import annotations

import ast
import collections
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import papermill
import yaml

from gnlib.experiment.sweep_results import MANIFEST_FILE, TABLE_FILE, find_extended, read_results_table
from gnlib.notebook.parameters import check_notebook_values
from gnlib.runtime import ConfigLoader

GRID_KEYS = ("name", "notebook", "parameters", "grid", "seeds", "timeout", "replicate", "extends")
REPLICATE_KEYS = ("key", "values", "at_best", "minimize")
#: Parameters a sweep that ``extends`` another may set otherwise: a run's budget, which changes nothing a run
#: measures before it ends (a setting that needs more reads "missed" instead of its steps).
BUDGET_PARAMETERS = ("max_steps", "max_tokens")
OUTPUT_PARAMETER = "output_dir"
RESULTS_FILE = "results.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_ID = 96
_ANNOTATIONS = {"int": int, "float": (int, float), "bool": bool, "str": str}


def load_grid(path: str | Path, *, cwd: str | Path | None = None) -> dict:
    """Read and check a grid file; docs/sweeps.md, section "The grid file" describes its keys.

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
    return check_spec(spec, search=[Path(cwd or os.getcwd()), path.parent])


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
        for part in grid_parts(spec)
        for point in itertools.product(*part.values())
    ]


def grid_parts(spec: Mapping) -> list[dict]:
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
    readable = ",".join(f"{key}={format_value(value)}" for key, value in values.items())
    safe = _UNSAFE.sub("_", readable)
    if safe == readable and len(safe) <= _MAX_ID and not safe.startswith("."):
        return safe
    digest = hashlib.sha1(json.dumps(dict(values), sort_keys=True).encode()).hexdigest()[:8]
    return f"{safe[: _MAX_ID - 9]}~{digest}"


def grid_keys(spec: Mapping) -> list[str]:
    """The grid keys of a checked spec, in grid order (they name runs and settings)."""
    return list(grid_parts(spec)[0])


def grid_runs(spec: Mapping) -> list[tuple[str, dict]]:
    """Every run of a checked spec as (run id, parameters), in grid order.

    Raises:
        ValueError: two runs share an id (values that print alike, or grid entries that overlap).
    """
    keys = grid_keys(spec)
    runs = [(run_id({key: params[key] for key in keys}), params) for params in expand_grid(spec)]
    repeated = [rid for rid, count in collections.Counter(rid for rid, _ in runs).items() if count > 1]
    if repeated:
        raise ValueError(
            f"grid: the run {repeated[0]!r} appears twice (values that print alike, or grid entries that "
            "overlap); make them distinct"
        )
    return runs


def check_spec(spec: Any, search: list[Path]) -> dict:
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
    spec = {**spec, "notebook": str(found[0].resolve())}
    if spec["extends"] is not None:
        _check_extends(spec, search)
    return spec


def _check_extends(spec: dict, search: list[Path]) -> None:
    """``extends`` names a sweep folder (``results.csv``, ``sweep.json``) of the same notebook and parameters."""
    label = f"extends={spec['extends']!r}"
    folder = find_extended(spec["extends"], search)
    if folder is None:
        raise ValueError(
            f"{label}: no sweep folder holding {TABLE_FILE} and {MANIFEST_FILE} there; looked in "
            f"{[str(base / spec['extends']) for base in search]}"
        )
    read_results_table(folder / TABLE_FILE, parameter="extends")
    extended = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    if Path(extended.get("notebook", "")).name != Path(spec["notebook"]).name:
        raise ValueError(f"{label} ran notebook {extended.get('notebook')!r}, not {spec['notebook']!r}")
    theirs = extended.get("parameters") or {}
    keys = (set(theirs) | set(spec["parameters"])) - set(BUDGET_PARAMETERS)
    differ = sorted(k for k in keys if theirs.get(k) != spec["parameters"].get(k))
    if differ:
        values = ", ".join(f"{k}={spec['parameters'].get(k)!r} here, {theirs.get(k)!r} there" for k in differ)
        raise ValueError(
            f"{label}: its runs had other parameters ({values}); a sweep extends one of the same setup (only "
            f"{list(BUDGET_PARAMETERS)} may differ)"
        )


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
    extends = spec.get("extends")
    if extends is not None and (not isinstance(extends, str) or not extends or Path(extends).is_absolute()):
        raise ValueError(
            f"extends={extends!r}: give the folder of a published sweep (results.csv and sweep.json) relative "
            "to the working directory or the grid file's folder, e.g. notebooks/results/cpu_study"
        )
    return {
        "name": name,
        "notebook": notebook,
        "parameters": dict(parameters),
        "grid": grid,
        "timeout": timeout,
        "replicate": replicate,
        "extends": extends,
    }


def at_best_keys(replicate: Mapping) -> list[str]:
    """The grid keys whose best values ``replicate`` picks per setting (``at_best``: one key, or a list)."""
    at_best = replicate["at_best"]
    return list(at_best) if isinstance(at_best, list) else [at_best]


def _check_replicate(value: Any, grid_keys: list[str]) -> dict | None:
    """``replicate`` checked against the grid's keys (None when absent)."""
    if value is None:
        return None
    value = _check_mapping("replicate", value)
    if set(value) != set(REPLICATE_KEYS):
        raise ValueError(f"replicate: give exactly the keys {list(REPLICATE_KEYS)}, got {sorted(value)}")
    if value["key"] not in grid_keys:
        raise ValueError(f"replicate key={value['key']!r}: must be one of the grid's keys {grid_keys}")
    at_best = value["at_best"]
    names = at_best if isinstance(at_best, list) else [at_best]
    if not names or not all(isinstance(name, str) and name in grid_keys for name in names):
        raise ValueError(
            f"replicate at_best={at_best!r}: must be one of the grid's keys {grid_keys}, or a non-empty list of them"
        )
    if value["key"] in names:
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


def check_notebook_parameters(spec: dict) -> None:
    """Every swept key must be a parameter of the notebook, with a value matching a simple annotation.

    Every run's values (over the notebook's defaults) are checked as the notebook itself checks them first
    (:func:`gnlib.notebook.parameters.check_notebook_values`: optimizers, sizes, preset, corpus, ...), so a run the
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
    for part in grid_parts(spec):
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


def format_value(value: Any) -> str:
    """Text of one grid value inside a run id."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (str, int)) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))

"""The study: a shared warm-up, equal-token runs per optimizer and batch size, and the critical batch size.

Built on :mod:`gnlib.experiment.runs`. Every optimizer starts from one shared AdamW warm-up
(:func:`warmup_checkpoint`, cached under ``outputs/warmup/<hash of its settings>/model.pt``) and is evaluated
on one fixed validation set. The token batch of one outer step is ``m`` micro-batches: Gauss-Newton takes
``inner_steps = m`` inner batches, the first-order baselines ``accumulation = m``, so every method is compared
at equal tokens per outer step (:func:`study_spec`; GN's line-search batches come on top and are counted in its
cost). :func:`batch_size_study` runs every optimizer × batch × LR × seed, each LR tuned per batch size
(:mod:`gnlib.experiment.lr_choice`); :func:`study_table_from_sweep` reads the same table from a sweep of
notebook 02; :func:`critical_batch_size` reads off where doubling the batch stops nearly halving the steps.
Ratios between methods and gain shares are in :mod:`gnlib.experiment.method_comparison`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from gnlib.checks import check_positive_int, check_positive_number, check_writable
from gnlib.distributed import barrier, is_main
from gnlib.experiment.lr_choice import VARIANT_OF, choose_lr
from gnlib.experiment.method_comparison import tuned_medians
from gnlib.experiment.run_folder import CHECKPOINT, run_folder_lock
from gnlib.experiment.runs import OPTIMIZERS, RunSpec, checkpoint_bytes, run, summarize
from gnlib.experiment.sweep_results import MANIFEST_FILE, TABLE_FILE, extended_folder, read_results_table
from gnlib.optim.gn_options import GN_VARIANTS
from gnlib.runtime import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_choice,
    invalid,
    is_integer,
    output_path,
    resolve_device,
)


def warmup_checkpoint(
    base: RunSpec,
    steps: int,
    *,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int | None = None,
    root: str | Path = "outputs/warmup",
    progress: bool = False,
) -> Path:
    """The shared starting point: a model state dict after ``steps`` AdamW steps, made once and cached.

    The warm-up uses ``base``'s preset, model overrides, corpus, micro-batch shape and device with AdamW
    (``protocol="gnlib"`` whatever ``base``'s) at constant ``lr`` and one micro-batch per step, seeded by
    ``seed`` (not the runs' seeds: every run of a study starts from the same checkpoint). It is stored at
    ``root/<hash of these settings>/model.pt`` (written atomically, with ``settings.json`` and the run's
    History beside it, and the SHA-256 of ``model.pt`` in ``settings.json``) only when the warm-up completed
    with finite losses, and reused only after checking it: settings hash, status, finite weights and that
    SHA-256 (otherwise it is made again, with a notice). Processes making the same
    warm-up at once wait for the first.

    Args:
        base: spec whose model and data settings the warm-up shares.
        steps: AdamW steps of the warm-up (``>= 1``).
        lr: AdamW's learning rate.
        seed: model initialisation and batch-stream seed of the warm-up.
        batch_size: sequences per warm-up step (default: ``base.batch_size``); fixing it lets runs with other
            micro-batch shapes start from one warm-up.
        root: cache folder (relative paths resolve like notebook outputs, :func:`gnlib.runtime.output_path`).
        progress: print the warm-up's evaluations.

    Returns:
        Absolute path of ``model.pt``, for :attr:`RunSpec.init_checkpoint`.

    Raises:
        RuntimeError: the warm-up diverged (nothing is cached).
    """
    check_positive_int("warmup_steps", steps, owner="the shared AdamW warm-up (warmup_checkpoint's steps)")
    check_positive_number("warmup_lr", lr, owner="the shared AdamW warm-up (warmup_checkpoint's lr)")
    spec = dataclasses.replace(
        base,
        optimizer="adamw",
        lr=lr,
        batch_size=base.batch_size if batch_size is None else batch_size,
        steps=steps,
        accumulation=1,
        schedule="constant",
        target_loss=None,
        eval_every=steps,
        seed=seed,
        hyperparameters={},
        init_checkpoint=None,
        data_start=0,  # the warm-up reads the first tokens of a stream; studied runs continue after them
        protocol="gnlib",
    )
    spec.validate()
    settings = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("device", "costs")}
    settings["device"] = resolve_device(spec.device).type
    key = _settings_hash(settings)
    folder = output_path(root) / key
    path = folder / "model.pt"
    if is_main():
        check_writable(folder, parameter="warmup_dir", need_bytes=checkpoint_bytes(spec))
    with run_folder_lock(folder if is_main() else None, wait=True):  # concurrent notebooks wait for one warm-up
        problem = _cached_warmup_problem(folder, key) if path.is_file() else "absent"
        if problem is not None:
            if problem != "absent" and is_main():
                print(f"warm-up cache {folder}: {problem}; making it again", flush=True)
            # under torchrun every process trains the warm-up, rank 0 alone writes it
            history = run(spec, folder / "run", progress=progress, overwrite=True)
            if history.status != "completed":
                raise RuntimeError(
                    f"the shared warm-up ({steps} AdamW steps at warmup_lr={lr}) ended {history.status!r} "
                    f"({history.reason}); nothing was cached. Lower warmup_lr or change warmup_steps"
                )
            if is_main():
                state = torch.load(folder / "run" / CHECKPOINT, map_location="cpu", weights_only=True)
                atomic_torch_save(state["model"], path)
                record = {**settings, "hash": key, "status": history.status, "weights_sha256": _sha256(path)}
                atomic_write_json(folder / "settings.json", record)  # last: the warm-up's completion marker
        barrier()
    return path.resolve()


def _settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_warmup_problem(folder: Path, key: str) -> str | None:
    """Why the warm-up cached in ``folder`` cannot be reused (None: it can).

    It must record its settings with the hash ``key``, a ``completed`` status and the SHA-256 of its weights
    when it completed; its weights must load, be finite and still have that SHA-256 (not another warm-up's,
    nor a tensor changed since).
    """
    try:
        settings = json.loads((folder / "settings.json").read_text())
        weights = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: report it and rebuild
        return f"unreadable ({type(err).__name__})"
    recorded = {k: v for k, v in settings.items() if k not in ("hash", "status", "weights_sha256")}
    if settings.get("hash", _settings_hash(recorded)) != key or _settings_hash(recorded) != key:
        return "its settings.json does not match its folder's hash"
    if settings.get("status", "completed") != "completed":
        return f"its warm-up ended {settings['status']!r}"
    finite = isinstance(weights, dict) and all(torch.is_tensor(t) and torch.isfinite(t).all() for t in weights.values())
    if not finite:
        return "its weights are not finite"
    if settings.get("weights_sha256") != _sha256(folder / "model.pt"):
        return "its model.pt is not the file recorded (SHA-256 in settings.json) when the warm-up completed"
    return None


#: Columns of :func:`batch_size_study`'s table, in order.
STUDY_COLUMNS = (
    "optimizer",
    "micro_batches",
    "tokens_per_step",
    "lr",
    "seed",
    "steps_to_target",
    "tokens_to_target",
    "wall_time_to_target_s",
    "cpu_time_to_target_s",
    "grad_equivalents_to_target",
    "final_val_loss",
    "steps_to_target_raw",
    "tokens_to_target_raw",
    "wall_time_to_target_raw_s",
    "cpu_time_to_target_raw_s",
    "grad_equivalents_to_target_raw",
    "final_val_loss_raw",
    "steps",
    "tokens",
    "grad_equivalents",
    "wall_time_s",
    "cpu_time_s",
    "cost_model",
    "status",
    "status_reason",
)

#: The ``*_to_target*`` columns of :data:`STUDY_COLUMNS`.
_TO_TARGET = tuple(c for c in STUDY_COLUMNS if "_to_target" in c)
#: Columns a study with an early target adds (``summarize(..., early_target=...)``).
EARLY_TARGET_COLUMNS = tuple(c.replace("_to_target", "_to_early_target") for c in _TO_TARGET)


def at_early_target(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` read at its early target: the ``*_to_early_target*`` columns renamed ``*_to_target*``.

    Every function that reads a study table (:func:`critical_batch_size`, ``ratio_table``,
    ``study_to_target``, ``steps_vs_batch``) then reads the early target. ``chosen`` is kept: the LR tuned
    for the lower target, the one a run stops at.

    Raises:
        ValueError: the table has no early-target columns (the study was run without ``early_target``).
    """
    missing = [c for c in EARLY_TARGET_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the study table has no early target (no column(s) {missing}); run it with early_target set")
    early = table.drop(columns=list(_TO_TARGET)).rename(columns=dict(zip(EARLY_TARGET_COLUMNS, _TO_TARGET)))
    return early[[c for c in table.columns if c not in EARLY_TARGET_COLUMNS]]


def study_spec(
    base: RunSpec,
    optimizer: str,
    micro_batches: int,
    lr: float,
    seed: int,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
    max_tokens: int | None = None,
) -> RunSpec:
    """The spec of one study run: ``base`` with the optimizer, equal-token batch, LR and seed filled in.

    Args:
        base: shared settings (preset, corpus, micro-batch shape, steps, target, init_checkpoint, ...).
        optimizer: a name of :data:`OPTIMIZERS` or a key of ``variants``.
        micro_batches: m, micro-batches per outer step: GN variants get ``inner_steps = m``, first-order
            optimizers ``accumulation = m`` (equal tokens per outer step, m·batch_size·seq_len).
        lr: peak LR (GN: inner LR).
        seed: the run's seed (training batch stream).
        variants: label → RunSpec field overrides, e.g. ``{"gn_per_tensor": {"optimizer": "gn",
            "hyperparameters": {"blocks": "per_tensor"}}}``; the label names the run in tables.
        hyperparameters: label → optimizer options (merged over the variant's).
        max_tokens: a budget in batch tokens: the run's steps are at most ``max_tokens / tokens_per_step``
            (at least 1), so small batches get more steps than large ones; None: ``base.steps`` for all.
    """
    variants = dict(variants or {})
    check_choice("optimizer", optimizer, [*OPTIMIZERS, *variants])
    if not is_integer(micro_batches) or micro_batches < 1:
        raise invalid("", "micro_batches", micro_batches, "an integer >= 1")
    fields = dict(variants.get(optimizer, {"optimizer": optimizer}))
    hp = {**fields.pop("hyperparameters", {}), **(hyperparameters or {}).get(optimizer, {})}
    if fields.get("optimizer", optimizer) in GN_VARIANTS:
        if hp.get("inner_steps", micro_batches) != micro_batches:
            raise ValueError(
                f"hyperparameters of {optimizer!r} set inner_steps={hp['inner_steps']!r}, but a study's GN runs take "
                f"one inner step per micro-batch (micro_batches={micro_batches}); set micro_batches instead"
            )
        hp["inner_steps"], accumulation = micro_batches, 1
    else:
        accumulation = micro_batches
    spec = dataclasses.replace(
        base, **fields, lr=float(lr), seed=int(seed), accumulation=accumulation, hyperparameters=hp
    )
    if max_tokens is not None:
        spec.steps = min(base.steps, max(1, max_tokens // spec.tokens_per_step))
    return spec


def batch_size_study(
    optimizers: Sequence[str],
    micro_batches: Sequence[int],
    lrs: Mapping[str, Sequence[float]],
    seeds: Sequence[int],
    target: float,
    base: RunSpec,
    output_dir: str | Path | None = None,
    *,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = False,
    checkpoint_every: int = 0,
    overwrite: bool = False,
    early_target: float | None = None,
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """Steps to ``target`` for every optimizer × token batch × LR × seed, LR tuned per batch size.

    Every spec is built and validated (:func:`study_spec`) before the first run starts.

    Args:
        optimizers: names of :data:`OPTIMIZERS` or labels of ``variants``.
        micro_batches: token batches as micro-batches per outer step (m; tokens = m·batch_size·seq_len).
        lrs: optimizer → its LR grid (one value is allowed; it is then flagged ``on_edge``).
        seeds: seeds repeated at every setting.
        target: validation-loss target (each run stops there or at ``base.steps``).
        base: shared settings; set ``init_checkpoint`` (:func:`warmup_checkpoint`) to start every run from
            the shared warm-up.
        output_dir: each run's History goes to ``output_dir/<optimizer>/m=<m>/lr=<lr>/seed=<seed>`` (re-runs
            resume), the table to ``output_dir/study.csv``.
        variants: see :func:`study_spec`.
        hyperparameters: see :func:`study_spec`.
        progress: print each run's evaluations.
        checkpoint_every: each run's checkpoint period in steps (0: at its end only), see :func:`run`.
        overwrite: replace runs with other settings found in their folders (else they are refused).
        early_target: a higher validation loss, read off the same runs (:data:`EARLY_TARGET_COLUMNS`).
        max_tokens: see :func:`study_spec`.

    Returns:
        One row per run, columns :data:`STUDY_COLUMNS` (then :data:`EARLY_TARGET_COLUMNS` with
        ``early_target``) plus ``chosen`` and ``on_edge`` (:func:`choose_lr`).
    """
    if early_target is not None and not early_target > target:
        raise invalid("", "early_target", early_target, f"a loss above target={target!r}")
    missing = [name for name in optimizers if name not in lrs]
    if missing:
        raise ValueError(f"lrs has no grid for optimizer(s) {missing}; it has {sorted(lrs)}")
    if not seeds or not micro_batches:
        raise ValueError(f"seeds={list(seeds)!r} and micro_batches={list(micro_batches)!r} must be non-empty")
    plan = [
        (name, m, float(lr), seed, study_spec(base, name, m, lr, seed, variants, hyperparameters, max_tokens))
        for name in optimizers
        for m in micro_batches
        for lr in sorted(lrs[name])
        for seed in seeds
    ]
    for *_, spec in plan:
        spec.validate()
    if output_dir is not None and is_main():
        check_writable(output_dir)
    rows = []
    for name, m, lr, seed, spec in plan:
        run_dir = None if output_dir is None else Path(output_dir) / name / f"m={m}" / f"lr={lr:.6g}" / f"seed={seed}"
        history = run(
            dataclasses.replace(spec, target_loss=target),
            run_dir,
            progress=progress,
            checkpoint_every=checkpoint_every,
            overwrite=overwrite,
        )
        summary = summarize(history, target, early_target)
        rows.append(
            {
                "optimizer": name,
                "micro_batches": m,
                "tokens_per_step": spec.tokens_per_step,
                "lr": lr,
                "seed": seed,
                **summary,
            }
        )
    columns = STUDY_COLUMNS + (EARLY_TARGET_COLUMNS if early_target is not None else ())
    table = choose_lr(pd.DataFrame(rows, columns=list(columns)))
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "study.csv", table.to_csv(index=False))
    return table


#: Notebook parameters a study sweep varies without making a new setting (the table's own columns).
_STUDY_AXES = ("optimizers", "micro_batches", "lr", "seeds", "seed")
#: Columns a sweep's table must hold (as a parameter or an outcome) to be read as a study.
_SWEEP_COLUMNS = ("optimizer", "micro_batches", "lr", "steps_to_target")


def study_table_from_sweep(sweep_results: str | Path, *, parameter: str = "sweep_results") -> pd.DataFrame:
    """The study table from a sweep of the iteration-complexity notebook (``gnlib.tools.sweep``'s ``results.csv``).

    The file is checked whole first (:func:`~gnlib.experiment.sweep_results.read_results_table`: complete,
    and matching the ``sweep.json`` beside it). Keeps the ``ok`` runs, takes each :data:`STUDY_COLUMNS` column from the
    run's outcomes (``result_<name>`` where the sweep renamed it), and marks the tuned LRs again across the
    whole sweep (:func:`choose_lr`). A grid key of the sweep (its ``sweep.json``) other than the optimizer,
    batch, LR and seed, such as ``hyperparameters`` or ``batch_size`` in an ablation, makes each of its
    values a setting of its own: the ``optimizer`` column reads e.g. ``gn (warm_start=False)``
    (:func:`variant_label`). Where a sweep tuned such a key together with the LR (its ``replicate.at_best``
    names it, as K-FAC's damping), column :data:`~gnlib.experiment.lr_choice.VARIANT_OF` names each run's
    setting without that key (``kfac``, its default-options runs included, from every sweep read), and
    :func:`choose_lr` weighs those variants against each other. A sweep whose grid ``extends``
    a published one (docs/sweeps.md) is read with that sweep's runs first, as one study.

    Args:
        sweep_results: the sweep's ``results.csv``.
        parameter: the name the caller gave the file, for messages.

    Raises:
        ValueError: naming ``parameter`` and the file: a file cut short, damaged or not a sweep's table, a
            table without the study's columns, or one without an ``ok`` run.
    """
    sweep_results = Path(sweep_results)
    label = f"{parameter}={str(sweep_results)!r}"
    sweeps = [(sweep_results, read_results_table(sweep_results, parameter=parameter))]
    extended = extended_folder(sweep_results, parameter=parameter)
    if extended is not None:
        table_file = extended / TABLE_FILE
        sweeps.insert(0, (table_file, read_results_table(table_file, parameter=f"{parameter} (extends)")))
    for path, raw in sweeps:
        absent = [c for c in _SWEEP_COLUMNS if c not in raw.columns and f"result_{c}" not in raw.columns]
        if absent:
            raise ValueError(
                f"{parameter}={str(path)!r} lacks the column(s) {absent}: it is not the table of a sweep of notebook "
                "02 (02_iteration_complexity.ipynb); give the results.csv of such a sweep"
            )
    if not (sweeps[-1][1]["status"] == "ok").any():
        raise ValueError(
            f"{label} has no run with status ok; read each run's error in its column 'error' and log.txt, "
            "fix it and run the sweep again with --retry-failed"
        )
    early = any(f"result_{c}" in raw.columns or c in raw.columns for _, raw in sweeps for c in EARLY_TARGET_COLUMNS)
    wanted = STUDY_COLUMNS + (EARLY_TARGET_COLUMNS if early else ())
    axes = list(dict.fromkeys(k for path, _ in sweeps for k in _sweep_grid_keys(path.parent) if k not in _STUDY_AXES))
    rows = [_study_rows(raw.loc[raw["status"] == "ok"], wanted, axes) for _, raw in sweeps]
    tuned_keys = set(axes) & set().union(*(_tuned_with_lr(path.parent) for path, _ in sweeps))
    table = pd.concat(rows, ignore_index=True)
    table["steps_to_target"] = table["steps_to_target"].astype(float)
    if axes:
        names, records = table["optimizer"], table[axes].to_dict(orient="records")
        table["optimizer"] = [
            variant_label(name, {k: v for k, v in values.items() if not _missing(v)})
            for name, values in zip(names, records)
        ]
        if tuned_keys:  # options tuned with the LR: an optimizer's variants are one method's candidates
            families = pd.Series(
                [
                    variant_label(name, {k: v for k, v in values.items() if k not in tuned_keys and not _missing(v)})
                    for name, values in zip(names, records)
                ],
                index=table.index,
            )
            tuned = set(families[table["optimizer"] != families])  # settings whose labels carry a tuned key
            table[VARIANT_OF] = families.where(families.isin(tuned))
        table = table.drop(columns=[k for k in axes if k not in wanted])
    return choose_lr(table)


def _study_rows(raw: pd.DataFrame, columns: tuple[str, ...], axes: list[str]) -> pd.DataFrame:
    """The ``columns`` of a sweep's ok runs (``result_<name>`` where the sweep renamed an outcome), and ``axes``."""
    found = {c: raw.get(f"result_{c}", raw.get(c)) for c in columns}
    found.update({k: raw.get(k) for k in axes if k not in columns})
    return pd.DataFrame(found).reset_index(drop=True)


def _missing(value: Any) -> bool:
    """A grid value a run did not have (its sweep had no such key): None or NaN."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def variant_label(optimizer: str, values: Mapping[str, Any]) -> str:
    """``optimizer`` with the values that set its run apart, e.g. ``gn (warm_start=False, batch_size=128)``.

    ``hyperparameters`` (optimizer name → options, as JSON text or a dict) contributes the options of
    ``optimizer`` only; any other key contributes ``key=value``. No values: the name alone.
    """
    parts = []
    for key, value in values.items():
        if key == "hyperparameters":
            options = json.loads(value) if isinstance(value, str) else dict(value or {})
            parts += [f"{k}={v!r}" for k, v in options.get(optimizer, {}).items()]
        else:
            parts.append(f"{key}={value}")
    return f"{optimizer} ({', '.join(parts)})" if parts else optimizer


def _tuned_with_lr(sweep_dir: Path) -> set[str]:
    """Grid keys the sweep in ``sweep_dir`` tuned together with the LR: its ``replicate.at_best`` other than lr."""
    try:
        at_best = json.loads((sweep_dir / MANIFEST_FILE).read_text())["replicate"]["at_best"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return set([at_best] if isinstance(at_best, str) else at_best) - {"lr"}


def _sweep_grid_keys(sweep_dir: Path) -> list[str]:
    """The grid keys of the sweep in ``sweep_dir`` (from its ``sweep.json``; [] without one)."""
    try:
        grid = json.loads((sweep_dir / MANIFEST_FILE).read_text())["grid"]
    except (OSError, ValueError, KeyError):
        return []
    parts = grid if isinstance(grid, list) else [grid]
    return list(dict.fromkeys(key for part in parts for key in part))


def critical_batch_size(table: pd.DataFrame, max_ratio: float = 0.65) -> pd.DataFrame:
    """Per optimizer: the critical batch size, reported only where two batch sizes of the grid bracket it.

    With steps S(m) the median steps to target over seeds at the tuned LR, the per-doubling ratio between
    consecutive batches m₁ < m₂ is r = (S(m₂)/S(m₁))^(1/log₂(m₂/m₁)) (r = 1/2: perfect scaling; r = 1: no
    gain). "Nearly halves" means r ≤ ``max_ratio`` (default 0.65); a batch where the target is missed
    counts as a step that does not (it needed more steps than the budget). Walking up from the smallest
    batch, scaling holds through batch m_k and fails on the way to m_{k+1}:

    - k ≥ 1 (it held at least once, then failed): the critical batch lies between m_k and m_{k+1};
      ``critical_micro_batches``/``critical_tokens`` are m_k's, ``next_tokens`` m_{k+1}'s;
    - it never failed: **beyond the grid** (at least the largest batch tried, ``beyond_grid``);
    - it failed at the first step: **below the grid** (at most the smallest batch, ``below_grid``);

    and no number is given in the last two cases, nor with one batch size or a target missed at the
    smallest batch: a critical batch size is never read off a single batch size.

    Args:
        table: rows with ``optimizer``, ``micro_batches``, ``tokens_per_step``, ``steps_to_target`` (and
            ``chosen``: then only the tuned-LR runs count).
        max_ratio: the per-doubling ratio still counted as near-perfect scaling, in (0.5, 1).

    Returns:
        One row per optimizer: ``critical`` (the finding in words, e.g. "between 4,096 and 16,384 tokens",
        "beyond the grid (at least 65,536 tokens)"), ``critical_micro_batches``, ``critical_tokens``,
        ``next_tokens`` (None unless bracketed), ``beyond_grid``, ``below_grid``, ``ratios`` (the
        per-doubling ratios, as text), and the model fit of :func:`fit_critical_batch` to the batches
        reached: ``fit`` ("about 2,100 tokens" when B_crit lies inside the grid, else beyond or below it),
        ``fit_steps_min`` and ``fit_critical_tokens``.
    """
    if not 0.5 < max_ratio < 1:
        raise invalid("", "max_ratio", max_ratio, "a number in (0.5, 1)")
    steps = tuned_medians(table)
    rows = []
    for name, group in steps.groupby(level="optimizer", sort=False):
        group = group.droplevel("optimizer").sort_index()
        reached = group["steps_to_target"].notna().to_numpy()
        batches, tokens = list(group.index), [int(t) for t in group["tokens_per_step"]]
        row = {
            "optimizer": name,
            "critical": "",
            "critical_micro_batches": None,
            "critical_tokens": None,
            "next_tokens": None,
            "beyond_grid": False,
            "below_grid": False,
            "ratios": "",
            **_fit_columns([t for t, hit in zip(tokens, reached) if hit], group["steps_to_target"].dropna(), tokens),
        }
        if len(batches) < 2 or not reached[0]:
            row["critical"] = "needs two batch sizes" if len(batches) < 2 else "target missed at the smallest batch"
            rows.append(row)
            continue
        held, ratios = 0, []
        for i in range(1, len(batches)):
            if not reached[i]:
                break
            s1, s2 = group["steps_to_target"].iloc[i - 1], group["steps_to_target"].iloc[i]
            ratios.append((s2 / s1) ** (1 / math.log2(batches[i] / batches[i - 1])))
            if ratios[-1] > max_ratio:
                break
            held = i
        row["ratios"] = ", ".join(f"{r:.2f}" for r in ratios)
        if held == len(batches) - 1:
            row.update(beyond_grid=True, critical=f"beyond the grid (at least {tokens[-1]:,} tokens)")
        elif held == 0:
            row.update(below_grid=True, critical=f"below the grid (at most {tokens[0]:,} tokens)")
        else:
            row.update(
                critical=f"between {tokens[held]:,} and {tokens[held + 1]:,} tokens",
                critical_micro_batches=int(batches[held]),
                critical_tokens=tokens[held],
                next_tokens=tokens[held + 1],
            )
        rows.append(row)
    return pd.DataFrame(rows)


def fit_critical_batch(tokens: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Fit S(B) = S_min (1 + B_crit / B) to steps S at token batches B (McCandlish et al. 2018, eq. 2.11).

    S is linear in 1/B, S = a + c/B with a = S_min and c = S_min·B_crit, fitted by least squares on
    relative errors (each row divided by S_i: steps span orders of magnitude). Below B_crit doubling the
    batch nearly halves the steps; above it, it barely helps.

    Args:
        tokens: token batches B (three or more, distinct, > 0).
        steps: steps to target S at those batches (> 0).

    Returns:
        ``(S_min, B_crit)``; ``(nan, inf)`` when the fit has no floor (a ≤ 0: still scaling perfectly
        across the batches) and ``(nan, 0.0)`` when the steps do not fall with the batch (c ≤ 0).

    Raises:
        ValueError: fewer than three batches, or non-positive values.
    """
    b, s = np.asarray(tokens, dtype=float), np.asarray(steps, dtype=float)
    if len(b) < 3 or len(b) != len(s) or len(set(b)) != len(b) or (b <= 0).any() or (s <= 0).any():
        raise ValueError(f"need three or more distinct batches with positive steps, got tokens={b}, steps={s}")
    design = np.stack([np.ones_like(b), 1 / b], axis=1) / s[:, None]
    (a, c), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    if c <= 0:
        return math.nan, 0.0
    if a <= 0:
        return math.nan, math.inf
    return float(a), float(c / a)


def _fit_columns(tokens: list[int], steps: pd.Series, grid: list[int]) -> dict:
    """``fit`` (in words), ``fit_steps_min`` and ``fit_critical_tokens`` of :func:`fit_critical_batch`."""
    if len(tokens) < 3:
        return {"fit": "needs three batch sizes reached", "fit_steps_min": None, "fit_critical_tokens": None}
    steps_min, critical = fit_critical_batch(tokens, steps.to_numpy())
    if critical > grid[-1]:
        text = f"beyond the grid (above {grid[-1]:,} tokens)"
    elif critical < grid[0]:
        text = f"below the grid (under {grid[0]:,} tokens)"
    else:
        text = f"about {float(f'{critical:.2g}'):,.0f} tokens"
    return {"fit": text, "fit_steps_min": steps_min, "fit_critical_tokens": critical}

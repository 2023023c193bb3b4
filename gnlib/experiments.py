"""Experiments: one run from a declarative spec, steps-to-target, learning-rate sweeps, the batch-size study.

A :class:`RunSpec` names everything a run depends on (preset, corpus, optimizer and its
hyperparameters, token batch, seed, device); :func:`run` validates it before any work starts, builds
the corpus, model and optimizer, trains, and writes the History under ``outputs/``.

The study's protocol (STUDY.md) on top of it:

- every optimizer starts from one shared checkpoint, a short AdamW warm-up (:func:`warmup_checkpoint`,
  cached under ``outputs/warmup/<hash of its settings>/model.pt``) and is evaluated on one fixed
  validation set (the ``val_batches`` first windows of the validation split, whatever the run's seed);
- the token batch of one outer step is ``m`` micro-batches of ``batch_size × seq_len`` tokens: Gauss-Newton
  takes ``inner_steps = m`` inner batches, the first-order baselines ``accumulation = m``, so every method
  is compared at **equal tokens per outer step** (GN's line-search batches come on top, and are counted
  in its cost);
- each optimizer's LR is tuned per batch size on its own grid (:func:`choose_lr`; a best LR at a grid
  edge is flagged), each setting is repeated over seeds (the seed drives the training batch stream; the
  starting point is the shared checkpoint);
- results: steps to a target validation loss, their cost in gradient-step equivalents (a baseline pays 1
  per micro-batch; GN its ``grad_equivalents`` diagnostic, summed up to the target), the critical batch
  size (:func:`critical_batch_size`) and each baseline's steps over GN's (:func:`ratio_table`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from gnlib.checks import check_positive_int, check_positive_number, check_writable
from gnlib.costs import CACHE_DIR, COST_MODELS, cache_key, key_hash, resolve_pass_costs, weights
from gnlib.data import SOURCE_FORMS
from gnlib.directions import cosine
from gnlib.distributed import barrier, is_main
from gnlib.losses import CrossEntropy
from gnlib.models import PRESETS, build_model, model_config
from gnlib.optim import DEFAULTS, make_optimizer
from gnlib.optim.gauss_newton import GN_VARIANTS, GaussNewton, make_gauss_newton
from gnlib.optim.schedules import make_schedule
from gnlib.params import Params, flatten
from gnlib.pipeline import RunData, build_run_data, check_data_fields
from gnlib.protocols import PROTOCOLS
from gnlib.protocols import resolve as resolve_protocol
from gnlib.runtime import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_choice,
    output_path,
    resolve_device,
)
from gnlib.train import CHECKPOINT, METADATA, History, evaluate, run_folder_lock, train

#: GaussNewton's default number of inner steps (its batches per outer step).
_GN_INNER_STEPS: int = inspect.signature(GaussNewton).parameters["inner_steps"].default

#: Every optimizer a run can name: the baselines, then the Gauss-Newton variants.
OPTIMIZERS: tuple[str, ...] = (*DEFAULTS, *GN_VARIANTS)


def build_optimizer(
    name: str, model: torch.nn.Module, batches: Callable[[], Any], lr: float, hyperparameters: dict[str, Any]
) -> Any:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``model``, peak LR ``lr``.

    Baselines are stepped by the train loop on its batches; Gauss-Newton variants draw ``batches``
    themselves (``lr`` is their inner LR).
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if name in GN_VARIANTS:
        return make_gauss_newton(name, model, batches, lr, **hyperparameters)
    return make_optimizer(name, model, lr=lr, **hyperparameters)


def _no_batches() -> Any:
    raise RuntimeError("validation builds the optimizer only; it must not draw batches")


@dataclass
class RunSpec:
    """Everything one training run depends on.

    Attributes:
        optimizer: a name from :data:`OPTIMIZERS`.
        lr: peak learning rate (for Gauss-Newton: the inner optimizer's LR).
        preset: model preset (``gnlib.models.PRESETS``).
        corpus: data source (``"default"``, ``"text:<glob>"``, ``"hf:<name>[:<config>]"``).
        steps: outer steps at most.
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        accumulation: micro-batches per step for first-order optimizers (token batch =
            accumulation·batch_size·seq_len); Gauss-Newton draws ``inner_steps`` micro-batches itself.
        schedule: LR schedule for first-order optimizers (``gnlib.optim.schedules``).
        target_loss: stop at this validation loss (None: run all steps).
        eval_every: evaluate every this many steps.
        val_batches: number of fixed validation batches.
        seed: seeds the model initialisation and the training batch stream.
        device: ``"cpu"``, ``"cuda"``, ...
        hyperparameters: further keyword arguments for the optimizer.
        model_overrides: overrides of the preset's config (e.g. ``{"tie_embeddings": True}``).
        init_checkpoint: a model state-dict file to start from (the shared warm-up checkpoint).
        tokenizer: ``"bytes"``, ``"t5"``, ``"t5:<tokenizer.json>"`` or ``"bpe:<vocab size>"``
            (:mod:`gnlib.tokenizer`); the model's vocabulary follows it.
        data: ``"windows"`` (random windows, with replacement) or ``"stream"`` (documents + EOS packed in
            order, no token reused; :mod:`gnlib.pipeline`).
        data_epochs: passes over the training data a stream may make (1: never reuse a token).
        data_start: training tokens a stream skips first (the warm-up's: :func:`gnlib.pipeline.after_warmup`).
        corpus_bytes: text read from ``corpus`` (None: 4 MB for windows, all of it for a stream; for a
            streamed ``hf:`` dataset, the text a ``bpe:`` tokenizer trains on, default 4 MB).
        protocol: ``"gnlib"`` (the library's defaults) or ``"paper"`` (the reference code's optimizer
            options and evaluation, :mod:`gnlib.protocols`); ``hyperparameters`` and non-default
            ``eval_every``/``val_batches`` override it, recorded in ``metadata["protocol"]``.
        costs: how Gauss-Newton's passes are priced in gradient-step equivalents (:mod:`gnlib.costs`):
            ``"measured"`` (timed on this run's model and micro-batch before training, cached per
            configuration) or ``"flops"`` (the FLOP model); a ``pass_costs`` dict in ``hyperparameters``
            wins over both. Recorded in ``metadata["pass_costs"]``; training numbers do not depend on it.
    """

    optimizer: str = "adamw"
    lr: float = 3e-3
    preset: str = "tiny"
    corpus: str = "default"
    steps: int = 100
    batch_size: int = 16
    seq_len: int = 64
    accumulation: int = 1
    schedule: str = "constant"
    target_loss: float | None = None
    eval_every: int = 10
    val_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    tokenizer: str = "bytes"
    data: str = "windows"
    data_epochs: int = 1
    data_start: int = 0
    corpus_bytes: int | None = None
    protocol: str = "gnlib"
    costs: str = "measured"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field, before any data or model is built."""
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("preset", self.preset, PRESETS)
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_choice("costs", self.costs, COST_MODELS)
        resolve_device(self.device)
        for name in ("steps", "batch_size", "seq_len", "accumulation", "eval_every", "val_batches", "seed"):
            check_positive_int(name, getattr(self, name), minimum=0 if name == "seed" else 1)
        check_positive_number("lr", self.lr, owner=f"optimizer {self.optimizer!r}")
        if not isinstance(self.hyperparameters, dict) or not isinstance(self.model_overrides, dict):
            raise ValueError(
                f"hyperparameters and model_overrides must be mappings (e.g. {{inner_steps: 4}}), got "
                f"{self.hyperparameters!r} and {self.model_overrides!r}"
            )
        config = model_config(self.preset, **self.model_overrides)
        if self.seq_len > config.max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the {self.preset} preset's max_seq_len={config.max_seq_len}"
            )
        make_schedule(self.schedule, self.steps)
        if self.init_checkpoint is not None and not Path(self.init_checkpoint).is_file():
            raise ValueError(f"init_checkpoint={self.init_checkpoint!r} does not exist")
        if not isinstance(self.corpus, str) or not (
            self.corpus == "default" or self.corpus.startswith(("text:", "hf:"))
        ):
            raise ValueError(f"corpus={self.corpus!r} is not supported; allowed forms: {SOURCE_FORMS}")
        check_data_fields(self)
        if self.target_loss is not None:
            check_positive_number("target_loss", self.target_loss, allow_zero=True, example="2.75, or None: no target")
        # the optimizer's own checks, on a narrow model with the same parameter names (same depth and
        # tying, so custom partitions resolve): a bad option fails now, not in the middle of a study
        miniature = build_model(
            "tiny",
            d_model=8,
            n_layers=config.n_layers,
            n_heads=2,
            d_ff=8,
            vocab_size=16,
            max_seq_len=8,
            tie_embeddings=config.tie_embeddings,
            mlp=config.mlp,
            qk_norm=config.qk_norm,
        )
        build_optimizer(self.optimizer, miniature, _no_batches, self.lr, resolve_protocol(self).hyperparameters)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens one outer step consumes."""
        gn = self.optimizer in GN_VARIANTS
        micro = self.hyperparameters.get("inner_steps", _GN_INNER_STEPS) if gn else self.accumulation
        return micro * self.batch_size * self.seq_len


def _build(spec: RunSpec) -> tuple[RunData, torch.nn.Module, Any, list, Any]:
    """Run data, model (from ``init_checkpoint`` if set), training batches, fixed validation set, optimizer."""
    device = resolve_device(spec.device)
    protocol = resolve_protocol(spec)
    data = build_run_data(dataclasses.replace(spec, val_batches=protocol.val_batches), device)
    model = build_model(
        spec.preset, seed=spec.seed, device=device, **{"vocab_size": data.vocab_size, **spec.model_overrides}
    )
    if spec.init_checkpoint is not None:
        model.load_state_dict(torch.load(spec.init_checkpoint, map_location=device, weights_only=True))
    optimizer = build_optimizer(spec.optimizer, model, data.train, spec.lr, protocol.hyperparameters)
    return data, model, data.train, data.val, optimizer


def run(
    spec: RunSpec,
    output_dir: str | Path | None = None,
    *,
    progress: bool = True,
    checkpoint_every: int = 0,
    overwrite: bool = False,
) -> History:
    """Validate ``spec``, check ``output_dir``, build corpus, model and optimizer, and train.

    Args:
        spec: the run's settings.
        output_dir: folder for History, metadata and checkpoint (None: in memory only). It must be
            writable with room for a few checkpoints (checked before the corpus is read); a folder
            holding a run with other settings is refused unless ``overwrite``; a folder another
            process is running into is refused (:class:`gnlib.train.RunFolderBusy`).
        progress: print a line per evaluation.
        checkpoint_every: resumable checkpoint period in steps (0: at the end only).
        overwrite: replace a run with other settings found in ``output_dir``.

    Returns:
        The run's History; its metadata records the spec, the corpus hash and the model size.
    """
    spec.validate()
    check_positive_int("checkpoint_every", checkpoint_every, minimum=0)
    if output_dir is not None and is_main():
        check_writable(output_dir, need_bytes=_checkpoint_bytes(spec))
    data, model, train_batches, val, optimizer = _build(spec)
    protocol = resolve_protocol(spec)
    pass_costs = _pass_costs(spec, model, protocol.hyperparameters, output_dir)
    if pass_costs is not None:
        optimizer.pass_costs = weights(pass_costs)
    metadata = {
        "spec": dataclasses.asdict(spec),
        "corpus": data.meta,
        "model": dataclasses.asdict(model.config),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": spec.tokens_per_step,
        "torch": torch.__version__,
        "protocol": protocol.record,
        "pass_costs": pass_costs,
    }
    return train(
        model,
        optimizer,
        train_batches,
        val,
        steps=spec.steps,
        accumulation=spec.accumulation,
        eval_every=protocol.eval_every,
        eval_schedule=protocol.eval_schedule,
        target_loss=spec.target_loss,
        schedule=make_schedule(spec.schedule, spec.steps),
        run_dir=output_dir,
        checkpoint_every=checkpoint_every,
        metadata=metadata,
        progress=progress,
        overwrite=overwrite,
        label=spec.optimizer,
    )


def _pass_costs(
    spec: RunSpec, model: torch.nn.Module, hyperparameters: Mapping[str, Any], output_dir: str | Path | None
) -> dict[str, Any] | None:
    """How a Gauss-Newton run prices its passes (:mod:`gnlib.costs`): a record for ``metadata["pass_costs"]``.

    None for first-order optimizers (a micro-batch costs one gradient step under any model). A
    ``pass_costs`` dict in the optimizer's options wins (``"model": "given"``); a run resumed in
    ``output_dir`` on the same configuration (:func:`gnlib.costs.cache_key`) keeps the measured costs its
    ``metadata.json`` holds, so all its steps are priced alike; otherwise ``spec.costs`` decides, measured
    costs being cached under :data:`gnlib.costs.CACHE_DIR` when the run writes outputs. The record has
    ``model`` and the three weights; measured ones also the timings, their key and ``source``.
    """
    if spec.optimizer not in GN_VARIANTS:
        return None
    if hyperparameters.get("pass_costs") is not None:
        return {"model": "given", **weights(hyperparameters["pass_costs"])}
    saved = _saved_metadata(output_dir).get("pass_costs")
    if spec.costs == "measured" and isinstance(saved, dict):
        if saved.get("key_hash") == key_hash(cache_key(model, spec.batch_size, spec.seq_len)):
            return saved
    cache_dir = CACHE_DIR if output_dir is not None else None
    return resolve_pass_costs(spec.costs, model, spec.batch_size, spec.seq_len, cache_dir=cache_dir)


def _saved_metadata(output_dir: str | Path | None) -> dict[str, Any]:
    """The metadata of a run in ``output_dir`` ({} when there is none or it is unreadable)."""
    try:
        return json.loads((Path(output_dir) / METADATA).read_text()) if output_dir is not None else {}
    except (OSError, ValueError):
        return {}


def _checkpoint_bytes(spec: RunSpec) -> int:
    """Room a run needs in its folder, in bytes.

    Two checkpoints (old and new during an atomic write), each the model and up to three optimizer tensors
    per parameter in float32, plus 1 MiB for History.
    """
    return 2 * 4 * 4 * model_config(spec.preset, **spec.model_overrides).n_params + 2**20


def steps_to_target(history: History, target: float) -> int | None:
    """First outer step at which the validation loss is ``<= target``; None if never reached."""
    for row in history.rows:
        if row.get("val_loss") is not None and row["val_loss"] <= target:
            return int(row["step"])
    return None


def grad_equivalents(history: History, upto: int | None = None) -> float:
    """Cost of outer steps ``1..upto`` (all when None) in gradient-step equivalents.

    A first-order step costs its number of micro-batches (``accumulation`` of the run's spec; one forward
    and one backward each); a Gauss-Newton step costs its ``grad_equivalents`` diagnostic (inner steps,
    line search). Evaluations are not counted.
    """
    steps = [r for r in history.rows[1:] if upto is None or r["step"] <= upto]
    if any(r.get("grad_equivalents") is not None for r in steps):
        return float(sum(r.get("grad_equivalents") or 0.0 for r in steps))
    accumulation = history.metadata.get("spec", {}).get("accumulation", 1)
    return float(accumulation * len(steps))


def summarize(history: History, target: float | None = None) -> dict[str, Any]:
    """One results-table row: outer steps, tokens, wall time and cost to target, and the same for the whole run.

    ``*_to_target`` are taken at the first evaluation at or below ``target`` (None when not reached):
    ``steps_to_target`` outer steps, ``tokens_to_target`` training tokens drawn (GN's line-search batches
    included), ``wall_time_to_target_s`` seconds of training (evaluations included, pass-cost measurement
    not) and ``grad_equivalents_to_target`` gradient-step equivalents (:func:`grad_equivalents`);
    ``steps``, ``tokens``, ``wall_time_s`` and ``grad_equivalents`` are the whole run's. ``cost_model``
    says how GN's passes were priced (``metadata["pass_costs"]["model"]``: ``"measured"``, ``"flops"`` or
    ``"given"``; None for first-order runs, whose micro-batch costs one gradient step under any model).
    """
    last = history.rows[-1]
    reached = steps_to_target(history, target) if target is not None else None
    at_target = None if reached is None else next(r for r in history.rows if r["step"] == reached)
    pass_costs = history.metadata.get("pass_costs")
    return {
        "steps_to_target": reached,
        "tokens_to_target": None if at_target is None else int(at_target["tokens"]),
        "wall_time_to_target_s": None if at_target is None else float(at_target["wall_time"]),
        "grad_equivalents_to_target": None if reached is None else grad_equivalents(history, reached),
        "final_val_loss": history.final_val_loss,
        "steps": int(last["step"]),
        "tokens": int(last["tokens"]),
        "grad_equivalents": grad_equivalents(history),
        "wall_time_s": float(last["wall_time"]),
        "cost_model": pass_costs.get("model") if isinstance(pass_costs, dict) else None,
        "status": history.status,
        "status_reason": history.reason,
    }


def _best_lr(group: pd.DataFrame) -> tuple[float, bool]:
    """The best LR of one setting's runs (columns lr, steps_to_target, final_val_loss) and whether it is on the edge.

    Best = fewest median steps to target over the runs at that LR (a run that misses the target counts
    as infinitely many); ties, or no LR reaching it, are broken by the median final validation loss. The
    best is *on the edge* when it is the smallest or largest LR of the grid, or the grid has one LR.
    """
    by_lr = (
        group.assign(
            _steps=group["steps_to_target"].astype(float).fillna(np.inf),
            _loss=group["final_val_loss"].astype(float).fillna(np.inf),
        )
        .groupby("lr")[["_steps", "_loss"]]
        .median()
    )
    best = float(by_lr.sort_values(["_steps", "_loss"]).index[0])
    grid = sorted(by_lr.index)
    return best, len(grid) < 2 or best in (grid[0], grid[-1])


def choose_lr(table: pd.DataFrame, by: Sequence[str] = ("optimizer", "micro_batches")) -> pd.DataFrame:
    """Mark each setting's tuned LR: adds columns ``chosen`` (run at the best LR) and ``on_edge``.

    Args:
        table: one row per run with columns ``lr``, ``steps_to_target``, ``final_val_loss`` and ``by``.
        by: columns that define one setting whose LR is tuned (default: per optimizer and batch size).

    Returns:
        A copy of ``table`` with ``chosen`` (bool) and ``on_edge`` (bool, the same for all rows of a
        setting: its best LR is at an end of its grid, so the true optimum may lie outside).
    """
    missing = [c for c in ("lr", "steps_to_target", "final_val_loss", *by) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; it has {list(table.columns)}")
    out = table.copy()
    out["chosen"], out["on_edge"] = False, False
    for _, group in out.groupby(list(by), sort=False):
        best, edge = _best_lr(group)
        out.loc[group.index, "chosen"] = np.isclose(group["lr"].astype(float), best, rtol=1e-12, atol=0)
        out.loc[group.index, "on_edge"] = edge
    return out


def lr_sweep(
    spec: RunSpec,
    lrs: Sequence[float],
    target: float,
    output_dir: str | Path | None = None,
    *,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run ``spec`` at each learning rate in ``lrs`` and pick the best.

    Best = fewest steps to ``target``; ties (or no run reaching it) are broken by the final
    validation loss. A best LR at either end of the grid is flagged (``on_edge=True``) since the true
    optimum may lie outside it.

    Args:
        spec: settings shared by every run; its ``lr`` is replaced.
        lrs: the learning-rate grid (at least two values, e.g. ``np.geomspace(1e-4, 1e-1, 7)``).
        target: validation-loss target.
        output_dir: each run goes to ``output_dir/lr=<value>``; the table to ``output_dir/lr_sweep.csv``.
        progress: print each run's evaluations.

    Returns:
        ``(table, best)``: one row per LR, and the best row as a dict with ``on_edge`` added.
    """
    grid = sorted(float(lr) for lr in lrs)
    if len(grid) < 2:
        raise ValueError(f"lrs must hold at least two learning rates, got {list(lrs)!r}")
    rows = []
    for lr in grid:
        run_spec = dataclasses.replace(spec, lr=lr, target_loss=target)
        run_dir = Path(output_dir) / f"lr={lr:.6g}" if output_dir is not None else None
        rows.append({"lr": lr, **summarize(run(run_spec, run_dir, progress=progress), target)})
    table = pd.DataFrame(rows)
    best_lr, on_edge = _best_lr(table)
    best = {**table.loc[table["lr"] == best_lr].iloc[0].to_dict(), "on_edge": on_edge}
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "lr_sweep.csv", table.to_csv(index=False))
    return table, best


# ------------------------------------------------------------------------------------------ the study


def warmup_checkpoint(
    base: RunSpec,
    steps: int,
    *,
    lr: float = 3e-3,
    seed: int = 0,
    root: str | Path = "outputs/warmup",
    progress: bool = False,
) -> Path:
    """The shared starting point: a model state dict after ``steps`` AdamW steps, made once and cached.

    The warm-up uses ``base``'s preset, model overrides, corpus, micro-batch shape and device with AdamW
    (``protocol="gnlib"`` whatever ``base``'s) at constant ``lr`` and one micro-batch per step, seeded by
    ``seed`` (not the runs' seeds: every run of a study starts from the same checkpoint). It is stored at
    ``root/<hash of these settings>/model.pt`` (written atomically, with ``settings.json`` and the run's
    History beside it) only when the warm-up completed with finite losses, and reused only after checking
    it: settings hash, status and finite weights (otherwise it is made again). Processes making the same
    warm-up at once wait for the first.

    Args:
        base: spec whose model and data settings the warm-up shares.
        steps: AdamW steps of the warm-up (``>= 1``).
        lr: AdamW's learning rate.
        seed: model initialisation and batch-stream seed of the warm-up.
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
        check_writable(folder, parameter="warmup_dir", need_bytes=_checkpoint_bytes(spec))
    with run_folder_lock(folder if is_main() else None, wait=True):  # concurrent notebooks wait for one warm-up
        problem = _cached_warmup_problem(folder, key) if path.is_file() else "absent"
        if problem is not None:
            if problem != "absent" and progress:
                print(f"warm-up cache {folder}: {problem}; making it again")
            # under torchrun every process trains the warm-up, rank 0 alone writes it
            history = run(spec, folder / "run", progress=progress, overwrite=True)
            if history.status != "completed":
                raise RuntimeError(
                    f"the shared warm-up ({steps} AdamW steps at warmup_lr={lr}) ended {history.status!r} "
                    f"({history.reason}); nothing was cached. Lower warmup_lr or change warmup_steps"
                )
            if is_main():
                state = torch.load(folder / "run" / CHECKPOINT, map_location="cpu", weights_only=True)
                atomic_write_json(folder / "settings.json", {**settings, "hash": key, "status": history.status})
                atomic_torch_save(state["model"], path)
        barrier()
    return path.resolve()


def _settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_warmup_problem(folder: Path, key: str) -> str | None:
    """Why the warm-up cached in ``folder`` cannot be reused (None: it can).

    It must record its settings with the hash ``key`` and a ``completed`` status, and its weights must load
    and be finite.
    """
    try:
        settings = json.loads((folder / "settings.json").read_text())
        weights = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: report it and rebuild
        return f"unreadable ({type(err).__name__})"
    recorded = {k: v for k, v in settings.items() if k not in ("hash", "status")}
    if settings.get("hash", _settings_hash(recorded)) != key or _settings_hash(recorded) != key:
        return "its settings.json does not match its folder's hash"
    if settings.get("status", "completed") != "completed":
        return f"its warm-up ended {settings['status']!r}"
    finite = isinstance(weights, dict) and all(torch.is_tensor(t) and torch.isfinite(t).all() for t in weights.values())
    return None if finite else "its weights are not finite"


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
    "grad_equivalents_to_target",
    "final_val_loss",
    "steps",
    "tokens",
    "grad_equivalents",
    "wall_time_s",
    "cost_model",
    "status",
    "status_reason",
)


def study_spec(
    base: RunSpec,
    optimizer: str,
    micro_batches: int,
    lr: float,
    seed: int,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
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
    """
    variants = dict(variants or {})
    check_choice("optimizer", optimizer, [*OPTIMIZERS, *variants])
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    fields = dict(variants.get(optimizer, {"optimizer": optimizer}))
    hp = {**fields.pop("hyperparameters", {}), **(hyperparameters or {}).get(optimizer, {})}
    if fields.get("optimizer", optimizer) in GN_VARIANTS:
        hp["inner_steps"], accumulation = micro_batches, 1
    else:
        accumulation = micro_batches
    return dataclasses.replace(
        base, **fields, lr=float(lr), seed=int(seed), accumulation=accumulation, hyperparameters=hp
    )


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

    Returns:
        One row per run, columns :data:`STUDY_COLUMNS` plus ``chosen`` and ``on_edge`` (:func:`choose_lr`).
    """
    missing = [name for name in optimizers if name not in lrs]
    if missing:
        raise ValueError(f"lrs has no grid for optimizer(s) {missing}; it has {sorted(lrs)}")
    if not seeds or not micro_batches:
        raise ValueError(f"seeds={list(seeds)!r} and micro_batches={list(micro_batches)!r} must be non-empty")
    plan = [
        (name, m, float(lr), seed, study_spec(base, name, m, lr, seed, variants, hyperparameters))
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
        summary = summarize(history, target)
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
    table = choose_lr(pd.DataFrame(rows, columns=list(STUDY_COLUMNS)))
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "study.csv", table.to_csv(index=False))
    return table


def study_table_from_sweep(results_csv: str | Path) -> pd.DataFrame:
    """The study table from a sweep of the iteration-complexity notebook (``gnlib.sweep``'s ``results.csv``).

    Keeps the ``ok`` runs, takes each :data:`STUDY_COLUMNS` column from the run's outcomes (``result_<name>``
    where the sweep renamed it), and marks the tuned LRs again across the whole sweep (:func:`choose_lr`).
    """
    raw = pd.read_csv(results_csv)
    raw = raw.loc[raw["status"] == "ok"]
    columns = {
        c: raw[f"result_{c}"] if f"result_{c}" in raw.columns else raw[c] if c in raw.columns else None
        for c in STUDY_COLUMNS
    }
    table = pd.DataFrame(columns).reset_index(drop=True)
    table["steps_to_target"] = table["steps_to_target"].astype(float)
    return choose_lr(table)


def _chosen_steps(table: pd.DataFrame, value: str = "steps_to_target") -> pd.DataFrame:
    """Median of ``value`` over seeds at each setting's tuned LR: index (optimizer, micro_batches).

    A seed that missed the target counts as infinitely many steps, so a setting counts as reached only
    when most of its seeds reached it (else its median is NaN: missed).
    """
    chosen = table.loc[table["chosen"]] if "chosen" in table.columns else table
    chosen = chosen.assign(**{value: chosen[value].astype(float).fillna(np.inf)})
    medians = chosen.groupby(["optimizer", "micro_batches"])[[value, "tokens_per_step"]].median()
    return medians.replace(np.inf, np.nan)


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
        ``next_tokens`` (None unless bracketed), ``beyond_grid``, ``below_grid`` and ``ratios`` (the
        per-doubling ratios, as text).
    """
    if not 0.5 < max_ratio < 1:
        raise ValueError(f"max_ratio={max_ratio!r} must lie in (0.5, 1)")
    steps = _chosen_steps(table)
    rows = []
    for name, group in steps.groupby(level="optimizer", sort=False):
        group = group.droplevel("optimizer").sort_index()
        reached = group["steps_to_target"].notna().to_numpy()
        batches, tokens = list(group.index), [int(t) for t in group["tokens_per_step"]]
        row = {"optimizer": name, "critical": "", "critical_micro_batches": None, "critical_tokens": None,
               "next_tokens": None, "beyond_grid": False, "below_grid": False, "ratios": ""}
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


def ratio_table(table: pd.DataFrame, reference: str = "gn", value: str = "steps_to_target") -> pd.DataFrame:
    """Each other optimizer's ``value`` over ``reference``'s at every batch size (median over seeds, tuned LR).

    Returns:
        Index ``micro_batches``, one column per non-reference optimizer: ratio > 1 means the reference
        needs fewer (steps, or gradient-step equivalents with ``value="grad_equivalents_to_target"``).
        NaN where either missed the target.
    """
    check_choice("reference", reference, list(dict.fromkeys(table["optimizer"])))
    wide = _chosen_steps(table, value)[value].astype(float).unstack("optimizer")
    others = [c for c in dict.fromkeys(table["optimizer"]) if c != reference]
    return wide[others].div(wide[reference], axis=0)


def gain_share(steps_baseline: float, steps_variant: float, steps_full: float) -> float:
    """Share of full GN's gain over a baseline that a variant keeps: (S_base − S_variant) / (S_base − S_full).

    1: the variant (e.g. layerwise GN) is as fast as full GN; 0: no faster than the baseline (e.g. AdamW);
    NaN when full GN gains nothing.
    """
    gain = steps_baseline - steps_full
    return float("nan") if gain <= 0 else (steps_baseline - steps_variant) / gain


def _replay(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A batch source that returns ``batches`` in order, again and again."""
    cycle = itertools.cycle(batches)
    return lambda: next(cycle)


def gn_directions(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    partitions: Mapping[str, Any],
    lr: float,
    **options: Any,
) -> dict[str, Params]:
    """The inner-solve direction d = θ̂ − θ of one cold-started GN outer step from the model's current θ, per partition.

    Every partition sees the same ``len(batches)`` inner batches, in order, from the same anchor; the
    model is left unchanged. The direction is the pre-line-search step (the GaussNewton step is taken
    with ``line_search=None``, i.e. α = 1, on a copy of the model).

    Args:
        model: the model at the anchor θ.
        batches: the inner batches (N = ``len(batches)`` inner steps).
        partitions: label → ``blocks`` option of :class:`~gnlib.optim.gauss_newton.GaussNewton` (None: full GN).
        lr: inner LR.
        **options: further GaussNewton options shared by every partition.

    Returns:
        label → direction (a params dict in model order).
    """
    directions = {}
    for label, blocks in partitions.items():
        copy = deepcopy(model)
        before = {n: p.detach().clone() for n, p in copy.named_parameters()}
        optimizer = GaussNewton(
            copy,
            _replay(list(batches)),
            blocks=blocks,
            inner_lr=lr,
            inner_steps=len(batches),
            line_search=None,
            line_search_batches=1,
            warm_start=False,
            **options,
        )
        optimizer.step()
        directions[label] = {n: p.detach() - before[n] for n, p in copy.named_parameters()}
    return directions


def direction_cosines(
    spec: RunSpec, partitions: Mapping[str, Any], at_steps: Sequence[int], *, probe_seed: int = 1234
) -> pd.DataFrame:
    """Cosine between each partition's GN direction and full GN's, at checkpoints of a full-GN run.

    Trains ``spec`` (a full-GN spec: optimizer ``"gn"``, ``inner_steps`` N) for ``max(at_steps)`` outer
    steps; at each step in ``at_steps`` (0 = the start), draws N probe batches (seeded by ``probe_seed`` and
    the step) and computes every direction with :func:`gn_directions` from that anchor on those batches.

    Returns:
        One row per checkpoint × partition: ``step``, ``partition``, ``cosine`` (with full GN's direction),
        ``norm_ratio`` (‖d_partition‖ / ‖d_full‖), ``val_loss`` at the anchor.
    """
    spec.validate()
    check_choice("optimizer", spec.optimizer, ["gn"])
    if not at_steps or min(at_steps) < 0:
        raise ValueError(f"at_steps must be non-negative steps, got {list(at_steps)!r}")
    data, model, _, val, optimizer = _build(spec)
    if data.corpus is None:
        raise ValueError(f"corpus={spec.corpus!r} is streamed; direction probes need an in-memory corpus")
    corpus = data.corpus
    inner = spec.hyperparameters.get("inner_steps", _GN_INNER_STEPS)
    fixed = ("inner_steps", "blocks", "line_search", "line_search_batches", "warm_start")
    options = {k: v for k, v in spec.hyperparameters.items() if k not in fixed}
    labels = {"full": None, **partitions}
    rows, step = [], 0
    for target_step in sorted(set(at_steps)):
        while step < target_step:
            optimizer.step()
            step += 1
        probe = corpus.sampler(
            "train", spec.batch_size, spec.seq_len, seed=probe_seed + step, device=resolve_device(spec.device)
        )
        directions = gn_directions(model, [probe() for _ in range(inner)], labels, spec.lr, **options)
        full = directions["full"]
        full_norm = float(flatten(full).norm())
        val_loss = evaluate(model, val, CrossEntropy().value)
        for label in partitions:
            d = directions[label]
            norm = float(flatten(d).norm())
            rows.append(
                {
                    "step": step,
                    "partition": label,
                    "cosine": cosine(d, full),
                    "norm_ratio": norm / full_norm if full_norm else float("nan"),
                    "val_loss": val_loss,
                }
            )
    return pd.DataFrame(rows)

"""Experiments: one run from a declarative spec, steps-to-target, learning-rate sweeps, results tables.

A :class:`RunSpec` names everything a run depends on (preset, corpus, optimizer and its
hyperparameters, token batch, seed, device); :func:`run` validates it before any work starts, builds
the corpus, model and optimizer, trains, and writes the History under ``outputs/``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from gnlib.data import load_corpus
from gnlib.models import PRESETS, build_model, model_config
from gnlib.optim import DEFAULTS, make_optimizer
from gnlib.optim.schedules import make_schedule
from gnlib.runtime import atomic_write_text, check_choice, resolve_device
from gnlib.train import History, train


OPTIMIZERS: tuple[str, ...] = tuple(DEFAULTS)


def build_optimizer(name: str, model: torch.nn.Module, batches: Callable[[], Any], lr: float, hyperparameters: dict[str, Any]) -> Any:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``model``, peak LR ``lr``."""
    check_choice("optimizer", name, OPTIMIZERS)
    return make_optimizer(name, model, lr=lr, **hyperparameters)


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

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field, before any data or model is built."""
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("preset", self.preset, PRESETS)
        resolve_device(self.device)
        for name in ("steps", "batch_size", "seq_len", "accumulation", "eval_every", "val_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        config = model_config(self.preset, **self.model_overrides)
        if self.seq_len > config.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds the {self.preset} preset's max_seq_len={config.max_seq_len}")
        make_schedule(self.schedule, self.steps)
        if self.init_checkpoint is not None and not Path(self.init_checkpoint).is_file():
            raise ValueError(f"init_checkpoint={self.init_checkpoint!r} does not exist")

    @property
    def tokens_per_step(self) -> int:
        """Training tokens one outer step consumes."""
        micro = self.hyperparameters.get("inner_steps", self.accumulation) if self.optimizer.startswith("gn") else self.accumulation
        return micro * self.batch_size * self.seq_len


def run(spec: RunSpec, output_dir: str | Path | None = None, *, progress: bool = True, checkpoint_every: int = 0) -> History:
    """Validate ``spec``, build corpus, model and optimizer, and train.

    Args:
        spec: the run's settings.
        output_dir: folder for History, metadata and checkpoint (None: in memory only).
        progress: print a line per evaluation.
        checkpoint_every: resumable checkpoint period in steps (0: at the end only).

    Returns:
        The run's History; its metadata records the spec, the corpus hash and the model size.
    """
    spec.validate()
    device = resolve_device(spec.device)
    corpus = load_corpus(spec.corpus)
    model = build_model(spec.preset, seed=spec.seed, device=device, vocab_size=corpus.vocab_size, **spec.model_overrides)
    if spec.init_checkpoint is not None:
        model.load_state_dict(torch.load(spec.init_checkpoint, map_location=device, weights_only=True))
    train_batches = corpus.sampler("train", spec.batch_size, spec.seq_len, seed=spec.seed, device=device)
    val = corpus.fixed_batches("val", spec.batch_size, spec.seq_len, spec.val_batches, seed=0, device=device)
    optimizer = build_optimizer(spec.optimizer, model, train_batches, spec.lr, spec.hyperparameters)
    metadata = {
        "spec": dataclasses.asdict(spec),
        "corpus": corpus.meta,
        "model": dataclasses.asdict(model.config),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": spec.tokens_per_step,
        "torch": torch.__version__,
    }
    return train(
        model,
        optimizer,
        train_batches,
        val,
        steps=spec.steps,
        accumulation=spec.accumulation,
        eval_every=spec.eval_every,
        target_loss=spec.target_loss,
        schedule=make_schedule(spec.schedule, spec.steps),
        run_dir=output_dir,
        checkpoint_every=checkpoint_every,
        metadata=metadata,
        progress=progress,
    )


def steps_to_target(history: History, target: float) -> int | None:
    """First outer step at which the validation loss is ``<= target``; None if never reached."""
    for row in history.rows:
        if row.get("val_loss") is not None and row["val_loss"] <= target:
            return int(row["step"])
    return None


def summarize(history: History, target: float | None = None) -> dict[str, Any]:
    """One results-table row: steps to target, final validation loss, tokens, wall time, status."""
    last = history.rows[-1]
    return {
        "steps_to_target": steps_to_target(history, target) if target is not None else None,
        "final_val_loss": history.final_val_loss,
        "steps": int(last["step"]),
        "tokens": int(last["tokens"]),
        "wall_time_s": float(last["wall_time"]),
        "status": history.status,
    }


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
        run_dir = Path(output_dir) / f"lr={lr:.3g}" if output_dir is not None else None
        rows.append({"lr": lr, **summarize(run(run_spec, run_dir, progress=progress), target)})
    table = pd.DataFrame(rows)
    reached = table["steps_to_target"].notna()
    order = table.assign(
        _steps=table["steps_to_target"].where(reached, np.inf),
        _loss=table["final_val_loss"].fillna(np.inf),
    ).sort_values(["_steps", "_loss"])
    best_index = order.index[0]
    best = {**table.loc[best_index].to_dict(), "on_edge": best_index in (0, len(grid) - 1)}
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "lr_sweep.csv", table.to_csv(index=False))
    return table, best

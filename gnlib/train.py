"""The training loop: any optimizer object, a batch source, evaluation, early stop, History, resume.

Two kinds of optimizer are driven (``train`` imports none of them):

1. a ``torch.optim``-like optimizer: each step draws ``accumulation`` micro-batches, back-propagates
   their mean loss and calls ``optimizer.step()``;
2. an optimizer with ``draws_batches = True`` (the Gauss-Newton optimizers): it was built with its own
   batch source and each ``optimizer.step()`` returns a flat dict of diagnostics recorded in History.

An optimizer may also offer ``eval_parameters() -> dict | None`` (e.g. an EMA of its iterates); the
validation loss is then computed with those parameters.

Under ``torchrun`` (:mod:`gnlib.distributed`) every process runs this loop on its shard of the data:
torch-like optimizers get their gradients averaged over processes after back-propagation (before
clipping), the training and validation losses are averaged (each process evaluates its own
``val_batches``: its shard of the validation batches when they come from ``gnlib.data``, so the average
is the loss on the whole batches), ``tokens`` counts the tokens of all processes, and rank 0 alone prints
and writes History and checkpoints (every process keeps History in memory). Every process resumes from
the same checkpoint, which records the number of processes; resuming with another number is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from gnlib import distributed
from gnlib.losses import CrossEntropy
from gnlib.runtime import atomic_torch_save, atomic_write_json, atomic_write_text

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

CHECKPOINT = "checkpoint.pt"
HISTORY_JSONL = "history.jsonl"
HISTORY_CSV = "history.csv"
METADATA = "metadata.json"


@dataclass
class History:
    """What a run did, one row per outer step (row 0 is the evaluation before the first step).

    Attributes:
        rows: dicts with at least ``step``, ``tokens`` (training tokens seen so far), ``wall_time``
            (seconds since the run started, summed across resumes), ``train_loss``, ``val_loss`` (None
            where not evaluated), ``lr`` and the optimizer's diagnostics.
        status: ``"running"``, ``"completed"`` (all steps done), ``"reached_target"`` or ``"diverged"``.
        metadata: free-form run description (corpus hash, model config, optimizer settings, seed, ...).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The rows as a DataFrame (one column per key ever recorded)."""
        return pd.DataFrame(self.rows)

    def evaluations(self) -> pd.DataFrame:
        """Rows where the validation loss was measured: columns ``step``, ``tokens``, ``val_loss``."""
        frame = self.to_frame()
        return frame.loc[frame["val_loss"].notna(), ["step", "tokens", "wall_time", "val_loss"]].reset_index(drop=True)

    @property
    def final_val_loss(self) -> float | None:
        """The last measured validation loss."""
        values = [r["val_loss"] for r in self.rows if r.get("val_loss") is not None]
        return values[-1] if values else None

    def save(self, run_dir: str | Path) -> None:
        """Write ``history.jsonl``, ``history.csv`` and ``metadata.json`` (with the status) atomically."""
        run_dir = Path(run_dir)
        atomic_write_text(
            run_dir / HISTORY_JSONL, "".join(json.dumps(r, default=_json_default) + "\n" for r in self.rows)
        )
        atomic_write_text(run_dir / HISTORY_CSV, self.to_frame().to_csv(index=False))
        atomic_write_json(run_dir / METADATA, {**self.metadata, "status": self.status})

    @classmethod
    def load(cls, run_dir: str | Path) -> "History":
        """Read a History written by :meth:`save`."""
        run_dir = Path(run_dir)
        rows = [json.loads(line) for line in (run_dir / HISTORY_JSONL).read_text().splitlines() if line]
        metadata = json.loads((run_dir / METADATA).read_text())
        status = metadata.pop("status", "completed")
        return cls(rows=rows, status=status, metadata=metadata)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, params: dict[str, Tensor] | None = None
) -> float:
    """Mean of ``loss_fn`` over ``batches`` (each batch weighted equally), without gradients."""
    if not batches:
        raise ValueError("evaluation needs at least one validation batch")
    total = 0.0
    for inputs, targets in batches:
        logits = model(inputs) if params is None else functional_call(model, params, (inputs,))
        total += float(loss_fn(logits, targets))
    return total / len(batches)


def _fingerprint(metadata: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(
    model: nn.Module,
    optimizer: Any,
    train_batches: Callable[[], Batch],
    val_batches: Sequence[Batch],
    *,
    steps: int,
    accumulation: int = 1,
    eval_every: int = 10,
    target_loss: float | None = None,
    schedule: Callable[[int], float] | None = None,
    loss_fn: LossFn | None = None,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    max_grad_norm: float | None = None,
    label: str = "train",
) -> History:
    """Train ``model`` with ``optimizer`` for up to ``steps`` outer steps.

    Args:
        model: the model; it is updated in place.
        optimizer: a torch-like optimizer over ``model``'s parameters, or one with ``draws_batches = True``.
        train_batches: zero-argument callable returning the next ``(inputs, targets)`` batch; if it has
            ``state_dict``/``load_state_dict`` (``gnlib.data.BatchSampler``), its state is checkpointed.
        val_batches: the fixed validation set.
        steps: number of outer steps (``>= 1``).
        accumulation: micro-batches per step for torch-like optimizers (token batch = accumulation·B·T).
        eval_every: evaluate every this many steps (and at step 0 and the last step).
        target_loss: stop once the validation loss is at or below this value.
        schedule: LR multiplier ``schedule(step)``; each group's ``lr`` becomes ``initial_lr * schedule``.
        loss_fn: ``loss_fn(logits, targets)``; default token-mean cross-entropy.
        run_dir: where History, metadata and checkpoints go; ``None`` keeps everything in memory.
        checkpoint_every: write a resumable checkpoint every this many steps (0: only at the end).
            A run started on a ``run_dir`` that holds a checkpoint with the same ``metadata`` resumes
            from it (and returns at once if that run had finished); different metadata starts afresh.
            Data-parallel: rank 0 writes, every process reads ``run_dir`` (it must be shared).
        metadata: description of the run, saved with it and used to recognise a resumable checkpoint.
        progress: show a progress bar (``tqdm.auto``: a widget in Jupyter, so papermill's log is not flooded)
            with the last losses, and print one line naming ``label`` when the run ends.
        max_grad_norm: clip the accumulated gradient to this norm (torch-like optimizers only).
        label: name of the run in its progress bar and final line (e.g. the optimizer).

    Returns:
        The run's :class:`History`; ``metadata["world_size"]`` is the number of processes.

    Raises:
        ValueError: bad arguments, or ``run_dir`` holds this run's checkpoint written by another number
            of processes.
    """
    for name, value, low in (("steps", steps, 1), ("accumulation", accumulation, 1), ("eval_every", eval_every, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every!r}")
    loss_fn = loss_fn or CrossEntropy().value
    draws_batches = getattr(optimizer, "draws_batches", False)
    metadata = dict(metadata or {})
    fingerprint = _fingerprint(metadata)
    run_dir = Path(run_dir) if run_dir is not None else None
    for group in [] if draws_batches else optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    world, main = distributed.world_size(), distributed.is_main()
    progress = progress and main
    history = History(metadata={**metadata, "fingerprint": fingerprint, "world_size": world})
    elapsed_before = 0.0
    if run_dir is not None and (run_dir / CHECKPOINT).exists():
        state = torch.load(run_dir / CHECKPOINT, weights_only=True)
        if state["fingerprint"] == fingerprint:
            saved_world = state.get("world_size", 1)
            if saved_world != world:
                raise ValueError(
                    f"{run_dir / CHECKPOINT} was written by a run on world_size={saved_world} process(es); this "
                    f"run has world_size={world}. Resume it with torchrun --nproc_per_node {saved_world} (the batch "
                    "stream depends on the number of processes), or use another run_dir"
                )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if hasattr(train_batches, "load_state_dict"):
                train_batches.load_state_dict(state["sampler"])
            torch.set_rng_state(state["rng"])
            history.rows = json.loads(state["rows"])
            history.status = state["status"]
            elapsed_before = history.rows[-1]["wall_time"]
        elif progress:
            print(f"{run_dir}: existing checkpoint has other settings; starting a new run")
    distributed.check_same("the step this run resumes from", history.rows[-1]["step"] if history.rows else -1)
    if history.status != "running":
        return history

    def checkpoint() -> None:
        if run_dir is None or not main:
            return
        history.save(run_dir)
        atomic_torch_save(
            {
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": train_batches.state_dict() if hasattr(train_batches, "state_dict") else {},
                "rng": torch.get_rng_state(),
                "rows": json.dumps(history.rows, default=_json_default),
                "status": history.status,
                "world_size": world,
            },
            run_dir / CHECKPOINT,
        )

    def validation_loss() -> float:
        eval_params = getattr(optimizer, "eval_parameters", None)
        loss = evaluate(model, val_batches, loss_fn, eval_params() if callable(eval_params) else None)
        return distributed.all_reduce_mean(loss)

    def update_status(row: dict[str, Any], last: bool) -> None:
        losses = [row[key] for key in ("train_loss", "val_loss") if row.get(key) is not None]
        if not all(math.isfinite(value) for value in losses):
            history.status = "diverged"
        elif target_loss is not None and row["val_loss"] is not None and row["val_loss"] <= target_loss:
            history.status = "reached_target"
        elif last:
            history.status = "completed"

    start = time.perf_counter() - elapsed_before
    if not history.rows:
        history.rows.append(
            {"step": 0, "tokens": 0, "wall_time": 0.0, "train_loss": None, "val_loss": validation_loss()}
        )
        update_status(history.rows[0], last=False)
    first_step = history.rows[-1]["step"] + 1 if history.status == "running" else steps + 1
    bar = tqdm(total=steps, initial=first_step - 1, desc=label, unit="step", disable=not progress, mininterval=1.0)
    for step in range(first_step, steps + 1):
        row: dict[str, Any] = {"step": step}
        if draws_batches:
            diagnostics = dict(optimizer.step())
            tokens = int(diagnostics.pop("tokens", 0)) * world
            row["train_loss"] = diagnostics.pop("loss", None)
            row.update(diagnostics)
        else:
            multiplier = schedule(step - 1) if schedule is not None else 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * multiplier
            optimizer.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for _ in range(accumulation):
                inputs, targets = train_batches()
                loss = loss_fn(model(inputs), targets)
                (loss / accumulation).backward()
                total += float(loss.detach())
                tokens += targets.numel() * world
            distributed.average_gradients(model.parameters())
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            row["train_loss"] = distributed.all_reduce_mean(total / accumulation)
            row["lr"] = optimizer.param_groups[0]["lr"]
        row["tokens"] = history.rows[-1]["tokens"] + tokens
        last = step == steps
        row["val_loss"] = validation_loss() if (step % eval_every == 0 or last) else None
        row["wall_time"] = time.perf_counter() - start
        history.rows.append(row)

        update_status(row, last)
        bar.update()
        if row["val_loss"] is not None:
            bar.set_postfix_str(f"train {_fmt(row['train_loss'])}  val {_fmt(row['val_loss'])}", refresh=False)
        if history.status != "running":
            break
        if checkpoint_every and step % checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    if progress:
        last_row = history.rows[-1]
        print(
            f"{label}: {history.status} at step {last_row['step']}/{steps}, val loss {_fmt(history.final_val_loss)}, "
            f"{last_row['wall_time']:.1f}s"
        )
    return history

"""The training loop: any optimizer object, a batch source, evaluation, early stop, History, resume.

Two kinds of optimizer are driven (``train`` imports none of them): a ``torch.optim``-like one, whose step
back-propagates the mean loss of ``accumulation`` micro-batches, and one with ``draws_batches = True`` (the
Gauss-Newton optimizers), built with its own batch source, whose ``step()`` returns diagnostics recorded in
History. An optimizer with ``eval_parameters()`` (an EMA) is evaluated on them (``val_loss``) and on the raw
iterate (``val_loss_raw``); such a run stops at ``target_loss`` once both have reached it. SIGINT or SIGTERM
finishes the step under way, checkpoints it and raises :class:`RunInterrupted` saying how to resume. Under
``torchrun`` every process runs this loop on its shard (docs/several-processes.md); docs/outputs-and-reliability.md
says what a run writes and how it resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from gnlib import distributed
from gnlib.checks import FLAG, Rule, check_fields, integer, number, optional
from gnlib.data.source import BatchSource
from gnlib.experiment.history import History, json_default
from gnlib.experiment.run_folder import (
    CHECKPOINT,
    CheckpointNotWritten,
    conflict_message,
    fingerprint,
    read_checkpoint,
    remove_stale_temporaries,
    run_folder_lock,
    saved_fingerprint,
)
from gnlib.losses import CrossEntropy
from gnlib.runtime import atomic_torch_save, invalid

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


#: How a stopped run is resumed, as the messages say it.
RESUME = "(the same command line) to resume"


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C, a kernel interrupt) or SIGTERM stopped a run after a step; its checkpoint is written.

    Attributes:
        signum: the signal (a shell reports exit status ``128 + signum``).
    """

    def __init__(self, message: str, signum: int) -> None:
        """``message`` says where the run stopped and how to resume it."""
        super().__init__(message)
        self.signum = signum


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, params: dict[str, Tensor] | None = None
) -> float:
    """Mean of ``loss_fn`` over ``batches`` (each batch weighted equally), without gradients."""
    if not batches:
        raise ValueError("evaluation needs at least one validation batch")
    losses = []
    for inputs, targets in batches:
        logits = model(inputs) if params is None else functional_call(model, params, (inputs,))
        losses.append(loss_fn(logits, targets))
    return sum(torch.stack(losses).tolist()) / len(batches)  # one host read


def _rejected_steps(rows: list[dict[str, Any]]) -> int:
    """Consecutive outer steps, counted back from the last row, whose optimizer reported ``alpha == 0``."""
    count = 0
    for row in reversed(rows[1:]):
        if row.get("alpha") != 0:
            break
        count += 1
    return count


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`train` runs: length, evaluation, stopping rules, checkpoints and output.

    Attributes:
        steps: number of outer steps (``>= 1``).
        accumulation: micro-batches per step for torch-like optimizers (token batch = accumulation·B·T).
        eval_every: evaluate every this many steps (and at step 0 and the last step).
        eval_schedule: ``eval_schedule(step) -> bool`` decides instead of ``eval_every`` (step 0 and the
            last step are always evaluated), e.g. :func:`gnlib.experiment.protocols.paper_eval_schedule`.
        target_loss: stop once the validation loss is at or below this value.
        schedule: LR multiplier ``schedule(step)``; each group's ``lr`` becomes ``initial_lr * schedule``.
        loss_fn: ``loss_fn(logits, targets)``; None: token-mean cross-entropy.
        run_dir: where History, metadata and checkpoints go; ``None`` keeps everything in memory.
        checkpoint_every: write a resumable checkpoint every this many steps (0: only at the end).
            A run started on a ``run_dir`` that holds a checkpoint with the same ``metadata`` resumes
            from it (and returns at once if that run had finished); a ``run_dir`` holding a run with
            other metadata is refused unless ``overwrite``. While the run lasts it holds ``run_dir/.lock``:
            a second run into the same folder is refused. Leftover temporaries of killed writes are
            removed; a checkpoint that cannot be read is renamed ``checkpoint.pt.unreadable-<time>`` and
            the run starts afresh. Data-parallel: rank 0 writes, every process reads ``run_dir`` (it
            must be shared).
        metadata: description of the run, saved with it and used to recognise a resumable checkpoint.
        progress: show a progress bar (``tqdm.auto``: a widget in Jupyter, so papermill's log is not flooded)
            with the last losses, and print one line naming ``label`` when the run ends (rank 0 only).
        max_grad_norm: clip the accumulated gradient to this norm (torch-like optimizers only).
        overwrite: replace a run with other settings found in ``run_dir`` instead of refusing.
        stall_steps: status ``"stalled"`` after this many consecutive outer steps in which the optimizer
            reported that it took no step (diagnostic ``alpha == 0``: a rejected Gauss-Newton line search).
        divergence_factor: status ``"diverged"`` when a training or validation loss is not finite or
            exceeds this multiple of the validation loss at step 0 (a run whose last validation loss is
            above the start's is ``"diverged"`` too: it made the model worse).
        label: name of the run in its progress bar and final line (e.g. the optimizer).
    """

    steps: int
    accumulation: int = 1
    eval_every: int = 10
    target_loss: float | None = None
    schedule: Callable[[int], float] | None = None
    loss_fn: LossFn | None = None
    run_dir: str | Path | None = None
    checkpoint_every: int = 0
    metadata: dict[str, Any] | None = None
    progress: bool = True
    max_grad_norm: float | None = None
    overwrite: bool = False
    stall_steps: int = 10
    divergence_factor: float = 10.0
    eval_schedule: Callable[[int], bool] | None = None
    label: str = "train"

    def __post_init__(self) -> None:
        """Check every setting that has a rule (:data:`TRAIN_RULES`) before any work."""
        check_fields("train", vars(self), TRAIN_RULES)


#: The rules :class:`TrainSettings` are checked against.
TRAIN_RULES: dict[str, Rule] = {
    "steps": integer(1),
    "accumulation": integer(1),
    "eval_every": integer(1),
    "target_loss": optional(number(float("-inf"))),
    "checkpoint_every": integer(0),
    "progress": FLAG,
    "max_grad_norm": optional(number(0.0, strict=True)),
    "overwrite": FLAG,
    "stall_steps": integer(1),
    "divergence_factor": number(0.0, strict=True),
}


def train(
    model: nn.Module,
    optimizer: Any,
    train_batches: Callable[[], Batch],
    val_batches: Sequence[Batch],
    settings: TrainSettings,
) -> History:
    """Train ``model`` with ``optimizer`` for up to ``settings.steps`` outer steps.

    Args:
        model: the model; it is updated in place.
        optimizer: a torch-like optimizer over ``model``'s parameters, or one with ``draws_batches = True``.
        train_batches: zero-argument callable returning the next ``(inputs, targets)`` batch; a
            :class:`~gnlib.data.BatchSource` (``state_dict``/``load_state_dict``) is checkpointed too.
        val_batches: the fixed validation set.
        settings: how the run goes (:class:`TrainSettings`).

    Returns:
        The run's :class:`History`; ``metadata["world_size"]`` is the number of processes.

    Raises:
        ValueError: ``run_dir`` holds a run with other settings (and not ``overwrite``), or this run's
            checkpoint was written by another number of processes.
        RunFolderBusy: another process is running into ``run_dir``.
        RunInterrupted: SIGINT or SIGTERM stopped the run after a step, checkpointed in ``run_dir``.
        CheckpointNotWritten: History or the checkpoint could not be written (e.g. a full disk); the
            message says which step the last checkpoint holds.
    """
    metadata = dict(settings.metadata or {})
    settings = dataclasses.replace(
        settings,
        loss_fn=settings.loss_fn or CrossEntropy().value,
        run_dir=Path(settings.run_dir) if settings.run_dir is not None else None,
        progress=settings.progress and distributed.is_main(),
    )
    with run_folder_lock(settings.run_dir if distributed.is_main() else None):
        if not getattr(optimizer, "draws_batches", False):
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        settings_hash = fingerprint(metadata)
        world = distributed.world_size()
        history = History(metadata={**metadata, "fingerprint": settings_hash, "world_size": world})
        loop = _Loop(
            model, optimizer, train_batches, val_batches, settings, history, settings_hash, world, distributed.is_main()
        )
        return loop.run()


@dataclass
class _Loop:
    """One run of the training loop, in named steps: resume, step, evaluate, judge, checkpoint."""

    model: nn.Module
    optimizer: Any
    train_batches: Callable[[], Batch]
    val_batches: Sequence[Batch]
    settings: TrainSettings
    history: History
    fingerprint: str
    world: int
    main: bool
    saved_step: int | None = None  # the step the checkpoint in run_dir holds (None: no checkpoint yet)

    @property
    def draws_batches(self) -> bool:
        """The optimizer draws its own batches and returns diagnostics (the Gauss-Newton optimizers)."""
        return getattr(self.optimizer, "draws_batches", False)

    def resume(self) -> tuple[float, float]:
        """Load the run's checkpoint into model, optimizer, batch source, RNG and History, if it is this run's.

        Returns:
            The wall time and process CPU time the resumed run had already spent (zeros for a fresh run).

        Raises:
            ValueError: the folder holds a run with other settings (and not ``overwrite``), or the
                checkpoint was written by another number of processes.
        """
        run_dir, state = self.settings.run_dir, None
        if run_dir is not None:
            if self.main:
                remove_stale_temporaries(run_dir)
            device = next(iter(self.model.parameters())).device
            state = read_checkpoint(run_dir / CHECKPOINT, device, move_aside=self.main)
            saved = state["fingerprint"] if state is not None else saved_fingerprint(run_dir)
            if saved is not None and saved != self.fingerprint:
                if not self.settings.overwrite:
                    raise ValueError(conflict_message(run_dir, self.history.metadata))
                if self.settings.progress:
                    print(f"{run_dir}: replacing the run with other settings found there (overwrite=True)")
                state = None
        if state is None:
            return 0.0, 0.0
        saved_world = state.get("world_size", 1)
        if saved_world != self.world:
            raise ValueError(
                f"{run_dir / CHECKPOINT} was written by a run on world_size={saved_world} process(es); this "
                f"run has world_size={self.world}. Resume it with torchrun --nproc_per_node {saved_world} (the "
                "batch stream depends on the number of processes), or use another run_dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(self.train_batches, BatchSource):
            self.train_batches.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"].cpu())
        self.history.rows = json.loads(state["rows"])
        self.history.status = state["status"]
        self.history.reason = state.get("reason")
        self.saved_step = self.history.rows[-1]["step"]
        last = self.history.rows[-1]
        return last["wall_time"], last.get("cpu_time", 0.0)

    def step(self, step: int) -> dict[str, Any]:
        """Outer step ``step`` (1-based); its row: ``train_loss``, the tokens it read, and diagnostics or ``lr``."""
        if self.draws_batches:
            row = dict(self.optimizer.step())
            row["tokens"] = int(row.pop("tokens", 0)) * self.world
            row["train_loss"] = row.pop("loss", None)
            return row
        s = self.settings
        multiplier = s.schedule(step - 1) if s.schedule is not None else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
        self.optimizer.zero_grad(set_to_none=True)
        losses, tokens = [], 0
        for _ in range(s.accumulation):
            inputs, targets = self.train_batches()
            loss = s.loss_fn(self.model(inputs), targets)
            (loss / s.accumulation).backward()
            losses.append(loss.detach())
            tokens += targets.numel() * self.world
        distributed.average_gradients(self.model.parameters())
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        total = sum(torch.stack(losses).tolist())  # one host read, after the step's work is queued
        train_loss = distributed.all_reduce_mean(total / s.accumulation)
        return {"train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"], "tokens": tokens}

    def evaluate(self) -> dict[str, float]:
        """``val_loss`` (with the optimizer's eval parameters, if any) and then ``val_loss_raw``."""
        eval_params = getattr(self.optimizer, "eval_parameters", None)
        params = eval_params() if callable(eval_params) else None
        losses = {"val_loss": evaluate(self.model, self.val_batches, self.settings.loss_fn, params)}
        if params is not None:
            losses["val_loss_raw"] = evaluate(self.model, self.val_batches, self.settings.loss_fn)
        return {key: distributed.all_reduce_mean(value) for key, value in losses.items()}

    def judge(self, row: dict[str, Any], last: bool) -> None:
        """Set History's status after ``row``: diverged, stalled, reached_target, completed (last) or running."""
        s, history = self.settings, self.history
        losses = {key: row[key] for key in ("train_loss", "val_loss") if row.get(key) is not None}
        start_loss = history.rows[0]["val_loss"]
        limit = s.divergence_factor * start_loss if math.isfinite(start_loss) else math.inf
        rejected = _rejected_steps(history.rows)
        exploded = [key for key, value in losses.items() if value > limit]
        if not all(math.isfinite(value) for value in losses.values()):
            bad = ", ".join(f"{key} {value}" for key, value in losses.items() if not math.isfinite(value))
            history.status, history.reason = "diverged", f"non-finite loss at step {row['step']} ({bad})"
        elif exploded:
            history.status = "diverged"
            history.reason = (
                f"{exploded[0]} {losses[exploded[0]]:.4g} at step {row['step']} exceeds {s.divergence_factor:g}x "
                f"the start's validation loss {start_loss:.4g} (divergence_factor)"
            )
        elif rejected >= s.stall_steps:
            history.status = "stalled"
            history.reason = (
                f"no step taken in the last {rejected} outer steps (the optimizer reported alpha = 0: every "
                f"line-search step rejected; last reason: {row.get('reason')}); lower the LR or change the "
                "line search"
            )
        elif s.target_loss is not None and row["val_loss"] is not None and self.reached(row, s.target_loss):
            history.status = "reached_target"
        elif last and row["val_loss"] > start_loss:
            history.status = "diverged"
            history.reason = (
                f"val_loss {row['val_loss']:.4g} at the last step is above the start's {start_loss:.4g}: the run "
                "made the model worse"
            )
        elif last:
            history.status = "completed"

    def reached(self, row: dict[str, Any], target: float) -> bool:
        """Whether ``val_loss`` has reached ``target``, and ``val_loss_raw`` too where the run evaluates an EMA.

        The raw iterate usually gets there first, the EMA later; a run stops when both have, so that steps to
        target can be read off either.
        """
        keys = ["val_loss", "val_loss_raw"] if "val_loss_raw" in row else ["val_loss"]
        return all(any(r.get(key) is not None and r[key] <= target for r in self.history.rows) for key in keys)

    def checkpoint(self) -> None:
        """Write History and a resumable checkpoint to ``run_dir`` (rank 0 only; nothing without a folder).

        Raises:
            CheckpointNotWritten: a write failed (e.g. the disk is full); the last checkpoint is intact.
        """
        run_dir = self.settings.run_dir
        if run_dir is None or not self.main:
            return
        try:
            self.write_checkpoint(run_dir)
        except OSError as err:
            raise CheckpointNotWritten(self.not_written(err)) from err
        self.saved_step = self.history.rows[-1]["step"]

    def not_written(self, err: OSError) -> str:
        """Why this run's outputs could not be written (``err``), what the folder still holds, how to resume."""
        run_dir, step = self.settings.run_dir, self.history.rows[-1]["step"]
        kept = (
            f"nothing was lost: {run_dir / CHECKPOINT} still holds step {self.saved_step}, the last checkpoint"
            if self.saved_step is not None
            else "no checkpoint had been written yet, so the run will start again from step 0"
        )
        return (
            f"cannot write the outputs of step {step} to {run_dir} ({err.strerror or err}); {kept}. Make room "
            f"there, then run again with the same settings and output folder {RESUME}"
        )

    def write_checkpoint(self, run_dir: Path) -> None:
        """History and the state ``resume`` reads, written atomically to ``run_dir``."""
        self.history.save(run_dir)
        sampler = self.train_batches.state_dict() if isinstance(self.train_batches, BatchSource) else {}
        atomic_torch_save(
            {
                "fingerprint": self.fingerprint,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "sampler": sampler,
                "rng": torch.get_rng_state(),
                "rows": json.dumps(self.history.rows, default=json_default),
                "status": self.history.status,
                "reason": self.history.reason,
                "world_size": self.world,
            },
            run_dir / CHECKPOINT,
        )

    def run(self) -> History:
        """Resume, evaluate step 0, then step, evaluate when due, judge and checkpoint until the run ends.

        Raises:
            RunInterrupted: SIGINT or SIGTERM came; the step under way was finished and checkpointed.
        """
        s, history = self.settings, self.history
        with _StopSignals(repeat_aborts=not distributed.in_process_group()) as signals:
            wall, cpu = self.resume()
            start = (time.perf_counter() - wall, time.process_time() - cpu)
            distributed.check_same("the step this run resumes from", history.rows[-1]["step"] if history.rows else -1)
            if history.status != "running":
                return history
            if not history.rows:
                row = {"step": 0, "tokens": 0, "wall_time": 0.0, "cpu_time": 0.0, "train_loss": None}
                history.rows.append({**row, **self.evaluate()})
                self.judge(history.rows[0], last=False)
            stopped_by = self.train_steps(start, signals)
            self.checkpoint()
            if stopped_by:
                raise self.interrupted(stopped_by)
        if s.progress:
            last_row = history.rows[-1]
            print(
                f"{s.label}: {history.status} at step {last_row['step']}/{s.steps}, val loss "
                f"{_fmt(history.final_val_loss)}, {last_row['wall_time']:.1f}s"
                + (f" ({history.reason})" if history.reason else "")
            )
        return history

    def train_steps(self, start: tuple[float, float], signals: "_StopSignals") -> int:
        """Step, evaluate when due, judge and checkpoint until the run ends or a signal stops it.

        Args:
            start: ``time.perf_counter()`` and ``time.process_time()`` at the run's start (a resumed run: minus
                the wall and CPU time it had spent before).
            signals: the signals noted while the run lasts.

        Returns:
            The signal that stopped the run after a step (the same on every process), else 0.
        """
        s, history = self.settings, self.history
        first = history.rows[-1]["step"] + 1 if history.status == "running" else s.steps + 1
        bar = tqdm(total=s.steps, initial=first - 1, desc=s.label, unit="step", disable=not s.progress, mininterval=1.0)
        with bar:
            for step in range(first, s.steps + 1):
                row = {"step": step, **self.step(step)}
                row["tokens"] += history.rows[-1]["tokens"]
                last = step == s.steps
                due = s.eval_schedule(step) if s.eval_schedule is not None else step % s.eval_every == 0
                row.update(self.evaluate() if (due or last) else {"val_loss": None})
                row["wall_time"] = time.perf_counter() - start[0]
                row["cpu_time"] = time.process_time() - start[1]
                history.rows.append(row)
                self.judge(row, last)
                bar.update()
                if row["val_loss"] is not None:
                    bar.set_postfix_str(f"train {_fmt(row['train_loss'])}  val {_fmt(row['val_loss'])}", refresh=False)
                if history.status != "running":
                    break
                stopped_by = signals.agreed()
                if stopped_by:
                    return stopped_by
                if s.checkpoint_every and step % s.checkpoint_every == 0:
                    self.checkpoint()
        return 0

    def interrupted(self, signum: int) -> RunInterrupted:
        """The exception that ends a run stopped by ``signum``: one line, where it stopped and how to resume."""
        s, step = self.settings, self.history.rows[-1]["step"]
        kept = (
            f"checkpoint written to {s.run_dir / CHECKPOINT}; run again with the same settings and output folder "
            f"{RESUME} from step {step}"
            if s.run_dir is not None
            else "nothing was saved (no run_dir), so it cannot be resumed"
        )
        return RunInterrupted(
            f"{s.label}: stopped by {signal.Signals(signum).name} after step {step}/{s.steps}; {kept}", signum
        )


class _StopSignals:
    """SIGINT and SIGTERM while a run trains: noted, so that the run stops once the step under way is done.

    Handlers are installed in the main thread only (Python runs them there; elsewhere the signals keep
    their effect). A second signal aborts at once (``KeyboardInterrupt``) when ``repeat_aborts``; under
    torchrun it does not, since the launcher passes on the user's signal (and kills after a timeout). A
    signal noted but not acted on (it came during the last step or checkpoint) is raised again on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, repeat_aborts: bool) -> None:
        """Nothing noted yet; ``repeat_aborts``: a second signal raises ``KeyboardInterrupt`` at once."""
        self.repeat_aborts = repeat_aborts
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        """Install the handlers (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.note) for signum in self.SIGNALS}
        return self

    def note(self, signum: int, frame: Any) -> None:
        """The handler: remember the first signal; on a second one abort if ``repeat_aborts``."""
        if self.received is not None and self.repeat_aborts:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def agreed(self) -> int:
        """The signal that stops the run on every process (the largest any process noted), else 0."""
        return distributed.all_reduce_max(self.received or 0)

    def __exit__(self, *exc: Any) -> None:
        """Restore the handlers; raise a signal noted but not acted on, unless an exception is under way."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.received is not None and exc[0] is None:
            signal.raise_signal(self.received)


def train_to_checkpoints(
    model: nn.Module,
    optimizer: Any,
    train_batches: Callable[[], Batch],
    val_batches: Sequence[Batch],
    at_steps: Sequence[int],
    **options: Any,
) -> Iterator[int]:
    """One training run paused at chosen steps: yields each step once the model has been trained to it.

    For the checkpoints s_1 < s_2 < ... (``sorted(set(at_steps))``; 0 is the untrained model) it trains
    s_k − s_{k−1} steps with :func:`train` (validating at the segment's end only) and yields s_k, so the
    caller can read the model and optimizer there (e.g. :func:`gnlib.params.params_of`). The optimizer's
    state and the batch stream carry over between segments: with a constant LR, the model at s_k is the one
    a single run of s_k steps reaches.

    Args:
        model: the model, updated in place.
        optimizer: a torch-like optimizer over ``model``'s parameters (see :func:`train`).
        train_batches: zero-argument callable returning the next training batch.
        val_batches: the fixed validation set.
        at_steps: non-negative step counts, in any order, duplicates ignored.
        **options: further :class:`TrainSettings` (``accumulation``, ``max_grad_norm``, ``loss_fn``, ...).

    Returns:
        An iterator over the sorted checkpoint steps; training happens as it is advanced.

    Raises:
        ValueError: ``at_steps`` empty or holding anything but non-negative integers (before any training).
    """
    steps = sorted(set(at_steps)) if isinstance(at_steps, (list, tuple, range)) else []
    if not steps:
        raise invalid("", "at_steps", at_steps, "a non-empty list of step counts, e.g. [0, 100, 400]")
    for step in steps:
        check_fields("", {"at_steps": step}, {"at_steps": integer(0)})

    def checkpoints() -> Iterator[int]:
        done = 0
        for step in steps:
            if step > done:
                segment = step - done
                settings = TrainSettings(steps=segment, eval_every=segment, **{"progress": False, **options})
                train(model, optimizer, train_batches, val_batches, settings)
                done = step
            yield step

    return checkpoints()

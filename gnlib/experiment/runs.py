"""Runs: one training run from a declarative spec, and the summary of its History.

A :class:`RunSpec` names everything a run depends on (preset, corpus, optimizer and its
hyperparameters, token batch, seed, device); :func:`run` validates it before any work starts, builds
the corpus, model and optimizer (:func:`build_run`), trains, and writes the History under ``outputs/``.
:func:`summarize` turns a History into one results-table row (steps to a target, cost in gradient-step
equivalents, wall time, status). The study built on runs lives in :mod:`gnlib.experiment.study`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from gnlib.checks import (
    MAPPING,
    Rule,
    check_fields,
    check_positive_int,
    check_positive_number,
    check_writable,
    choice,
    integer,
    number,
    optional,
)
from gnlib.curvature.costs import CACHE_DIR, COST_MODELS, cache_key, key_hash, resolve_pass_costs, weights
from gnlib.data.pipeline import RunData, build_run_data, check_data_fields
from gnlib.distributed import is_main
from gnlib.experiment.history import METADATA, History
from gnlib.experiment.protocols import PROTOCOLS
from gnlib.experiment.protocols import resolve as resolve_protocol
from gnlib.experiment.run_folder import load_weights
from gnlib.experiment.train import TrainSettings, train
from gnlib.models import PRESETS, build_model, model_config
from gnlib.optim.gn_options import GN_VARIANTS, GaussNewtonOptions
from gnlib.optim.registry import OPTIMIZERS, REGISTRY, build_optimizer, validate_options
from gnlib.optim.schedules import make_schedule
from gnlib.runtime import invalid, resolve_device

#: GaussNewton's default number of inner steps (its batches per outer step).
GN_INNER_STEPS: int = GaussNewtonOptions().inner_steps


@dataclass
class RunSpec:
    """Everything one training run depends on.

    Attributes:
        optimizer: a name from :data:`OPTIMIZERS` (:mod:`gnlib.optim.registry`).
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
        eval_every: evaluate every this many steps (None: the protocol's; 10 under ``"gnlib"``).
        val_batches: number of fixed validation batches (None: the protocol's; 8 under ``"gnlib"``).
        seed: seeds the model initialisation and the training batch stream.
        device: ``"cpu"``, ``"cuda"``, ...
        hyperparameters: further keyword arguments for the optimizer.
        model_overrides: overrides of the preset's config (e.g. ``{"tie_embeddings": True}``).
        init_checkpoint: a model state-dict file to start from (the shared warm-up checkpoint).
        tokenizer: ``"bytes"``, ``"t5"``, ``"t5:<tokenizer.json>"`` or ``"bpe:<vocab size>"``
            (:mod:`gnlib.data.tokenizers`); the model's vocabulary follows it.
        data: ``"windows"`` (random windows, with replacement) or ``"stream"`` (documents + EOS packed in
            order, no token reused; :mod:`gnlib.data.pipeline`).
        data_epochs: passes over the training data a stream may make (1: never reuse a token).
        data_start: training tokens a stream skips first (the warm-up's: :func:`gnlib.data.pipeline.after_warmup`).
        data_start_seed: the seed whose document order those tokens were read in (the warm-up's; None:
            ``seed``): a local corpus's stream puts those documents first, the rest in ``seed``'s order.
        corpus_bytes: text read from ``corpus`` (None: 4 MB for windows, all of it for a stream; for a
            streamed ``hf:`` dataset, the text a ``bpe:`` tokenizer trains on, default 4 MB).
        protocol: ``"gnlib"`` (the library's defaults) or ``"paper"`` (the reference code's optimizer
            options and evaluation, :mod:`gnlib.experiment.protocols`); ``hyperparameters`` and ``eval_every``/
            ``val_batches`` given (not None) override it, whatever their value, recorded in
            ``metadata["protocol"]``.
        costs: how Gauss-Newton's passes are priced in gradient-step equivalents (:mod:`gnlib.curvature.costs`):
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
    eval_every: int | None = None
    val_batches: int | None = None
    seed: int = 0
    device: str = "cpu"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    tokenizer: str = "bytes"
    data: str = "windows"
    data_epochs: int = 1
    data_start: int = 0
    data_start_seed: int | None = None
    corpus_bytes: int | None = None
    protocol: str = "gnlib"
    costs: str = "measured"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field, before any data or model is built."""
        check_fields("", vars(self), RUN_RULES)
        own = REGISTRY[self.optimizer].accumulation_option
        if own is not None and own in self.hyperparameters:
            raise invalid(
                f"optimizer {self.optimizer!r}",
                own,
                self.hyperparameters[own],
                "left unset: the run's accumulation sets it",
            )
        resolve_device(self.device)
        check_positive_number("lr", self.lr, owner=f"optimizer {self.optimizer!r}")
        config = model_config(self.preset, **self.model_overrides)
        if self.seq_len > config.max_seq_len:
            raise invalid(
                "", "seq_len", self.seq_len, f"at most the {self.preset} preset's max_seq_len={config.max_seq_len}"
            )
        make_schedule(self.schedule, self.steps)
        if self.init_checkpoint is not None and not Path(self.init_checkpoint).is_file():
            raise ValueError(f"init_checkpoint={self.init_checkpoint!r} does not exist")
        check_data_fields(self)
        # the optimizer's options against its declared schema: a bad option fails now, not mid-study
        validate_options(self.optimizer, self.lr, resolve_protocol(self).hyperparameters)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens one outer step consumes."""
        gn = self.optimizer in GN_VARIANTS
        micro = self.hyperparameters.get("inner_steps", GN_INNER_STEPS) if gn else self.accumulation
        return micro * self.batch_size * self.seq_len


class BuiltRun(NamedTuple):
    """What :func:`build_run` makes of a spec."""

    data: RunData
    model: torch.nn.Module
    train: Any
    val: list
    optimizer: Any
    pass_costs: dict[str, Any] | None


def build_run(spec: RunSpec, output_dir: str | Path | None = None) -> BuiltRun:
    """Run data, model (from ``init_checkpoint`` if set), training batches, fixed validation set, optimizer.

    A Gauss-Newton optimizer gets its pass costs (:func:`_pass_costs`, the record kept in ``pass_costs``)
    at construction; ``output_dir`` is where a resumed run's measured costs are read from.
    """
    device = resolve_device(spec.device)
    protocol = resolve_protocol(spec)
    data = build_run_data(
        dataclasses.replace(spec, val_batches=protocol.val_batches, hyperparameters=protocol.hyperparameters), device
    )
    model = build_model(
        spec.preset, seed=spec.seed, device=device, **{"vocab_size": data.vocab_size, **spec.model_overrides}
    )
    if spec.init_checkpoint is not None:
        load_init_checkpoint(model, spec.init_checkpoint, device)
    options = dict(protocol.hyperparameters)
    record = _pass_costs(spec, model, options, output_dir)
    if record is not None:
        options["pass_costs"] = weights(record)
    torch.manual_seed(spec.seed)  # optimizers that draw random numbers (PSGD's probes) start from the run's seed
    optimizer = build_optimizer(spec.optimizer, model, data.train, spec.lr, options, accumulation=spec.accumulation)
    return BuiltRun(data, model, data.train, data.val, optimizer, record)


def load_init_checkpoint(model: torch.nn.Module, path: str, device: torch.device) -> None:
    """Load the model state dict in ``path`` into ``model``, every tensor checked by name and shape first.

    Raises:
        ValueError: naming ``init_checkpoint``: a file that is not model weights
            (:func:`~gnlib.experiment.train.load_weights`), the first tensor whose shape differs (both shapes),
            or the tensors missing from the file or unknown to the model.
    """
    state = load_weights(path, device, parameter="init_checkpoint")  # a readable file of named tensors
    fix = "make it with this run's preset, model_overrides and tokenizer (or drop init_checkpoint)"
    own = model.state_dict()
    for name, tensor in own.items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"init_checkpoint={path!r}: tensor {name!r} has shape {tuple(state[name].shape)} there, the "
                f"model's is {tuple(tensor.shape)}; {fix}"
            )
    missing, unknown = [n for n in own if n not in state], [n for n in state if n not in own]
    if missing or unknown:
        raise ValueError(f"init_checkpoint={path!r} lacks the tensors {missing} and has unknown ones {unknown}; {fix}")
    model.load_state_dict(state)


#: The rules of :class:`RunSpec`'s fields that need no other field (``validate`` checks the rest).
RUN_RULES: dict[str, Rule] = {
    "optimizer": choice(OPTIMIZERS),
    "preset": choice(list(PRESETS)),
    "protocol": choice(PROTOCOLS),
    "costs": choice(COST_MODELS),
    "steps": integer(1),
    "batch_size": integer(1),
    "seq_len": integer(1),
    "accumulation": integer(1),
    "eval_every": optional(integer(1)),
    "val_batches": optional(integer(1)),
    "seed": integer(0),
    "target_loss": optional(number(0.0)),
    "hyperparameters": MAPPING,
    "model_overrides": MAPPING,
}


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
            process is running into is refused (:class:`gnlib.experiment.train.RunFolderBusy`).
        progress: print a line per evaluation.
        checkpoint_every: resumable checkpoint period in steps (0: at the end only).
        overwrite: replace a run with other settings found in ``output_dir``.

    Returns:
        The run's History; its metadata records the spec, the corpus hash and the model size.
    """
    spec.validate()
    check_positive_int("checkpoint_every", checkpoint_every, minimum=0)
    if output_dir is not None and is_main():
        check_writable(output_dir, need_bytes=checkpoint_bytes(spec))
    data, model, train_batches, val, optimizer, pass_costs = build_run(spec, output_dir)
    protocol = resolve_protocol(spec)
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
        TrainSettings(
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
        ),
    )


def _pass_costs(
    spec: RunSpec, model: torch.nn.Module, hyperparameters: Mapping[str, Any], output_dir: str | Path | None
) -> dict[str, Any] | None:
    """How a Gauss-Newton run prices its passes (:mod:`gnlib.curvature.costs`): a record for ``metadata["pass_costs"]``.

    None for first-order optimizers (a micro-batch costs one gradient step under any model). A
    ``pass_costs`` dict in the optimizer's options wins (``"model": "given"``); a run resumed in
    ``output_dir`` on the same configuration (:func:`gnlib.curvature.costs.cache_key`) keeps the measured costs its
    ``metadata.json`` holds, so all its steps are priced alike; otherwise ``spec.costs`` decides, measured
    costs being cached under :data:`gnlib.curvature.costs.CACHE_DIR` when the run writes outputs. The record has
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


def checkpoint_bytes(spec: RunSpec) -> int:
    """Room a run needs in its folder, in bytes.

    Two checkpoints (old and new during an atomic write), each the model and up to three optimizer tensors
    per parameter in float32, plus 1 MiB for History.
    """
    return 2 * 4 * 4 * model_config(spec.preset, **spec.model_overrides).n_params + 2**20


def steps_to_target(history: History, target: float, loss: str = "val_loss") -> int | None:
    """First outer step at which the validation loss is ``<= target``; None if never reached.

    ``loss="val_loss_raw"`` reads the raw iterate of a run evaluated on an EMA (where there is no EMA,
    ``val_loss`` is the raw iterate's, and it is read instead).
    """
    key = loss if any(loss in row for row in history.rows) else "val_loss"
    for row in history.rows:
        if row.get(key) is not None and row[key] <= target:
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


def _to_target(history: History, target: float | None, loss: str, name: str) -> dict[str, Any]:
    """Steps, tokens, seconds and cost to the first evaluation of ``loss`` at or below ``target``.

    Keys ``steps_to_<name>``, ``tokens_to_<name>``, ``wall_time_to_<name>_s``, ``cpu_time_to_<name>_s``
    (None for a run recorded without CPU times) and ``grad_equivalents_to_<name>``; all None when missed.
    """
    reached = steps_to_target(history, target, loss) if target is not None else None
    at_target = None if reached is None else next(r for r in history.rows if r["step"] == reached)
    seconds, suffix = (name.removesuffix("_raw"), "_raw") if name.endswith("_raw") else (name, "")
    return {
        f"steps_to_{name}": reached,
        f"tokens_to_{name}": None if at_target is None else int(at_target["tokens"]),
        f"wall_time_to_{seconds}{suffix}_s": None if at_target is None else float(at_target["wall_time"]),
        f"cpu_time_to_{seconds}{suffix}_s": None if at_target is None else at_target.get("cpu_time"),
        f"grad_equivalents_to_{name}": None if reached is None else grad_equivalents(history, reached),
    }


def summarize(history: History, target: float | None = None, early_target: float | None = None) -> dict[str, Any]:
    """One results-table row: outer steps, tokens, time and cost to target, and the same for the whole run.

    ``*_to_target`` are taken at the first evaluation at or below ``target`` (None when not reached):
    ``steps_to_target`` outer steps, ``tokens_to_target`` training tokens drawn (GN's line-search batches
    included), ``wall_time_to_target_s`` seconds of training (evaluations included, pass-cost measurement
    not), ``cpu_time_to_target_s`` the process's CPU seconds over the same span (the time a one-thread run
    takes alone on a core, whatever else shares the machine) and ``grad_equivalents_to_target``
    gradient-step equivalents (:func:`grad_equivalents`), on the evaluated parameters (an EMA of the
    iterates where the optimizer keeps one); the same with ``_raw`` (and ``final_val_loss_raw``) on the raw
    iterate, equal to them for a run without an EMA. ``early_target`` (a higher loss, read off the same run)
    adds the same keys named ``*_to_early_target*``. ``steps``, ``tokens``, ``wall_time_s``, ``cpu_time_s``
    and ``grad_equivalents`` are the whole run's. ``cost_model`` says how GN's passes were priced
    (``metadata["pass_costs"]["model"]``: ``"measured"``, ``"flops"`` or ``"given"``; None for first-order
    runs, whose micro-batch costs one gradient step under any model).
    """
    last = history.rows[-1]
    pass_costs = history.metadata.get("pass_costs")
    raw = [r["val_loss_raw"] for r in history.rows if r.get("val_loss_raw") is not None]
    early = {}
    if early_target is not None:
        early = {
            **_to_target(history, early_target, "val_loss", "early_target"),
            **_to_target(history, early_target, "val_loss_raw", "early_target_raw"),
        }
    return {
        **_to_target(history, target, "val_loss", "target"),
        **_to_target(history, target, "val_loss_raw", "target_raw"),
        **early,
        "final_val_loss": history.final_val_loss,
        "final_val_loss_raw": raw[-1] if raw else history.final_val_loss,
        "steps": int(last["step"]),
        "tokens": int(last["tokens"]),
        "grad_equivalents": grad_equivalents(history),
        "wall_time_s": float(last["wall_time"]),
        "cpu_time_s": last.get("cpu_time"),
        "cost_model": pass_costs.get("model") if isinstance(pass_costs, dict) else None,
        "status": history.status,
        "status_reason": history.reason,
    }

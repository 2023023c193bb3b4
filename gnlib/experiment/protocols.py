r"""Training protocols: the reference code's settings (``"paper"``) and gnlib's cheaper defaults (``"gnlib"``).

A protocol is a named set of optimizer options and evaluation settings that a :class:`~gnlib.experiment.runs.RunSpec`
starts from (``RunSpec.protocol``); any option the spec sets itself (not None) wins and is recorded as an
override. ``"paper"`` is the study's public code (natalieabreu/full-gauss-newton at 0c14e7e; docs/study.md,
section "Reference configuration", gives each value's file and line); ``"gnlib"`` keeps the library defaults.
docs/reproducing-the-paper.md tabulates both and says what each of gnlib's choices costs and changes;
tests/experiment/test_reference_conformance.py reads every setting off what ``"paper"`` builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from gnlib.data.pipeline import DEFAULT_VAL_BATCHES
from gnlib.distributed import world_size
from gnlib.optim.gn_options import line_search_grid
from gnlib.runtime import check_choice

PROTOCOLS = ("gnlib", "paper")

_GN_PAPER: dict[str, Any] = {
    "solver": "muon",
    "solver_options": {"bias_correction": True, "adamw_betas": (0.9, 0.999), "adamw_eps": 1e-8},
    "inner_schedule": "cosine",
    "warm_start": True,
    "prox": 0.0,
    "weight_decay": 1e-3,
    "weight_decay_scope": "except_muon",
    "grad_clip": 1.0,
    "grad_clip_per": "group",
    "line_search": line_search_grid(5),
    "line_search_batches": None,
    "line_search_accept": "argmin",
    "ema": 0.999,
}

#: ``protocol="paper"``: optimizer name → the options it starts from (see the module docstring).
PAPER_OPTIONS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0},
    "muon": {
        "momentum": 0.95,
        "nesterov": True,
        "bias_correction": True,
        "ns_steps": 5,
        "adjust_lr_fn": "original",
        "weight_decay": 0.0,
        "adamw_lr": None,
        "adamw_betas": (0.9, 0.95),
        "adamw_eps": 1e-8,
        "adamw_weight_decay": 1e-4,
        "grad_clip": 1.0,
    },
    "soap": {"betas": (0.9, 0.95), "weight_decay": 1e-4, "precondition_frequency": 10, "grad_clip": 1.0},
    "sgd": {},
    "gn": dict(_GN_PAPER),
    "gn_prox": dict(_GN_PAPER),
    "gn_layerwise": {**_GN_PAPER, "blocks": "per_layer_norm_with_last", "line_search": line_search_grid(10)},
    "gn_cg": {
        "line_search": line_search_grid(5),
        "line_search_batches": None,
        "line_search_accept": "argmin",
        "ema": 0.999,
    },
}

#: ``protocol="paper"``: validation sequences per preset (reference: 100 batches × 128 sequences, gn.py:825-852);
#: the CPU presets get a set their size affords.
PAPER_VAL_SEQUENCES: dict[str, int] = {
    "tiny": 128,
    "paper_tiny": 128,
    "small": 1024,
    "paper45m": 100 * 128,
    "paper150m": 100 * 128,
    "llama45m": 100 * 128,
    "llama150m": 100 * 128,
}

#: ``protocol="paper"``: GN evaluates every this many updates in the first half of a run (then every update).
PAPER_EVAL_EVERY = 10

#: ``protocol="gnlib"``: evaluation period of a spec that leaves ``eval_every`` unset.
GNLIB_EVAL_EVERY = 10


def paper_eval_schedule(steps: int, every: int = PAPER_EVAL_EVERY) -> Callable[[int], bool]:
    """The reference GN script's evaluations, as ``updates made -> bool`` for a run of ``steps`` updates.

    gn.py:825: after the update of loop index i (the (i + 1)-th update) it evaluates when
    ``(i % eval_freq == 0 and i <= total_steps * 0.5) or i > total_steps * 0.5`` (tpl: log_freq 1):
    after updates 1, 11, 21, ... then after every update.
    """
    return lambda step: step - 1 > steps * 0.5 or (step - 1) % every == 0


@dataclass
class Resolved:
    """What a protocol makes of a spec: the optimizer options and evaluation settings a run uses.

    Attributes:
        hyperparameters: the optimizer options (protocol values, then the spec's own on top).
        val_batches: validation batches of ``batch_size`` sequences per process.
        eval_every: evaluation period (the first-half period under ``"paper"``).
        eval_schedule: ``step -> bool``, or None for every ``eval_every`` steps.
        record: for the run's metadata: ``protocol``, ``from_protocol`` (options the protocol set and the
            spec left alone), ``overridden`` (name → ``{"protocol": value, "given": value}``).
    """

    hyperparameters: dict[str, Any]
    val_batches: int
    eval_every: int
    eval_schedule: Callable[[int], bool] | None = None
    record: dict[str, Any] = field(default_factory=dict)


def _merge(protocol: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[dict[str, Any], dict, dict]:
    """Protocol options with ``given`` on top (dict-valued options merged key by key); (merged, kept, overridden)."""
    merged, kept, overridden = dict(protocol), {}, {}
    for key, value in protocol.items():
        if isinstance(value, Mapping) and isinstance(given.get(key), Mapping):
            inner, inner_kept, inner_over = _merge(value, given[key])
            merged[key] = inner
            kept.update({f"{key}.{k}": v for k, v in inner_kept.items()})
            overridden.update({f"{key}.{k}": v for k, v in inner_over.items()})
        elif key in given and given[key] != value:
            overridden[key] = {"protocol": value, "given": given[key]}
        elif key not in given:
            kept[key] = value
    merged.update({k: v for k, v in given.items() if not (isinstance(v, Mapping) and k in protocol)})
    return merged, kept, overridden


class ProtocolSpec(Protocol):
    """The settings of a run :func:`resolve` reads: :class:`gnlib.experiment.runs.RunSpec` has every one."""

    protocol: str
    optimizer: str
    preset: str
    hyperparameters: Mapping[str, Any]
    batch_size: int
    steps: int
    eval_every: int | None
    val_batches: int | None


def resolve(spec: ProtocolSpec) -> Resolved:
    """The options and evaluation settings of ``spec`` (a RunSpec) under ``spec.protocol``.

    ``eval_every`` and ``val_batches`` left unset (None) take the protocol's value; set to any value, even
    the protocol's own, they win, as does every key of ``spec.hyperparameters``.

    Raises:
        ValueError: unknown protocol, naming the allowed ones.
    """
    check_choice("protocol", spec.protocol, PROTOCOLS)
    given = dict(spec.hyperparameters)
    if spec.protocol == "gnlib":
        record = {"protocol": "gnlib", "from_protocol": {}, "overridden": {}}
        val_batches = DEFAULT_VAL_BATCHES if spec.val_batches is None else spec.val_batches
        eval_every = GNLIB_EVAL_EVERY if spec.eval_every is None else spec.eval_every
        return Resolved(given, val_batches, eval_every, None, record)
    options = PAPER_OPTIONS.get(spec.optimizer, {})
    if given.get("solver") == "cg":
        options = PAPER_OPTIONS["gn_cg"]
    elif given.get("solver", "muon") != "muon":  # the protocol's solver options are Muon's
        options = {k: v for k, v in options.items() if k != "solver_options"}
    hyperparameters, kept, overridden = _merge(options, given)
    # under torchrun a batch holds batch_size sequences per process
    val_batches = math.ceil(PAPER_VAL_SEQUENCES[spec.preset] / (spec.batch_size * world_size()))
    gn = spec.optimizer.startswith("gn")
    run_settings = {"val_batches": val_batches, "eval_every": PAPER_EVAL_EVERY if gn else 1}
    for name, value in run_settings.items():
        given_value = getattr(spec, name)
        if given_value is None:
            kept[name] = value
            continue
        if given_value != value:
            overridden[name] = {"protocol": value, "given": given_value}
        run_settings[name] = given_value
    if gn:
        kept["eval_schedule"] = "after updates 1, 1 + eval_every, ... in the first half, then after every update"
    record = {"protocol": "paper", "from_protocol": kept, "overridden": overridden}
    schedule = paper_eval_schedule(spec.steps, run_settings["eval_every"]) if gn else None
    return Resolved(hyperparameters, run_settings["val_batches"], run_settings["eval_every"], schedule, record)

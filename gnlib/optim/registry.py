"""Every optimizer a run can name, each with one option schema and one constructor.

:data:`REGISTRY` maps a name to an :class:`OptimizerEntry`: the baselines (``adamw``, ``muon``, ``soap``,
``sgd``: :data:`gnlib.optim.factory.SCHEMAS`, built by :func:`~gnlib.optim.factory.make_optimizer`),
K-FAC (``kfac``: :class:`gnlib.optim.kfac_optimizer.KFAC`) and the Gauss-Newton variants (``gn``,
``gn_prox``, ``gn_layerwise``, ``gn_cg``: :data:`gnlib.optim.gauss_newton.VARIANT_SCHEMAS`, built by
:func:`~gnlib.optim.gauss_newton.make_gauss_newton`).
:func:`validate_options` checks a name, its LR and its options against the schema without building a
model (run specs, the command line and sweeps call it before any work starts); :func:`build_optimizer`
builds the optimizer, whose constructor checks the same schema. Option rules: :mod:`gnlib.optim.options`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from gnlib.optim.factory import SCHEMAS, make_optimizer
from gnlib.optim.gauss_newton import VARIANT_SCHEMAS, make_gauss_newton, variant_options
from gnlib.optim.kfac_optimizer import KFAC
from gnlib.optim.kfac_optimizer import SCHEMA as KFAC_SCHEMA
from gnlib.optim.options import Schema
from gnlib.runtime import check_choice


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer: its option schema, its constructor and whether it draws its own batches.

    Attributes:
        schema: the options, their defaults and rules (the LR is one of them: ``lr`` or ``inner_lr``).
        build: ``build(model, batches, lr, options)`` returns the optimizer.
        draws_batches: True for Gauss-Newton and K-FAC (they draw ``batches`` themselves; Gauss-Newton's
            ``lr`` is its inner LR); the train loop steps the others on its own batches.
        accumulation_option: the option a run's ``accumulation`` (micro-batches per step) sets, for an
            optimizer that draws its micro-batches itself (K-FAC's ``micro_batches``); None otherwise.
    """

    schema: Schema
    build: Callable[[nn.Module, Callable[[], Any], float, Mapping[str, Any]], Any]
    draws_batches: bool
    accumulation_option: str | None = None


def _baseline(name: str) -> OptimizerEntry:
    return OptimizerEntry(
        SCHEMAS[name], lambda model, batches, lr, options: make_optimizer(name, model, lr=lr, **options), False
    )


def _gauss_newton(name: str) -> OptimizerEntry:
    return OptimizerEntry(
        VARIANT_SCHEMAS[name],
        lambda model, batches, lr, options: make_gauss_newton(name, model, batches, lr, **options),
        True,
    )


#: Every optimizer by name: the baselines, K-FAC, then the Gauss-Newton variants.
REGISTRY: dict[str, OptimizerEntry] = {
    **{name: _baseline(name) for name in SCHEMAS},
    "kfac": OptimizerEntry(
        KFAC_SCHEMA, lambda model, batches, lr, options: KFAC(model, batches, lr=lr, **options), True, "micro_batches"
    ),
    **{name: _gauss_newton(name) for name in VARIANT_SCHEMAS},
}

#: Every optimizer a run can name.
OPTIMIZERS: tuple[str, ...] = tuple(REGISTRY)


def validate_options(name: str, lr: float | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check optimizer ``name`` with peak LR ``lr`` and further ``options``; return every option, defaults filled in.

    ``lr`` None checks the options at the schema's default LR.

    Raises:
        ValueError: unknown name, unknown option, or an invalid value, naming the option and the allowed values.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    entry = REGISTRY[name]
    if not isinstance(options, Mapping):
        raise ValueError(f"optimizer {name!r}: options must be a mapping (e.g. {{inner_steps: 4}}), got {options!r}")
    if name in VARIANT_SCHEMAS:
        return entry.schema.validate(variant_options(lr, options, name))
    if "lr" in options:
        raise ValueError(f"optimizer {name!r}: lr is set by the run's lr, not among its options")
    return entry.schema.validate({**options, **({} if lr is None else {"lr": lr})})


def check_notebook_optimizers(parameters: Mapping[str, Any]) -> None:
    """Check the optimizer settings among a notebook's parameters against the schemas; builds nothing.

    Follows the workbook notebooks' parameter names: ``optimizer`` or ``optimizers`` (a name or a list
    of names); the LR from ``lr`` when it is > 0, else ``learning_rates[name]`` or every LR of
    ``lr_grids[name]`` (neither: the schema's default); the options from ``hyperparameters[name]``. A
    notebook without these parameters passes unchecked.

    Raises:
        ValueError: an unknown optimizer name, or an option or LR its schema refuses (naming both).
    """
    names = parameters.get("optimizers", parameters.get("optimizer"))
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list):
        return
    per_name = parameters.get("hyperparameters") or {}
    for name in names:
        check_choice("optimizers", name, OPTIMIZERS)
        options = per_name.get(name, {}) if isinstance(per_name, Mapping) else {}
        lr = parameters.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
            lrs = [lr]
        elif name in (parameters.get("learning_rates") or {}):
            lrs = [parameters["learning_rates"][name]]
        else:
            lrs = list((parameters.get("lr_grids") or {}).get(name, [None]))
        for value in lrs:
            validate_options(name, value, options)


def build_optimizer(
    name: str,
    model: nn.Module,
    batches: Callable[[], Any],
    lr: float,
    hyperparameters: Mapping[str, Any],
    accumulation: int = 1,
) -> Any:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``model``, peak LR ``lr``.

    Baselines are stepped by the train loop on its batches, ``accumulation`` micro-batches a step;
    Gauss-Newton variants and K-FAC draw ``batches`` themselves (Gauss-Newton's ``lr`` is its inner LR;
    K-FAC takes ``accumulation`` as its ``micro_batches``).
    """
    check_choice("optimizer", name, OPTIMIZERS)
    entry = REGISTRY[name]
    if entry.accumulation_option is not None:
        hyperparameters = {**hyperparameters, entry.accumulation_option: accumulation}
    return entry.build(model, batches, lr, hyperparameters)

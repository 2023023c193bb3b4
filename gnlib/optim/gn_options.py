"""The options of :class:`~gnlib.optim.gauss_newton.GaussNewton`: each with its default and its rule.

:class:`GaussNewtonOptions` holds the defaults (the one place they are defined), :data:`GN_SCHEMA` the rule
of each and the checks across options; :data:`GN_VARIANTS` names the variants ``gnlib.experiment.runs`` builds (full
GN, prox-linear, layerwise, Hessian-free CG), each with :data:`VARIANT_SCHEMAS` fixing what defines it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from gnlib.checks import FLAG, Rule, choice, integer, number, optional
from gnlib.curvature.blocks import PARTITION_SPECS
from gnlib.curvature.costs import check_pass_costs
from gnlib.losses import Loss
from gnlib.optim.factory import SCHEMAS as BASELINES
from gnlib.optim.options import Schema
from gnlib.runtime import invalid, is_finite_number, is_integer

OBJECTIVES = ("gn", "prox_linear")
SOLVERS = ("muon", "adamw", "sgd", "cg")
INNER_SCHEDULES = ("cosine", "constant")
LINE_SEARCH_ACCEPT = ("decrease", "argmin")
CLIP_PER = ("block", "group")
WEIGHT_DECAY_SCOPES = ("all", "except_muon")


def line_search_grid(n: int) -> tuple[float, ...]:
    """The reference's line-search grid α_i = 2^(−i/2), i = 0..n−1 (``ls_range`` = n, gn.py:759-807)."""
    if not is_integer(n) or n < 1:
        raise invalid("", "n", n, "an integer >= 1")
    return tuple(2 ** (-i / 2) for i in range(n))


#: Inner-solver settings that differ from :data:`gnlib.optim.factory.DEFAULTS`: the study's betas.
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.999)},
    "muon": {"adamw_betas": (0.9, 0.999), "ns_dtype": "float32"},
    "sgd": {},
}
DEFAULT_INNER_LR = {"muon": 0.01, "adamw": 0.01, "sgd": 0.01, "cg": 1.0}
DEFAULT_DAMPING = 1.0


#: The study's line-search grid: α ∈ {1, 2^-1/2, 1/2, 2^-3/2, 1/4} (with ``line_search_accept="decrease"``,
#: α = 0, rejecting, is also tried).
LINE_SEARCH = line_search_grid(5)


@dataclass(frozen=True, kw_only=True)
class GaussNewtonOptions:
    """Every option of :class:`~gnlib.optim.gauss_newton.GaussNewton`, with its default.

    Attributes:
        objective: ``"gn"`` (quadratic model) or ``"prox_linear"`` (loss of the linearized model).
        blocks: ``None`` / ``"full"`` (full GN), ``"per_layer"`` (the study's layerwise partition),
            ``"per_tensor"``, ``"halves"`` or a partition dict (:func:`gnlib.curvature.blocks.resolve_partition`).
        layerwise_slots: with several blocks and a model with its own forward-mode rules, at most this
            many blocks' tangents per forward (:func:`gnlib.curvature.layerwise_inner_steps`); None: all
            in one. Lower it when the stacked tangents do not fit in memory.
        solver: ``"muon"``, ``"adamw"``, ``"sgd"`` (first-order inner solvers) or ``"cg"`` (Hessian-free).
        inner_steps: N, inner steps (first-order) or batches concatenated for CG, per outer step.
        inner_lr: peak inner LR (first-order; default 0.01) or CG step scale (default 1.0); the initial
            ``"lr"`` of every param group.
        inner_schedule: ``"cosine"`` (decay to 0 within each inner loop) or ``"constant"``.
        warm_start: start each inner loop from the previous pre-line-search iterate and inner state.
        prox: λ_prox of the proximal penalty λ_prox·Σ_tensors mean(Δ²) (first-order solvers).
        weight_decay: decoupled weight decay of the inner iterate θ_t + Δ (first-order solvers).
        weight_decay_scope: the tensors the weight decay applies to: ``"all"``, or ``"except_muon"`` (all
            but Muon's matrices, as the reference).
        grad_clip: clip the inner gradient to this global norm (first-order solvers); None disables.
        grad_clip_per: one norm per ``"block"``, or per ``"group"`` (embedding/head, hidden) within a block.
        line_search: grid of step sizes α > 0 (:func:`line_search_grid`), or None for α = 1 without a test.
        line_search_batches: fresh batches on which the line search evaluates the true loss (None: N).
        line_search_accept: ``"decrease"`` (reject unless the loss decreases) or ``"argmin"`` (always take
            the best α of the grid).
        ema: β of an EMA of the outer iterates for :meth:`eval_parameters`, or None.
        damping: initial λ for ``solver="cg"`` (default 1.0); not used by the other solvers.
        cg_iters: CG iteration cap per block.
        cg_tol: CG stops at relative residual ‖r‖/‖g‖ ≤ cg_tol.
        cg_progress_tol: ε of Martens's relative-progress stopping rule (0 disables).
        cg_backtrack: backtrack over the kept CG iterates on the true loss of the CG batch.
        solver_options: extra hyperparameters of the inner optimizer (:func:`gnlib.optim.make_optimizer`
            of the solver, e.g. ``{"momentum": 0.0}`` for sgd, ``{"adamw_lr": 3e-3}`` for muon); the
            solver's ``lr`` and ``weight_decay`` are set by ``inner_lr`` and ``weight_decay``.
        pass_costs: weights of forward / tangent / backward passes in gradient-step equivalents, a dict
            with keys ``forward``, ``tangent``, ``backward`` (:mod:`gnlib.curvature.costs`; default, None: the
            FLOP model :data:`~gnlib.curvature.costs.FLOP_PASS_COSTS`; e.g.
            :func:`~gnlib.curvature.costs.measure_pass_costs`'s).
        loss: the training loss (default :class:`~gnlib.losses.CrossEntropy`).
    """

    objective: str = "gn"
    blocks: str | Mapping[str, list[str]] | None = None
    layerwise_slots: int | None = None
    solver: str = "muon"
    inner_steps: int = 8
    inner_lr: float | None = None
    inner_schedule: str = "cosine"
    warm_start: bool = True
    prox: float = 0.0
    weight_decay: float = 0.0
    weight_decay_scope: str = "all"
    grad_clip: float | None = 1.0
    grad_clip_per: str = "block"
    line_search: Sequence[float] | None = LINE_SEARCH
    line_search_batches: int | None = 2
    line_search_accept: str = "decrease"
    ema: float | None = None
    damping: float | None = None
    cg_iters: int = 50
    cg_tol: float = 1e-4
    cg_progress_tol: float = 5e-4
    cg_backtrack: bool = True
    solver_options: Mapping[str, Any] | None = None
    pass_costs: Mapping[str, float] | None = None
    loss: Loss | None = None


#: Named variants for ``gnlib.experiment.runs``: name → the GaussNewton options that define it.
GN_VARIANTS: dict[str, dict[str, Any]] = {
    "gn": {},
    "gn_prox": {"objective": "prox_linear"},
    "gn_layerwise": {"blocks": "per_layer"},
    "gn_cg": {"solver": "cg"},
}


#: Other values a variant accepts for an option it fixes: layerwise GN may place the final norm with the last block.
VARIANT_ALTERNATIVES: dict[tuple[str, str], tuple[Any, ...]] = {
    ("gn_layerwise", "blocks"): ("per_layer_norm_with_last",),
}


def _is_grid(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(is_finite_number(a) and a > 0 for a in value)
        and len(set(value)) == len(value)
    )


def _check_solver_combinations(options: dict[str, Any], owner: str) -> None:
    """Options that only some solvers take; the inner solver's own options (its baseline schema)."""
    solver = options["solver"]
    if options["damping"] is not None and solver != "cg":
        raise invalid(
            owner,
            "damping",
            options["damping"],
            "None, or a finite number >= 0 with solver='cg' (first-order solvers use prox instead)",
        )
    if solver == "cg" and (options["prox"] or options["weight_decay"]):
        given = "prox" if options["prox"] else "weight_decay"
        raise invalid(owner, given, options[given], "0 with solver='cg' (CG is regularized by damping)")
    if solver == "cg" and options["objective"] != "gn":
        raise invalid(
            owner,
            "objective",
            options["objective"],
            "'gn' with solver='cg' (CG solves the quadratic), or a first-order solver for 'prox_linear'",
        )
    solver_options = dict(options["solver_options"] or {})
    fixed = sorted({"lr", "weight_decay", "adamw_weight_decay", "grad_clip"} & set(solver_options))
    if fixed or (solver == "cg" and solver_options):
        raise invalid(
            owner,
            "solver_options",
            options["solver_options"],
            "a dict of the inner optimizer's other hyperparameters (inner_lr, weight_decay and grad_clip "
            "set lr, weight decay and clipping; none for solver='cg')",
        )
    if solver != "cg":
        BASELINES[solver].validate({**SOLVER_DEFAULTS[solver], **solver_options})
    if options["pass_costs"] is not None:
        check_pass_costs(options["pass_costs"])


def _gn_schema(name: str, fixed: Mapping[str, Any], alternatives: Mapping[str, tuple[Any, ...]]) -> Schema:
    """The options of :class:`~gnlib.optim.gauss_newton.GaussNewton` as optimizer ``name``.

    ``fixed`` options are set and accept only their value (or one of ``alternatives[option]``).
    """
    defaults = {f.name: f.default for f in fields(GaussNewtonOptions)}
    rules = dict(_GN_RULES)
    for key, value in fixed.items():
        allowed = (value, *alternatives.get(key, ()))
        rules[key] = Rule(
            lambda v, allowed=allowed: any(v == a and type(v) is type(a) for a in allowed),
            f"{' or '.join(map(repr, allowed))} ({name!r} fixes {key}: pick another variant of "
            f"{list(GN_VARIANTS)} or use GaussNewton directly)",
        )
    return Schema(
        name,
        defaults={**defaults, **fixed},
        rules=rules,
        checks=(lambda options: _check_solver_combinations(options, f"optimizer {name!r}"),),
    )


_GN_RULES: dict[str, Rule] = {
    "objective": choice(OBJECTIVES),
    "blocks": Rule(
        lambda v: v is None or v in PARTITION_SPECS or isinstance(v, Mapping),
        f"None, one of {PARTITION_SPECS}, or a dict block -> tensor names",
    ),
    "solver": choice(SOLVERS),
    "inner_steps": integer(1),
    "inner_lr": optional(number(0, strict=True)),
    "inner_schedule": choice(INNER_SCHEDULES),
    "warm_start": FLAG,
    "prox": number(0),
    "weight_decay": number(0),
    "weight_decay_scope": choice(WEIGHT_DECAY_SCOPES),
    "grad_clip": optional(number(0, strict=True)),
    "grad_clip_per": choice(CLIP_PER),
    "line_search": Rule(
        lambda v: v is None or _is_grid(v),
        "None or a non-empty sequence of distinct finite step sizes > 0 (α = 0 is always tried)",
    ),
    "line_search_batches": Rule(
        lambda v: v is None or (is_integer(v) and v >= 1), "an integer >= 1, or None for inner_steps"
    ),
    "line_search_accept": choice(LINE_SEARCH_ACCEPT),
    "layerwise_slots": optional(integer(1)),
    "ema": optional(number(0, strict=True, below=1)),
    "damping": optional(number(0)),
    "cg_iters": integer(1),
    "cg_tol": number(0),
    "cg_progress_tol": number(0),
    "cg_backtrack": FLAG,
    "solver_options": Rule(
        lambda v: v is None or isinstance(v, Mapping), "None or a dict of the inner optimizer's hyperparameters"
    ),
    "pass_costs": Rule(
        lambda v: v is None or isinstance(v, Mapping), "None or a dict with keys forward, tangent, backward"
    ),
    "loss": Rule(lambda v: v is None or isinstance(v, Loss), "None or a gnlib.losses.Loss"),
}

#: :class:`GaussNewton`'s options used directly: the defaults of :class:`GaussNewtonOptions`, each with its rule.
GN_SCHEMA = _gn_schema("GaussNewton", {}, {})

#: Each variant's options: :data:`GN_SCHEMA` with the options of :data:`GN_VARIANTS` fixed.
VARIANT_SCHEMAS: dict[str, Schema] = {
    name: _gn_schema(name, fixed, {k: v for (variant, k), v in VARIANT_ALTERNATIVES.items() if variant == name})
    for name, fixed in GN_VARIANTS.items()
}


def variant_options(lr: float, hyperparameters: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The options of variant ``name`` given its ``lr`` (``inner_lr``) and further ``hyperparameters``."""
    if "inner_lr" in hyperparameters:
        raise ValueError(f"optimizer {name!r} got unknown option(s) ['inner_lr']; its lr sets the inner LR")
    return {**hyperparameters, "inner_lr": lr}

"""Every method's direction at one point, and how close each comes to the exact Gauss-Newton direction.

:func:`standard_directions` computes the directions of :data:`METHODS` from one batch's statistics;
:func:`compare_directions` tabulates each one's cosine with exact GN and its reduction of the damped GN
quadratic at the best step, as a ratio to exact GN's (in [0, 1], blind to the direction's scale).
docs/directions.md has the methods and the comparison maths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from torch import Tensor, nn

from gnlib.curvature import gradient
from gnlib.curvature.blocks import block_indices, resolve_partition
from gnlib.losses import CrossEntropy, Loss
from gnlib.optim.directions import (
    Batch,
    Vector,
    _check_damping,
    _check_vector,
    _flat,
    _size,
    adam_direction,
    curvature_diagonal,
    diagonal_direction,
    gn_direction,
    kronecker_statistics,
    layerwise_gn_direction,
    muon_direction,
    per_sample_gradients,
    second_moment,
    shampoo_direction,
    soap_direction,
)
from gnlib.optim.kfac import kfac_direction, kfac_factors
from gnlib.params import Params, unflatten

METHODS = ("exact GN", "layerwise GN", "diagonal GGN", "K-FAC", "Shampoo", "SOAP", "Adam", "Muon", "gradient")


def standard_directions(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    curvature: Any,
    damping: float,
    *,
    loss: Loss = CrossEntropy(),
    partition: str | Mapping[str, list[str]] = "per_layer",
    adam_eps: float = 1e-8,
    shampoo_eps: float = 1e-6,
    kfac_fisher: str = "mc",
    kfac_samples: int = 16,
    ns_steps: int | None = 5,
    diagonal_probes: int | None = None,
    seed: int = 0,
    tol: float = 1e-10,
    max_iter: int | None = None,
) -> tuple[Params, dict[str, Params]]:
    """The gradient and the direction of every method of :data:`METHODS` (docs/directions.md) at ``params``.

    All statistics come from ``batch``: g and the per-sample gradients (Adam's v, Shampoo's and SOAP's
    L and R), diag(G) (exact, or ``diagonal_probes`` Rademacher probes for an operator), K-FAC factors
    from ``kfac_samples`` sampled targets (``kfac_fisher``). "gradient" is −g, for reference.

    Args:
        model: the model.
        params: where the directions are taken.
        batch: the batch every statistic comes from.
        curvature: the GGN on ``batch`` (dense tensor or operator).
        damping: λ of exact GN, layerwise GN, diagonal GGN and K-FAC.
        loss: the training loss.
        partition: blocks of layerwise GN (a :func:`gnlib.curvature.blocks.resolve_partition` spec).
        adam_eps: ε of Adam, SOAP, and the Adam parts of Shampoo and Muon.
        shampoo_eps: Shampoo's relative ε.
        kfac_fisher: ``fisher`` of :func:`~gnlib.optim.kfac.kfac_factors`.
        kfac_samples: ``mc_samples`` of :func:`~gnlib.optim.kfac.kfac_factors`.
        ns_steps: Muon's Newton-Schulz steps (None: exact polar factor).
        diagonal_probes: see :func:`~gnlib.optim.directions.curvature_diagonal`.
        seed: seeds K-FAC's samples and the diagonal's probes.
        tol: relative residual of the conjugate-gradient solves (operator ``curvature`` only).
        max_iter: iteration cap of those solves.

    Returns:
        ``(g, directions)``: the gradient and method name → direction, all params dicts.
    """
    _, g = gradient(model, params, batch, loss)
    samples = per_sample_gradients(model, params, batch, loss)
    v = second_moment(samples)
    statistics = kronecker_statistics(samples)
    diagonal = unflatten(curvature_diagonal(curvature, n_probes=diagonal_probes, seed=seed), g)
    factors = kfac_factors(model, params, batch, loss, fisher=kfac_fisher, mc_samples=kfac_samples, seed=seed)
    layers = resolve_partition(partition, params)
    directions = {
        "exact GN": gn_direction(curvature, g, damping, tol=tol, max_iter=max_iter),
        "layerwise GN": layerwise_gn_direction(curvature, g, layers, params, damping, tol=tol, max_iter=max_iter),
        "diagonal GGN": diagonal_direction(diagonal, g, damping),
        "K-FAC": kfac_direction(g, factors, damping, diagonal),
        "Shampoo": shampoo_direction(g, statistics, v, eps=shampoo_eps, adam_eps=adam_eps),
        "SOAP": soap_direction(g, statistics, samples, eps=adam_eps),
        "Adam": adam_direction(v, g, adam_eps),
        "Muon": muon_direction(g, v, ns_steps=ns_steps, eps=adam_eps),
        "gradient": {name: -t for name, t in g.items()},
    }
    return g, directions


# ---------------------------------------------------------------------------------------------------
# comparison


def cosine(a: Vector, b: Vector) -> float:
    """aᵀb / (‖a‖‖b‖) of two vectors (dicts or tensors of any one shape); nan when either is zero."""
    flat_a, flat_b = _flat(a).reshape(-1), _flat(b).reshape(-1)
    norms = flat_a.norm() * flat_b.norm()
    return float("nan") if norms == 0 else (flat_a @ flat_b / norms).item()


def blockwise_cosine(
    a: Vector, b: Vector, partition: Mapping[str, list[str]], params_like: nn.Module | Mapping[str, Tensor]
) -> dict[str, float]:
    """Cosine of the two vectors restricted to each block of ``partition`` (block name → cosine)."""
    flat_a, flat_b = _flat(a), _flat(b)
    return {
        block: cosine(flat_a[index.to(flat_a.device)], flat_b[index.to(flat_b.device)])
        for block, index in block_indices(partition, params_like).items()
    }


def quadratic_reduction(curvature: Any, g: Vector, d: Vector, damping: float) -> float:
    """Decrease of the damped GN quadratic m(αd) at the best step: (gᵀd)² / (2 dᵀ(C + λI)d) (0 for d = 0)."""
    _check_damping(damping)
    flat_g, flat_d = _flat(g), _flat(d)
    _check_vector(flat_d, _size(curvature), "d")
    curvature_d = (curvature @ flat_d) @ flat_d + damping * flat_d @ flat_d
    if curvature_d == 0:
        return 0.0
    return ((flat_g @ flat_d) ** 2 / (2 * curvature_d)).item()


def compare_directions(
    directions: Mapping[str, Vector], exact: Vector, curvature: Any, g: Vector, damping: float
) -> pd.DataFrame:
    """A table comparing each direction with the exact one on the damped GN quadratic.

    Returns:
        One row per direction: ``method``, ``cosine`` with ``exact``, ``reduction``
        (:func:`quadratic_reduction`), ``reduction_ratio`` (to the exact direction's reduction, in [0, 1])
        and ``descent`` (gᵀd < 0).

    Raises:
        ValueError: the exact direction does not reduce the quadratic (zero gradient).
    """
    best = quadratic_reduction(curvature, g, exact, damping)
    if best <= 0:
        raise ValueError("the exact direction reduces the quadratic by 0: is the gradient zero?")
    rows = []
    for method, d in directions.items():
        reduction = quadratic_reduction(curvature, g, d, damping)
        rows.append(
            {
                "method": method,
                "cosine": cosine(d, exact),
                "reduction": reduction,
                "reduction_ratio": reduction / best,
                "descent": bool(_flat(g) @ _flat(d) < 0),
            }
        )
    return pd.DataFrame(rows)

"""The line search of a Gauss-Newton step: the true loss and the model's prediction along θ_t + αd, and α.

On each batch one forward carrying the direction gives z_t and Jd, so the GN model
m(α) = ℓ(z_t) + α g_zᵀJd + ½α²(Jd)ᵀH_z(Jd) (prox-linear: ℓ(z_t + αJd)) costs no extra pass per α; the
true loss costs one forward per α. All values are read to the host once, after every forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.curvature import logits, outputs_and_jvp
from gnlib.distributed import all_reduce_mean
from gnlib.losses import Loss
from gnlib.params import Params, flatten

Batch = tuple[Tensor, Tensor]


@dataclass
class PassCount:
    """Passes over source-sized batches, and tokens drawn, during one outer step (or one line search)."""

    forward: int = 0
    tangent: int = 0
    backward: int = 0
    tokens: int = 0


def anchor_loss(model: nn.Module, loss: Loss, params: Params, batch: Batch, cost: PassCount, weight: int = 1) -> float:
    """ℓ(f(params; x), y) on ``batch``, averaged over processes; counts ``weight`` forwards in ``cost``."""
    cost.forward += weight
    return all_reduce_mean(float(loss.value(logits(model, params, batch[0]), batch[1])))


def all_finite(*tensors: Tensor) -> Tensor:
    """Whether every entry is finite, as a bool tensor on the tensors' device: no host sync."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def line_search(
    model: nn.Module,
    loss: Loss,
    anchor: Params,
    direction: Params | None,
    batches: Sequence[Batch],
    *,
    grid: Sequence[float] | None,
    accept: str = "decrease",
    objective: str = "gn",
    cost: PassCount | None = None,
) -> dict[str, Any]:
    """The step size α of ``grid`` with the lowest true loss on ``batches`` along θ_t + αd, or a rejection.

    Args:
        model: the model (its own parameter values are not used).
        loss: the training loss.
        anchor: θ_t, a params dict.
        direction: d, a params dict over the same names (None: the solve gave a non-finite direction).
        batches: the line search's fresh batches (the same for every α).
        grid: step sizes α > 0; None takes α = 1 without the test (never rejected for no decrease).
        accept: ``"decrease"`` rejects unless the best α lowers the loss; ``"argmin"`` always takes it.
        objective: ``"gn"`` or ``"prox_linear"``: the model whose prediction is reported.
        cost: passes are added to it (a fresh count when None).

    Returns:
        ``alpha`` (0 when rejected), ``loss`` (at the taken point), ``loss_before``, ``predicted_reduction``,
        ``actual_reduction``, ``rho`` (their ratio), ``direction_norm`` and ``reason`` (None, ``"nonfinite"``
        or ``"no_decrease"``).
    """
    cost = PassCount() if cost is None else cost
    out = {"loss_before": None, "alpha": 0.0, "predicted_reduction": None, "actual_reduction": None, "rho": None}
    out.update(direction_norm=None, reason="nonfinite")
    finite = False
    if direction is not None:  # one host read: whether d is finite, and its norm
        norm = torch.linalg.vector_norm(flatten(direction))
        finite, norm = torch.stack([all_finite(*direction.values()).to(norm), norm]).tolist()
    if not finite:
        values = [anchor_loss(model, loss, anchor, b, cost) for b in batches]
        out["loss"] = out["loss_before"] = sum(values) / len(values)
        return out
    out["direction_norm"] = norm
    steps = tuple(grid) if grid is not None else (1.0,)
    before, model_at, losses = _losses_along(model, loss, anchor, direction, batches, steps, objective, cost)
    out["loss"] = out["loss_before"] = before
    if not all(math.isfinite(v) for v in (before, *losses.values(), *model_at.values())):
        return out
    best = min(steps, key=lambda a: losses[a])
    predicted, actual = before - model_at[best], before - losses[best]
    out.update(alpha=best, predicted_reduction=predicted, actual_reduction=actual)
    out["rho"] = actual / predicted if predicted != 0 else None
    if grid is not None and accept == "decrease" and not losses[best] < before:
        out["reason"] = "no_decrease"
        return out
    out["reason"], out["loss"] = None, losses[best]
    return out


def _losses_along(
    model: nn.Module,
    loss: Loss,
    anchor: Params,
    direction: Params,
    batches: Sequence[Batch],
    steps: Sequence[float],
    objective: str,
    cost: PassCount,
) -> tuple[float, dict[float, float], dict[float, float]]:
    """Mean over batches (and processes) of ℓ at θ_t, and per α the model's prediction and the true loss."""
    rows = []  # per batch: loss at θ_t, then per α the model's prediction and the loss at θ_t + αd
    for inputs, targets in batches:
        z, jd = outputs_and_jvp(model, anchor, inputs, direction)
        cost.forward, cost.tangent = cost.forward + 1, cost.tangent + 1
        with torch.no_grad():
            if objective == "gn":  # m(α) = ℓ + α gᵀJd + ½α² (Jd)ᵀH(Jd): three numbers serve every α
                value, slope, bend = loss.quadratic_along(z, targets, jd)
                predicted = [value + a * slope + 0.5 * a * a * bend for a in steps]
            else:
                value = loss.value(z, targets)
                predicted = [loss.value(torch.add(z, jd, alpha=a), targets) for a in steps]
            row = [value]
            for a, m in zip(steps, predicted):
                point = {n: anchor[n] + a * direction[n] for n in anchor}
                row += [m, loss.value(functional_call(model, point, (inputs,)), targets)]
                cost.forward += 1
        rows.append(torch.stack(row))
    before, *pairs = all_reduce_mean(torch.stack(rows).double().mean(0)).tolist()  # the search's one host read
    return before, dict(zip(steps, pairs[0::2])), dict(zip(steps, pairs[1::2]))

"""Jacobian, GGN and Hessian products of a model's loss, one pass at a time, and the Gauss-Newton inner step.

Every function takes ``model``, ``params`` (a params dict in ``named_parameters()`` order) and ``batch =
(inputs, targets)``; vectors name all parameters or a subset (the others held fixed). :func:`gn_inner_step`,
:func:`ggn_vp` and :func:`jvp` make one forward carrying the tangent (the model's own rules where it has them,
else ``torch.autograd.forward_ad``) and one backward; docs/architecture.md gives the notation and the costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.curvature.passes import (
    DEFAULT_LOSS,
    OBJECTIVES,
    Batch,
    _backward,
    _check_output,
    _check_params,
    _check_params_vector,
    _check_wrt,
    _forward,
    _GradientGraph,
    _shifted,
)
from gnlib.losses import Loss
from gnlib.params import Params
from gnlib.runtime import check_choice

# ---------------------------------------------------------------------------------------------------
# one-shot products


def logits(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """Outputs z = f(θ; x) (logits), without a graph."""
    _check_params(model, params)
    with torch.no_grad():
        return functional_call(model, dict(params), (inputs,))


def gradient(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, loss: Loss = DEFAULT_LOSS
) -> tuple[Tensor, Params]:
    """(ℓ(f(θ)), ∇_θ ℓ) on ``batch``: one forward and one backward (Jᵀ g_z)."""
    _check_params(model, params)
    inputs, targets = batch
    z, _, leaves = _forward(model, dict(params), inputs, list(params))
    value, g = loss.value_and_grad(z.detach(), targets)
    return value, _backward(z, leaves, g, list(params))


def jvp(model: nn.Module, params: Mapping[str, Tensor], batch: Batch, v: Mapping[str, Tensor]) -> Tensor:
    """J v, shape of z (one forward carrying the tangent ``v``; no graph is recorded)."""
    return outputs_and_jvp(model, params, batch[0], v)[1]


def outputs_and_jvp(
    model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, v: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """(z, J v): the outputs and their tangent along ``v``, from one forward carrying it; no graph is recorded.

    z + α J v is the linearized model at the step αv (the Gauss-Newton line search's prediction).
    """
    _check_params(model, params)
    _check_params_vector(v, params, "v")
    with torch.no_grad():
        z, jv, _ = _forward(model, dict(params), inputs, list(v), v)
        return z, jv


def vjp(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, u: Tensor, wrt: Sequence[str] | None = None
) -> Params:
    """Jᵀ u for an output-space ``u`` (shape of z), as a params dict over ``wrt`` (default: all parameters)."""
    _check_params(model, params)
    wrt = _check_wrt(params, wrt)
    z, _, leaves = _forward(model, dict(params), batch[0], wrt)
    _check_output(u, z, "u")
    return _backward(z, leaves, u.detach(), wrt)


def ggn_vp(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, v: Mapping[str, Tensor], loss: Loss = DEFAULT_LOSS
) -> Params:
    """G v = Jᵀ H_z J v: one tangent-carrying forward and one backward (over the names of ``v``)."""
    _check_params(model, params)
    _check_params_vector(v, params, "v")
    inputs, targets = batch
    z, jv, leaves = _forward(model, dict(params), inputs, list(v), v)
    return _backward(z, leaves, loss.hvp(z.detach(), targets, jv), list(v))


def hvp(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, v: Mapping[str, Tensor], loss: Loss = DEFAULT_LOSS
) -> Params:
    """H v with the true Hessian of ℓ(f(θ)) (over the names of ``v``).

    Reverse-over-reverse: a backward that records its own graph gives ∇ℓ as a function of θ, then one
    more backward gives ∂⟨∇ℓ, v⟩/∂θ = H v. On the CPU this measured faster than forward-over-reverse
    (``torch.func.jvp`` of ``torch.func.grad``, which :func:`dense_hessian` uses).
    """
    _check_params(model, params)
    _check_params_vector(v, params, "v")
    return _GradientGraph(model, dict(params), batch, loss, list(v)).hvp(v, retain=False)


# ---------------------------------------------------------------------------------------------------
# the Gauss-Newton inner step


def gn_inner_step(
    model: nn.Module,
    anchor: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    batch: Batch,
    loss: Loss = DEFAULT_LOSS,
    objective: str = "gn",
) -> tuple[Tensor, Params]:
    """Value and Δ-gradient of the inner objective at the step Δ = ``delta`` from the anchor θ_t.

    With z_t = f(θ_t), J at θ_t, g_z and H_z at z_t:

    - ``"gn"``: q(Δ) = ℓ(z_t) + g_zᵀJΔ + ½(JΔ)ᵀH_z(JΔ), gradient Jᵀ(g_z + H_z JΔ);
    - ``"prox_linear"``: ℓ(z_t + JΔ), gradient Jᵀ∇ℓ(z_t + JΔ);
    - ``"loss"``: the true loss ℓ(f(θ_t + Δ)) and its gradient (the reference; one plain gradient step).

    The first two cost one forward at θ_t carrying the tangent Δ (giving z_t and JΔ), the output-space
    vector u from the loss in closed form, and one backward Jᵀu through the primal graph.
    ``delta`` may name a subset of the parameters (layerwise GN: the model is linearized in those only).

    Returns:
        ``(value, gradient)``: a scalar tensor and a params dict over the names of ``delta``.

    Raises:
        ValueError: unknown ``objective``, or ``anchor``/``delta`` not matching the model's parameters.
    """
    check_choice("objective", objective, OBJECTIVES)
    _check_params(model, anchor)
    _check_params_vector(delta, anchor, "delta")
    inputs, targets = batch
    names = list(delta)
    if objective == "loss":
        point = dict(anchor)
        point.update({name: anchor[name].detach() + d.detach() for name, d in delta.items()})
        z, _, leaves = _forward(model, point, inputs, names)
        value, u = loss.value_and_grad(z.detach(), targets)
    else:
        z, jd, leaves = _forward(model, dict(anchor), inputs, names, delta)
        with torch.no_grad():
            if objective == "gn":
                value, u = loss.quadratic(z.detach(), targets, jd)
            else:
                owned = getattr(model, "computes_jvp", False)  # dual numbers' J·Δ may share memory with Δ
                value, u = loss.value_and_grad(_shifted(z.detach(), jd, owned), targets)
    return value, _backward(z, leaves, u, names)

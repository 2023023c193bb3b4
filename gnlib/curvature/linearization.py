"""A linearization at θ kept for repeated products: one forward and backward, then each G·v or H·v by backward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from gnlib.curvature.passes import (
    DEFAULT_LOSS,
    Batch,
    _backward,
    _check_output,
    _check_params,
    _check_params_vector,
    _check_wrt,
    _forward,
    _grad_of_sum,
)
from gnlib.losses import Loss
from gnlib.params import Params, check_like

# ---------------------------------------------------------------------------------------------------
# cached linearization


class Linearization:
    """The model linearized at θ on one batch, for many products on that batch (CG, Lanczos, spectra).

    Built by :func:`linearize` from one forward (keeping its reverse graph, which gives Jᵀu) and one
    backward that records its own graph: Jᵀw as a function of an output-space w. Since Jᵀw is linear
    in w, differentiating ⟨Jᵀw, v⟩ in w gives J v (the "double-backward" JVP). Neither product
    repeats the forward, so ``ggn_vp`` costs two backward passes; both graphs stay in memory (about
    2.5x the activations of a gradient step). Products are over the parameters named in ``wrt``.

    Attributes:
        z: outputs at θ, shape (..., V), detached.
        value: loss ℓ(z) (scalar tensor).
        wrt: names of the parameters the products act on.
    """

    def __init__(self, model: nn.Module, params: Params, batch: Batch, loss: Loss, wrt: list[str]) -> None:
        """See :func:`linearize`."""
        inputs, self.targets = batch
        self.loss = loss
        self.wrt = wrt
        self.like = {name: params[name].detach() for name in wrt}
        self._z_graph, _, self._leaves = _forward(model, params, inputs, wrt)
        self.z = self._z_graph.detach()
        self.value, self._g = loss.value_and_grad(self.z, self.targets)
        self._w = torch.zeros_like(self.z, requires_grad=True)
        jt_w = torch.autograd.grad(self._z_graph, self._leaves, self._w, create_graph=True, allow_unused=True)
        self._jt_w = dict(zip(wrt, jt_w))
        self._gradient: Params | None = None

    def jvp(self, v: Mapping[str, Tensor]) -> Tensor:
        """J v, shape of z; ``v`` is a params dict over ``wrt``."""
        _check_params_vector(v, self.like, "v")
        check_like(v, self.like, "v")
        return _grad_of_sum(self._jt_w, v, [self._w], retain=True)[0]

    def vjp(self, u: Tensor) -> Params:
        """Jᵀ u for ``u`` of the shape of z, as a params dict over ``wrt``."""
        _check_output(u, self.z, "u")
        return _backward(self._z_graph, self._leaves, u.detach(), self.wrt, retain=True)

    def loss_hvp(self, dz: Tensor) -> Tensor:
        """H_z dz in output space."""
        return self.loss.hvp(self.z, self.targets, dz)

    def ggn_vp(self, v: Mapping[str, Tensor]) -> Params:
        """G v = Jᵀ H_z J v."""
        return self.vjp(self.loss_hvp(self.jvp(v)))

    @property
    def gradient(self) -> Params:
        """∇_θ ℓ = Jᵀ g_z over ``wrt`` (computed on first use, then cached)."""
        if self._gradient is None:
            self._gradient = self.vjp(self._g)
        return self._gradient


def linearize(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    loss: Loss = DEFAULT_LOSS,
    wrt: Sequence[str] | None = None,
) -> Linearization:
    """Linearize the model at ``params`` on ``batch`` for repeated J, Jᵀ and G products.

    Args:
        model: any module usable with ``torch.func.functional_call``.
        params: params dict of all the model's parameters (the linearization point θ).
        batch: ``(inputs, targets)``.
        loss: loss whose output-space Hessian H_z enters G.
        wrt: parameter names the products act on (default: all); the others are held fixed.
    """
    _check_params(model, params)
    return Linearization(model, dict(params), batch, loss, _check_wrt(params, wrt))

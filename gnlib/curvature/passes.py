"""The passes every curvature product is made of: argument checks, a forward that carries a tangent, a backward.

:func:`_forward` runs the model once, recording the primal's graph and carrying J·Δ (by the model's own
forward-mode rules where it declares ``computes_jvp``, else by ``torch.autograd.forward_ad``); :func:`_backward`
is Jᵀu on that graph; :class:`_GradientGraph` keeps a gradient's own graph for products by double backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.losses import CrossEntropy, Loss
from gnlib.models import SlotTangents
from gnlib.params import Params, check_like

Batch = tuple[Tensor, Tensor]

OBJECTIVES = ("gn", "prox_linear", "loss")
DEFAULT_LOSS = CrossEntropy()


# ---------------------------------------------------------------------------------------------------
# validation


def _check_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """``params`` must have exactly the model's parameter names and shapes, in ``named_parameters()`` order."""
    check_like(params, dict(model.named_parameters()), "params")


def _check_params_vector(v: Mapping[str, Tensor], params: Mapping[str, Tensor], what: str) -> None:
    """``v`` names a subset of ``params`` (in its order) with matching shapes, dtype and device."""
    if not isinstance(v, Mapping) or not v:
        raise ValueError(f"{what} must be a non-empty dict of named tensors, got {type(v).__name__}")
    unexpected = [name for name in v if name not in params]
    if unexpected:
        raise ValueError(f"{what} does not match the parameters: unexpected {unexpected}; allowed: {list(params)}")
    names = [name for name in params if name in v]
    if list(v) != names:
        raise ValueError(f"{what} must list its names in the parameters' order: {names}")
    check_like(v, {name: params[name] for name in names}, what)
    for name, t in v.items():
        p = params[name]
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(
                f"{what}[{name!r}] is {t.dtype} on {t.device}, expected {p.dtype} on {p.device} like the parameters"
            )


def _check_output(u: Tensor, z: Tensor, what: str) -> None:
    if not isinstance(u, Tensor) or u.shape != z.shape:
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"{what} has shape {shape}, expected the output shape {tuple(z.shape)}")


def _check_wrt(params: Mapping[str, Tensor], wrt: Sequence[str] | None) -> list[str]:
    """Names of ``wrt`` (default all) validated against ``params`` and put in parameter order."""
    if wrt is None:
        return list(params)
    unknown = [name for name in wrt if name not in params]
    if unknown or not wrt:
        raise ValueError(f"wrt={list(wrt)!r} must be a non-empty list of parameter names; unknown: {unknown}")
    return [name for name in params if name in set(wrt)]


# ---------------------------------------------------------------------------------------------------
# the two passes every product is made of


def _forward(
    model: nn.Module, params: Params, inputs: Tensor, wrt: Sequence[str], tangent: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, Tensor | SlotTangents | None, list[Tensor]]:
    """One forward pass at ``params``, recording the reverse graph to the parameters named in ``wrt``.

    With a ``tangent`` (a params dict over exactly the names ``wrt``; :class:`~gnlib.models.Slot` s for
    a stack of tangents, with a model's own rules), the pass also returns J·tangent.
    A model that declares ``computes_jvp`` (gnlib's :class:`~gnlib.models.Transformer`) computes it
    with its own forward-mode rules: ``model(inputs, dots=tangent)`` returns ``(z, J·tangent)``, the
    tangent arithmetic recording no graph. Any other model carries dual numbers
    (``torch.autograd.forward_ad``), and two details keep that cost down:

    - floating buffers (RoPE tables, masks) get explicit zero tangents: an operand without a tangent
      would get a symbolic zero tangent, whose arithmetic PyTorch routes through slow Python reference
      implementations (about 2x on the whole pass);
    - autograd records the tangent arithmetic too (it depends on the parameters), although only the
      primal graph is ever differentiated. A saved-tensor hook keeps, for the backward, the primal of a
      dual tensor and drops what only the tangent graph saves (tensors that require grad but carry no
      tangent: with leaves = tangent names, a primal activation that depends on a leaf is dual). This
      halves the peak memory (measured: from 3.4x to 1.9x that of a gradient step) and the tangent
      graph, never run, is freed with J·tangent at the end of the pass.

    Returns:
        ``(z, Jt or None, leaves)``: outputs with a reverse graph to ``leaves`` (the ``wrt`` tensors, in
        order) and, with a tangent, J·tangent (detached, shape of z; for ``Slot`` s the model's
        :class:`~gnlib.models.SlotTangents`, slot by slot on access).
    """
    leaves = [params[name].detach().requires_grad_() for name in wrt]
    call = {name: t.detach() for name, t in params.items()}
    call.update(zip(wrt, leaves))
    if tangent is None:
        return functional_call(model, call, (inputs,)), None, leaves
    if getattr(model, "computes_jvp", False):  # the rules run without a graph: no need to detach
        z, jt = functional_call(model, call, (inputs,), {"dots": {name: tangent[name] for name in wrt}})
        return z, torch.zeros_like(z) if jt is None else jt, leaves
    with fwad.dual_level(), torch.autograd.graph.saved_tensors_hooks(_pack_primal, _unpack):
        for name in wrt:
            call[name] = fwad.make_dual(call[name], tangent[name].detach())
        for name, t in model.named_buffers():
            if t.is_floating_point():
                call[name] = fwad.make_dual(t, torch.zeros_like(t))
        z, jt = fwad.unpack_dual(functional_call(model, call, (inputs,)))
        jt = torch.zeros_like(z) if jt is None else jt.detach()  # detach: frees the tangent graph
    return z, jt, leaves


def _pack_primal(t: Tensor) -> Tensor | None:
    """Saved-tensor hook of :func:`_forward`: primal of a dual tensor; None for tangent-graph-only tensors."""
    primal, tangent = fwad.unpack_dual(t)
    if tangent is not None:
        return primal.detach()
    return None if t.requires_grad else t


def _unpack(t: Tensor | None) -> Tensor | None:
    return t


def _backward(z: Tensor, leaves: list[Tensor], u: Tensor, names: Sequence[str], retain: bool = False) -> Params:
    """Jᵀu as a params dict over ``names`` (the leaves' names)."""
    grads = torch.autograd.grad(z, leaves, grad_outputs=u, retain_graph=retain, allow_unused=True)
    return {name: torch.zeros_like(leaf) if g is None else g for name, leaf, g in zip(names, leaves, grads)}


class _GradientGraph:
    """∇ℓ(θ) on one batch with its graph recorded, for (repeated) Hessian-vector products."""

    def __init__(self, model: nn.Module, params: Params, batch: Batch, loss: Loss, wrt: list[str]) -> None:
        inputs, targets = batch
        z, _, self.leaves = _forward(model, params, inputs, wrt)
        self.value = loss.value(z, targets)
        grads = torch.autograd.grad(self.value, self.leaves, create_graph=True, allow_unused=True)
        self.grads = dict(zip(wrt, grads))
        self.wrt = wrt

    def hvp(self, v: Mapping[str, Tensor], retain: bool = True) -> Params:
        """H v = ∂⟨∇ℓ, v⟩/∂θ over ``wrt``."""
        return dict(zip(self.wrt, _grad_of_sum(self.grads, v, self.leaves, retain)))


def _grad_of_sum(
    outputs: Mapping[str, Tensor | None], v: Mapping[str, Tensor], inputs: list[Tensor], retain: bool
) -> list[Tensor]:
    """∂/∂inputs of Σ_name ⟨outputs[name], v[name]⟩, zeros where nothing depends on an input."""
    pairs = [(outputs[name], v[name].detach()) for name in v if outputs[name] is not None]
    pairs = [(out, cot) for out, cot in pairs if out.requires_grad]
    grads = [None] * len(inputs)
    if pairs:
        outs, cots = zip(*pairs)
        grads = torch.autograd.grad(outs, inputs, cots, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _shifted(z: Tensor, dz: Tensor, owned: bool) -> Tensor:
    """The sum z + dz, in dz's buffer where the caller ``owned`` it and is done with it and it can hold the sum.

    That is where dz has the sum's shape and dtype and is contiguous (not a broadcast view).
    """
    if owned and dz.shape == z.shape and dz.dtype == torch.promote_types(dz.dtype, z.dtype) and dz.is_contiguous():
        return dz.add_(z)
    return z + dz

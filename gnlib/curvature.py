"""Curvature of a model's loss: Jacobian products, GGN and Hessian products, the Gauss-Newton inner step.

Notation (docs/study.md, section "Notation"). A model ``f`` maps parameters θ and inputs x to outputs
(logits) z = f(θ; x) of shape (..., V); a :class:`~gnlib.losses.Loss` ℓ(z, y) averages over positions. At θ:
J = ∂z/∂θ (Jacobian), g_z = ∇_z ℓ, H_z = ∇²_z ℓ (given by the loss in closed form),
G = Jᵀ H_z J (generalized Gauss-Newton, PSD for convex ℓ) and H = ∇²_θ ℓ(f(θ)) (true Hessian).

Every function takes ``model`` (any ``nn.Module`` usable with ``torch.func.functional_call``), ``params``
(a params dict in ``named_parameters()`` order, :mod:`gnlib.params`) and ``batch = (inputs, targets)``.
The model's own parameter values are never used: every named parameter must be in ``params``.
Parameter-space vectors are params dicts. A vector may name a *subset* of the parameters (in the same
order): products are then taken in those parameters only, the others held fixed at ``params``, e.g.
``ggn_vp`` with a subset ``v`` returns G_bb v_b for the diagonal block b of those parameters.
Output-space vectors have the shape of z.

Implementations (F = one forward pass; a gradient step is about 3F, matmul flops counted):

- :func:`gn_inner_step`, :func:`ggn_vp`, :func:`jvp`: one forward carrying the tangent Δ (z and J·Δ in
  one pass, about 3F since the tangent of a product W·x is dW·x + W·dx; by the model's own forward-mode
  rules where it has them, :mod:`gnlib.models`, else by dual numbers of ``torch.autograd.forward_ad``)
  that records the reverse graph of the primal, then one backward
  Jᵀu = ``autograd.grad(z, θ, u)`` (2F) with u from the loss in closed form: 5F, 1.67x a gradient
  step in matmul flops; elementwise tangent arithmetic comes on top (:mod:`gnlib.costs` holds this FLOP
  model and measures the real ratio, about 2x on a CPU).
- :func:`layerwise_inner_steps`: the inner step of every block of a partition (layerwise GN) from one
  forward that carries every block's tangent, stacked, each starting at its block (the model's own
  rules; else one backward recording its graph and, per block, a backward of that backward through the
  layers above the block), then per block a backward that stops at the block.
- :func:`linearize` (:class:`GGNOperator`): one forward and one backward that records its own graph,
  then each G·v costs two backward passes without any forward (about 4F).
- :func:`hvp` (:class:`HessianOperator`): reverse-over-reverse, ∂⟨∇ℓ, v⟩/∂θ through the recorded
  graph of the gradient.
- ``python -m gnlib.bench`` measures these against a gradient step.

Dense matrices (:func:`dense_jacobian`, :func:`dense_ggn`, :func:`dense_hessian`) are float64, their
parameter axis follows :func:`gnlib.params.flatten` and the Jacobian's output axis is ``z.reshape(-1)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.losses import CrossEntropy, Loss
from gnlib.models import Slot, SlotTangents
from gnlib.operators import LinearOperator
from gnlib.params import Params, check_like, flatten, numel, unflatten
from gnlib.runtime import check_choice

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


def layerwise_inner_steps(
    model: nn.Module,
    anchor: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    batch: Batch,
    loss: Loss = DEFAULT_LOSS,
    objective: str = "gn",
    slots: int | None = None,
) -> list[tuple[Tensor, Params]]:
    """:func:`gn_inner_step` of every block of a partition on one batch, sharing one primal forward.

    Block b with step Δ_b (``deltas[b]``, disjoint subsets of the parameters) is linearized in its own
    parameters only: J_b = ∂z/∂θ_b, ``"gn"`` gives q_b(Δ_b) = ℓ(z_t) + g_zᵀJ_bΔ_b + ½(J_bΔ_b)ᵀH_z(J_bΔ_b)
    and the gradient J_bᵀ(g_z + H_z J_bΔ_b) = J_bᵀg_z + G_bb Δ_b (G_bb the diagonal block of the GGN);
    ``"prox_linear"`` gives ℓ(z_t + J_bΔ_b) and J_bᵀ∇ℓ(z_t + J_bΔ_b). Every result equals
    ``gn_inner_step(model, anchor, deltas[b], batch, loss, objective)``.

    With several blocks, instead of one tangent-carrying forward per block (each repeating the whole
    primal, its tangent running through every layer), one forward at θ_t records the reverse graph (z_t)
    and the J_bΔ_b come from it:

    - a model with its own forward-mode rules (``computes_jvp``, :class:`~gnlib.models.Transformer`)
      carries all of them in that same forward, stacked, block b in :class:`~gnlib.models.Slot` b: each
      starts at its block's first parameter and costs nothing below it;
    - any other model gets them from one backward that records its own graph, Jᵀw over the blocks'
      parameters as a function of an output-space w (as in :class:`Linearization`), then per block
      J_bΔ_b = ∂⟨(Jᵀw)_b, Δ_b⟩/∂w, a backward through that graph that starts at the block's parameters.

    Then per block, J_bᵀu_b through the primal graph, which stops at the block's parameters.

    A single block (full GN) and ``"loss"`` (the true loss at θ_t + Δ_b, one plain gradient step per
    block) call :func:`gn_inner_step`.

    Args:
        model: any module usable with ``torch.func.functional_call``.
        anchor: params dict of all the model's parameters (θ_t).
        deltas: one params dict per block, each a subset of the parameters in their order; no parameter
            in two blocks.
        batch: ``(inputs, targets)``.
        loss: the loss ℓ.
        objective: ``"gn"``, ``"prox_linear"`` or ``"loss"`` (see :func:`gn_inner_step`).
        slots: with a model's own forward-mode rules, at most this many blocks' tangents per forward
            (None: all in one). The stacked tangents take ``slots`` times one layer's tangent memory;
            each further forward repeats the primal.

    Returns:
        ``[(value_b, gradient_b)]`` in the order of ``deltas``: a scalar tensor and a params dict over the
        names of ``deltas[b]``.

    Raises:
        ValueError: unknown ``objective``, no blocks, a block not matching the parameters, or a parameter
            in two blocks.
    """
    check_choice("objective", objective, OBJECTIVES)
    _check_slots(slots)
    _check_params(model, anchor)
    if isinstance(deltas, Mapping) or not isinstance(deltas, Sequence) or not deltas:
        kind = type(deltas).__name__
        raise ValueError(f"deltas must be a non-empty list of params dicts (one per block), got {kind}")
    for index, delta in enumerate(deltas):
        _check_params_vector(delta, anchor, f"deltas[{index}]")
    names = [name for delta in deltas for name in delta]
    if len(set(names)) != len(names):
        shared = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"deltas must be disjoint blocks; parameters in more than one block: {shared}")
    if len(deltas) == 1 or objective == "loss":
        return [gn_inner_step(model, anchor, delta, batch, loss, objective) for delta in deltas]
    if getattr(model, "computes_jvp", False):  # one forward carrying the blocks' tangents, each in its slot
        size = len(deltas) if slots is None else slots
        return [
            result
            for start in range(0, len(deltas), size)
            for result in _stacked_inner_steps(model, anchor, deltas[start : start + size], batch, loss, objective)
        ]
    wrt = [name for name in anchor if name in set(names)]
    z, _, leaves = _forward(model, dict(anchor), batch[0], wrt)
    w = torch.zeros_like(z, requires_grad=True)
    jt_w = dict(zip(wrt, torch.autograd.grad(z, leaves, w, create_graph=True, allow_unused=True)))
    tangents = (_grad_of_sum(jt_w, delta, [w], retain=True)[0] for delta in deltas)
    return _block_results(z, dict(zip(wrt, leaves)), deltas, tangents, batch[1], loss, objective, owned=False)


def _stacked_inner_steps(
    model: nn.Module,
    anchor: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    batch: Batch,
    loss: Loss,
    objective: str,
) -> list[tuple[Tensor, Params]]:
    """The blocks' inner steps from one forward carrying J_bΔ_b in slot b (a model with ``computes_jvp``)."""
    slots = {name: Slot(index, delta[name]) for index, delta in enumerate(deltas) for name in delta}
    wrt = [name for name in anchor if name in slots]
    z, stack, leaves = _forward(model, dict(anchor), batch[0], wrt, {name: slots[name] for name in wrt})
    tangents = (stack[index] if index < len(stack) else torch.zeros_like(z) for index in range(len(deltas)))
    return _block_results(z, dict(zip(wrt, leaves)), deltas, tangents, batch[1], loss, objective, owned=True)


def _block_results(
    z: Tensor,
    leaf: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    tangents: Iterable[Tensor],
    targets: Tensor,
    loss: Loss,
    objective: str,
    owned: bool,
) -> list[tuple[Tensor, Params]]:
    """Per block, the inner objective at z_t + J_bΔ_b and its gradient J_bᵀu_b through the primal graph of z.

    ``owned``: the tangents are this call's own buffers (the model's forward-mode rules make them), so
    prox-linear may shift the logits inside them; autograd's may share memory with a block's Δ_b.
    """
    z_t = z.detach()
    with torch.no_grad():
        quadratic = loss.quadratic_model(z_t, targets) if objective == "gn" else None
    results = []
    for delta, jd in zip(deltas, tangents):
        block = list(delta)
        with torch.no_grad():
            value, u = quadratic(jd) if quadratic else loss.value_and_grad(_shifted(z_t, jd, owned), targets)
        results.append((value, _backward(z, [leaf[name] for name in block], u, block, retain=True)))
        del jd, u  # output-sized: freed before the next block's tangent is made (tangents may be lazy)
    return results


def _shifted(z: Tensor, dz: Tensor, owned: bool) -> Tensor:
    """The sum z + dz, in dz's buffer where the caller ``owned`` it and is done with it and it can hold the sum.

    That is where dz has the sum's shape and dtype and is contiguous (not a broadcast view).
    """
    if owned and dz.shape == z.shape and dz.dtype == torch.promote_types(dz.dtype, z.dtype) and dz.is_contiguous():
        return dz.add_(z)
    return z + dz


def _check_slots(slots: int | None) -> None:
    if slots is not None and not (isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1):
        raise ValueError(f"slots={slots!r} is invalid; allowed values: an integer >= 1, or None for all blocks")


def layerwise_passes(model: nn.Module, blocks: int, slots: int | None = None) -> tuple[int, int, int]:
    """(forwards, tangents, backwards) one :func:`layerwise_inner_steps` call makes on ``blocks`` blocks.

    A tangent or backward per block, each counted whole although it runs through part of the model only
    (:func:`gnlib.costs.layerwise_pass_counts` counts their share of a whole pass's FLOPs); with several
    blocks, a model with its own forward-mode rules makes one forward per ``slots`` blocks, any other
    model one forward and the backward that records Jᵀw.
    """
    _check_slots(slots)
    if blocks == 1:
        return 1, 1, 1
    if getattr(model, "computes_jvp", False):
        return -(-blocks // (blocks if slots is None else slots)), blocks, blocks
    return 1, blocks, blocks + 1


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


# ---------------------------------------------------------------------------------------------------
# operators


class CurvatureOperator(LinearOperator):
    """A symmetric (n, n) curvature matrix on one batch, n = number of parameters in ``wrt``.

    Follows the operator protocol of :class:`gnlib.operators.LinearOperator` (``@``, ``to_scipy``, sums and
    scaling), with ``.like`` the parameters ``wrt``; adds ``.block(names)``, the diagonal block of a subset.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        batch: Batch,
        loss: Loss = DEFAULT_LOSS,
        wrt: Sequence[str] | None = None,
    ) -> None:
        """Operator of ``model`` at ``params`` on ``batch`` over the parameters ``wrt`` (default: all)."""
        _check_params(model, params)
        self.model, self.batch, self.loss = model, batch, loss
        self.params = {name: t.detach() for name, t in params.items()}
        self.wrt = _check_wrt(params, wrt)
        like = {name: self.params[name] for name in self.wrt}
        first = next(iter(like.values()))
        super().__init__(numel(like), first.dtype, first.device, symmetric=True, like=like)
        self._prepare()

    def _prepare(self) -> None:
        """Build what every product reuses (a linearization, a gradient graph)."""
        raise NotImplementedError

    def _apply(self, v: Params) -> Params:
        """A v for a params dict over ``wrt``."""
        raise NotImplementedError

    def _matvec(self, x: Tensor) -> Tensor:
        return flatten(self._apply(unflatten(x, self.like)))

    def block(self, names: Sequence[str]) -> CurvatureOperator:
        """The diagonal block of the parameters ``names`` (others held fixed), as an operator of the same kind."""
        unknown = [name for name in names if name not in self.wrt]
        if unknown:
            raise ValueError(f"names {unknown} are not among this operator's parameters {self.wrt}")
        return type(self)(self.model, self.params, self.batch, self.loss, names)


class GGNOperator(CurvatureOperator):
    """G = Jᵀ H_z J on one batch, from a :class:`Linearization` built once and reused by every product."""

    def _prepare(self) -> None:
        self.linearization = Linearization(self.model, self.params, self.batch, self.loss, self.wrt)

    def _apply(self, v: Params) -> Params:
        return self.linearization.ggn_vp(v)


class HessianOperator(CurvatureOperator):
    """The true Hessian ∇²_θ ℓ(f(θ)) on one batch; the gradient's graph is built once, each product is one backward."""

    def _prepare(self) -> None:
        self._graph = _GradientGraph(self.model, self.params, self.batch, self.loss, self.wrt)

    def _apply(self, v: Params) -> Params:
        return self._graph.hvp(v)


# ---------------------------------------------------------------------------------------------------
# dense matrices for tiny models


def _dense_setup(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, wrt: Sequence[str] | None, max_params: int, what: str
) -> tuple[nn.Module, Params, Batch, list[str], int]:
    """Validate sizes and move everything to float64 (a float64 copy of the model if needed)."""
    _check_params(model, params)
    wrt = _check_wrt(params, wrt)
    n = sum(params[name].numel() for name in wrt)
    if n > max_params:
        raise ValueError(
            f"{what}: {n} parameters exceed max_params={max_params} (a dense {n}×{n} float64 matrix takes "
            f"{n * n * 8 / 2**30:.2f} GiB); use GGNOperator / HessianOperator products, a smaller model, "
            f"a subset wrt=..., or raise max_params"
        )
    tensors = list(params.values()) + list(model.buffers())
    if any(t.is_floating_point() and t.dtype != torch.float64 for t in tensors):
        model = copy.deepcopy(model).to(torch.float64)
    params = {name: t.detach().to(torch.float64) for name, t in params.items()}
    batch = tuple(t.to(torch.float64) if t.is_floating_point() else t for t in batch)
    return model, params, batch, wrt, n


def _eye_columns(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def dense_jacobian(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    wrt: Sequence[str] | None = None,
    *,
    max_params: int = 5000,
    max_bytes: int = 2**30,
    chunk_size: int = 256,
) -> Tensor:
    """Dense J, float64, shape (z.numel(), n): row i is output ``z.reshape(-1)[i]``, columns in flat order.

    Built column by column from vectorized JVPs (``torch.func.vmap`` of ``torch.func.jvp``).

    Raises:
        ValueError: more than ``max_params`` parameters or a matrix over ``max_bytes``.
    """
    model, params, batch, wrt, n = _dense_setup(model, params, batch, wrt, max_params, "dense_jacobian")
    return _jacobian(model, params, batch[0], wrt, max_bytes, chunk_size)


def _jacobian(
    model: nn.Module, params: Params, inputs: Tensor, wrt: list[str], max_bytes: int, chunk_size: int
) -> Tensor:
    like = {name: params[name] for name in wrt}
    fixed = {name: t for name, t in params.items() if name not in wrt}
    n = numel(like)
    z = functional_call(model, params, (inputs,))
    if z.numel() * n * 8 > max_bytes:
        raise ValueError(
            f"dense_jacobian: a {z.numel()}×{n} float64 matrix takes {z.numel() * n * 8 / 2**30:.2f} GiB > "
            f"max_bytes={max_bytes}; use a smaller batch or model"
        )
    flat = flatten(like)

    def outputs(theta: Tensor) -> Tensor:
        return functional_call(model, {**fixed, **unflatten(theta, like)}, (inputs,)).reshape(-1)

    def column(e: Tensor) -> Tensor:
        return torch.func.jvp(outputs, (flat,), (e,))[1]

    return torch.func.vmap(column, chunk_size=chunk_size)(_eye_columns(n, flat)).T


def dense_ggn(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    loss: Loss = DEFAULT_LOSS,
    wrt: Sequence[str] | None = None,
    *,
    max_params: int = 5000,
    max_bytes: int = 2**30,
    chunk_size: int = 256,
) -> Tensor:
    """Dense G = Jᵀ H_z J, float64, (n, n) in flat order; H_z applied by the loss to each column of J.

    Raises:
        ValueError: more than ``max_params`` parameters or a Jacobian over ``max_bytes``.
    """
    model, params, batch, wrt, n = _dense_setup(model, params, batch, wrt, max_params, "dense_ggn")
    inputs, targets = batch
    jac = _jacobian(model, params, inputs, wrt, max_bytes, chunk_size)
    z = functional_call(model, params, (inputs,)).detach()
    columns = jac.T.reshape(n, *z.shape)
    h_columns = torch.func.vmap(lambda c: loss.hvp(z, targets, c), chunk_size=chunk_size)(columns)
    return columns.reshape(n, -1) @ h_columns.reshape(n, -1).T


def _loss_of(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, loss: Loss, wrt: Sequence[str]
) -> Callable[[Params], Tensor]:
    """θ_wrt ↦ ℓ(f(θ)) with the other parameters fixed at ``params``."""
    fixed = {name: t.detach() for name, t in params.items() if name not in wrt}
    inputs, targets = batch

    def loss_fn(sub: Params) -> Tensor:
        return loss.value(functional_call(model, {**fixed, **sub}, (inputs,)), targets)

    return loss_fn


def dense_hessian(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    loss: Loss = DEFAULT_LOSS,
    wrt: Sequence[str] | None = None,
    *,
    max_params: int = 5000,
    chunk_size: int = 256,
) -> Tensor:
    """Dense Hessian ∇²_θ ℓ(f(θ)), float64, (n, n) in flat order (vectorized forward-over-reverse).

    Raises:
        ValueError: more than ``max_params`` parameters.
    """
    model, params, batch, wrt, n = _dense_setup(model, params, batch, wrt, max_params, "dense_hessian")
    like = {name: params[name] for name in wrt}
    loss_fn = _loss_of(model, params, batch, loss, wrt)
    flat = flatten(like)

    def flat_loss(theta: Tensor) -> Tensor:
        return loss_fn(unflatten(theta, like))

    def row(e: Tensor) -> Tensor:
        return torch.func.jvp(torch.func.grad(flat_loss), (flat,), (e,))[1]

    return torch.func.vmap(row, chunk_size=chunk_size)(_eye_columns(n, flat))

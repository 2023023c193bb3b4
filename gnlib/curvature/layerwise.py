"""Layerwise GN's inner steps: every block's tangent from one stacked forward, each block's backward stopping at it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from gnlib.curvature.passes import (
    DEFAULT_LOSS,
    OBJECTIVES,
    Batch,
    _backward,
    _check_params,
    _check_params_vector,
    _forward,
    _grad_of_sum,
    _shifted,
)
from gnlib.curvature.products import gn_inner_step
from gnlib.losses import Loss
from gnlib.models import Slot
from gnlib.params import Params
from gnlib.runtime import check_choice, invalid, is_integer


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


def _check_slots(slots: int | None) -> None:
    if slots is not None and not (is_integer(slots) and slots >= 1):
        raise invalid("", "slots", slots, "an integer >= 1, or None for all blocks")


def layerwise_passes(model: nn.Module, blocks: int, slots: int | None = None) -> tuple[int, int, int]:
    """(forwards, tangents, backwards) one :func:`layerwise_inner_steps` call makes on ``blocks`` blocks.

    A tangent or backward per block, each counted whole although it runs through part of the model only
    (:func:`gnlib.curvature.costs.layerwise_pass_counts` counts their share of a whole pass's FLOPs); with several
    blocks, a model with its own forward-mode rules makes one forward per ``slots`` blocks, any other
    model one forward and the backward that records Jᵀw.
    """
    _check_slots(slots)
    if blocks == 1:
        return 1, 1, 1
    if getattr(model, "computes_jvp", False):
        return -(-blocks // (blocks if slots is None else slots)), blocks, blocks
    return 1, blocks, blocks + 1

"""Curvature of a model's loss: products, layerwise steps, operators, dense oracles, blocks, spectra, pass costs.

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
  step in matmul flops; elementwise tangent arithmetic comes on top (:mod:`gnlib.curvature.costs` holds this FLOP
  model and measures the real ratio, about 2x on a CPU).
- :func:`layerwise_inner_steps`: the inner step of every block of a partition (layerwise GN) from one
  forward that carries every block's tangent, stacked, each starting at its block (the model's own
  rules; else one backward recording its graph and, per block, a backward of that backward through the
  layers above the block), then per block a backward that stops at the block.
- :func:`linearize` (:class:`GGNOperator`): one forward and one backward that records its own graph,
  then each G·v costs two backward passes without any forward (about 4F).
- :func:`hvp` (:class:`HessianOperator`): reverse-over-reverse, ∂⟨∇ℓ, v⟩/∂θ through the recorded
  graph of the gradient.
- ``python -m gnlib.tools.bench`` measures these against a gradient step.

Dense matrices (:func:`dense_jacobian`, :func:`dense_ggn`, :func:`dense_hessian`) are float64, their
parameter axis follows :func:`gnlib.params.flatten` and the Jacobian's output axis is ``z.reshape(-1)``.

Modules: ``products`` (J·v, Jᵀ·u, G·v, H·v, the GN inner step), ``layerwise`` (every block's inner step in
one stacked forward), ``linearization`` (a linearization kept for repeated products), ``operators`` (the
LinearOperator base and the GGN and Hessian operators), ``dense`` (float64 matrices), ``blocks``
(partitions and block views), ``spectra`` (Lanczos, Hutchinson, densities), ``costs`` (pass costs).
"""

from gnlib.curvature.dense import dense_ggn, dense_hessian, dense_jacobian
from gnlib.curvature.layerwise import layerwise_inner_steps, layerwise_passes
from gnlib.curvature.linearization import Linearization, linearize
from gnlib.curvature.operators import CurvatureOperator, GGNOperator, HessianOperator, LinearOperator
from gnlib.curvature.products import (
    DEFAULT_LOSS,
    OBJECTIVES,
    ggn_vp,
    gn_inner_step,
    gradient,
    hvp,
    jvp,
    logits,
    outputs_and_jvp,
    vjp,
)

__all__ = [
    "DEFAULT_LOSS",
    "OBJECTIVES",
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "Linearization",
    "dense_ggn",
    "dense_hessian",
    "dense_jacobian",
    "ggn_vp",
    "gn_inner_step",
    "gradient",
    "hvp",
    "jvp",
    "layerwise_inner_steps",
    "layerwise_passes",
    "linearize",
    "logits",
    "outputs_and_jvp",
    "vjp",
]

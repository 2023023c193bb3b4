"""Curvature of a model's loss: products, layerwise steps, operators, dense oracles, blocks, spectra, pass costs.

At θ, with z = f(θ; x): J = ∂z/∂θ, g_z = ∇_z ℓ, H_z = ∇²_z ℓ, G = Jᵀ H_z J (GGN) and H = ∇²_θ ℓ (Hessian).
Every function takes ``model``, ``params`` (a params dict, every named parameter present) and ``batch =
(inputs, targets)``; a vector may name a subset of the parameters (products in that block only). Modules:
``passes`` (checks, the tangent-carrying forward, the backward), ``products`` (J·v, Jᵀ·u, G·v, H·v, the GN
inner step), ``layerwise``, ``linearization``, ``operators``, ``dense`` (float64 oracles), ``blocks``,
``spectra``, ``costs``. docs/architecture.md, section "Curvature products and their passes", gives the
notation and what each product costs in passes.
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

"""Optimizers: Gauss-Newton (full, prox-linear, layerwise, Hessian-free), baselines, LR schedules."""

from gnlib.optim.composite import CompositeOptimizer
from gnlib.optim.factory import DEFAULTS, make_optimizer, split_params
from gnlib.optim.gauss_newton import GaussNewton, make_gauss_newton
from gnlib.optim.gn_options import GN_VARIANTS, LINE_SEARCH, GaussNewtonOptions, line_search_grid
from gnlib.optim.registry import OPTIMIZERS, REGISTRY, build_optimizer, validate_options
from gnlib.optim.schedules import (
    constant,
    cosine_decay,
    make_schedule,
    warmup_cosine,
    warmup_stable_decay,
)
from gnlib.optim.soap import SOAP

__all__ = [
    "DEFAULTS",
    "GN_VARIANTS",
    "LINE_SEARCH",
    "GaussNewton",
    "GaussNewtonOptions",
    "OPTIMIZERS",
    "REGISTRY",
    "build_optimizer",
    "validate_options",
    "make_gauss_newton",
    "line_search_grid",
    "SOAP",
    "CompositeOptimizer",
    "constant",
    "cosine_decay",
    "make_optimizer",
    "make_schedule",
    "split_params",
    "warmup_cosine",
    "warmup_stable_decay",
]

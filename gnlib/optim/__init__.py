"""Optimizers: baselines (AdamW, Muon with AdamW, SOAP, SGD), their composite wrapper, LR schedules."""

from gnlib.optim.composite import CompositeOptimizer
from gnlib.optim.factory import DEFAULTS, make_optimizer, split_params
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

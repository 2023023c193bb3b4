"""Parameter dictionaries and their flat-vector view.

A *params dict* maps parameter names to tensors, in ``model.named_parameters()`` order. Its flat view
concatenates the tensors in that order, each flattened row-major; every dense matrix in gnlib
(Jacobian, GGN, Hessian) uses this ordering for its parameter axis.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


def params_of(model: nn.Module, *, requires_grad: bool = False) -> Params:
    """Detached copies of the model's parameters, in ``named_parameters()`` order (tied ones once)."""
    return {name: p.detach().clone().requires_grad_(requires_grad) for name, p in model.named_parameters()}


def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the tensors of ``params`` into one vector of length ``numel(params)``."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def numel(params: Mapping[str, Tensor]) -> int:
    """Total number of scalars in ``params``."""
    return sum(t.numel() for t in params.values())


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split ``flat`` (shape ``(numel(like),)``) into a dict shaped like ``like``.

    Raises:
        ValueError: ``flat`` is not a vector of the right length.
    """
    n = numel(like)
    if flat.dim() != 1 or flat.numel() != n:
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, expected ({n},) to match the parameters")
    out: Params = {}
    offset = 0
    for name, t in like.items():
        out[name] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def offsets(like: Mapping[str, Tensor]) -> dict[str, slice]:
    """Slice of the flat vector that each named tensor occupies."""
    out: dict[str, slice] = {}
    start = 0
    for name, t in like.items():
        out[name] = slice(start, start + t.numel())
        start += t.numel()
    return out


def check_like(params: Mapping[str, Tensor], like: Mapping[str, Tensor], what: str = "vector") -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the names and shapes of ``like``."""
    if list(params) != list(like):
        missing = [k for k in like if k not in params]
        extra = [k for k in params if k not in like]
        raise ValueError(f"{what} does not match the parameters: missing {missing}, unexpected {extra}")
    for name, t in params.items():
        if t.shape != like[name].shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(t.shape)}, expected {tuple(like[name].shape)}")


def zeros_like(like: Mapping[str, Tensor]) -> Params:
    """A params dict of zeros shaped like ``like``."""
    return {name: torch.zeros_like(t) for name, t in like.items()}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> Params:
    """``a + alpha * b`` entrywise over matching names."""
    return {name: a[name] + alpha * b[name] for name in a}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Euclidean inner product of two params dicts (a scalar tensor)."""
    return sum((a[name] * b[name]).sum() for name in a)

"""Dense float64 matrices of small models: the Jacobian, the GGN and the Hessian (parameter axis in flatten order)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.curvature.passes import (
    DEFAULT_LOSS,
    Batch,
    _check_params,
    _check_wrt,
)
from gnlib.losses import Loss
from gnlib.params import Params, flatten, numel, unflatten

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

"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024, arXiv 2409.11321).

Per matrix parameter the state holds EMAs of the gradient's factors G Gᵀ and Gᵀ G (``factor_0``,
``factor_1``), their eigenbases (``basis_0``, ``basis_1``) and Adam's moments in that eigenbasis
(``exp_avg``, ``exp_avg_sq``); 0-D and 1-D parameters get plain AdamW. :func:`eigenbasis` computes a
basis, :func:`power_qr` refreshes it, :func:`project` rotates into and out of it. The update equations,
the conventions and the differences from the reference implementation: docs/optimizers.md, section "SOAP".
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from gnlib.checks import integer, number
from gnlib.optim.options import BETAS, Schema

Bases = dict[int, Tensor]


def _eigenvectors(matrix: Tensor) -> Tensor | None:
    """Eigenvectors (ascending eigenvalues) of a symmetric matrix, or ``None`` if ``eigh`` fails or gives non-finite."""
    try:
        _, q = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError: the algorithm did not converge
        return None
    return q if torch.isfinite(q).all() else None


def eigenbasis(factor: Tensor, fallback: Tensor | None = None) -> Tensor:
    """Eigenvectors of a symmetric PSD ``factor`` (n, n), as columns in decreasing eigenvalue order.

    ``torch.linalg.eigh`` is tried in the factor's dtype, then (on an error or a non-finite result) in
    float64 with a jitter of ``1e-10 * mean(diag(factor))`` on the diagonal.

    Args:
        factor: symmetric matrix (n, n).
        fallback: basis (n, n) returned when the factor is not finite or both attempts fail;
            the identity when ``None``.

    Returns:
        Orthogonal matrix (n, n) in the factor's dtype.
    """
    n = factor.shape[0]
    if not torch.isfinite(factor).all():
        q = None
    else:
        q = _eigenvectors(factor)
        if q is None:
            f64 = factor.double()
            jitter = 1e-10 * f64.diagonal().mean().clamp_min(1e-30)
            q = _eigenvectors(f64 + jitter * torch.eye(n, dtype=f64.dtype, device=f64.device))
            q = None if q is None else q.to(factor.dtype)
    if q is None:
        return fallback if fallback is not None else torch.eye(n, dtype=factor.dtype, device=factor.device)
    return q.flip(-1)


def power_qr(factor: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration step with QR re-orthogonalization: the cheap eigenbasis refresh.

    Sorts the columns of ``basis`` by their Rayleigh quotients ``diag(basisᵀ factor basis)``
    (descending, permutation ``order``), then returns ``Q`` from ``qr(factor @ basis[:, order])``.
    Repeated on a fixed factor this is orthogonal (subspace) iteration and converges to its eigenbasis.
    A non-finite result keeps ``basis`` (with the identity permutation).

    Args:
        factor: symmetric PSD matrix (n, n).
        basis: orthogonal matrix (n, n), the current estimate of the eigenvectors.

    Returns:
        ``(Q, order)``: new orthogonal basis (n, n) and the permutation (n,) applied to the old columns.
    """
    rayleigh = torch.einsum("ij,ij->j", basis, factor @ basis)
    order = torch.argsort(rayleigh, descending=True)
    q = torch.linalg.qr(factor @ basis[:, order]).Q
    if not torch.isfinite(q).all():
        return basis, torch.arange(basis.shape[1], device=basis.device)
    return q, order


def project(x: Tensor, bases: Bases, back: bool = False) -> Tensor:
    """Rotate ``x`` into the eigenbasis (``Q_Lᵀ x Q_R``) or, with ``back=True``, out of it (``Q_L x Q_Rᵀ``).

    Args:
        x: tensor of the parameter's shape.
        bases: dimension -> orthogonal matrix for each preconditioned side (0: left, 1: right);
            missing sides are the identity.
        back: rotate back to the parameter's coordinates.
    """
    if 0 in bases:
        x = (bases[0] if back else bases[0].T) @ x
    if 1 in bases:
        x = x @ (bases[1].T if back else bases[1])
    return x


def _outer(grad: Tensor, dim: int) -> Tensor:
    """``G Gᵀ`` (dim 0, shape (m, m)) or ``Gᵀ G`` (dim 1, shape (n, n)) for a gradient ``G`` (m, n)."""
    return grad @ grad.T if dim == 0 else grad.T @ grad


#: SOAP's options: each default (the reference's) with its rule.
SOAP_SCHEMA = Schema(
    "soap",
    defaults=dict(
        lr=3e-3,
        betas=(0.95, 0.95),
        shampoo_beta=0.95,
        eps=1e-8,
        weight_decay=0.01,
        precondition_frequency=10,
        max_precond_dim=10000,
    ),
    rules={
        "lr": number(0),
        "betas": BETAS,
        "shampoo_beta": number(0, below=1),
        "eps": number(0),
        "weight_decay": number(0),
        "precondition_frequency": integer(1),
        "max_precond_dim": integer(0),
    },
)


class SOAP(torch.optim.Optimizer):
    r"""SOAP optimizer for 0-D, 1-D and 2-D parameters; the math: docs/optimizers.md, section "SOAP".

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        lr: learning rate :math:`\eta` (>= 0).
        betas: Adam's :math:`(\beta_1, \beta_2)`, each in [0, 1).
        shampoo_beta: EMA coefficient :math:`\beta_s` of the Kronecker factors, in [0, 1).
        eps: added to :math:`\sqrt{\tilde V}` (>= 0).
        weight_decay: decoupled weight decay :math:`\lambda` (>= 0).
        precondition_frequency: updates between eigenbasis refreshes (integer >= 1).
        max_precond_dim: sides longer than this are not preconditioned (integer >= 0).

    Raises:
        ValueError: a hyperparameter out of range, or a parameter with more than 2 dimensions.
    """

    def __init__(self, params, **options: Any) -> None:
        """``params`` as any torch optimizer takes them; ``options`` of :data:`SOAP_SCHEMA` (lr, betas, ...).

        Raises:
            ValueError: an unknown option or an invalid value (naming it), or a parameter of more than 2 dimensions.
        """
        defaults = SOAP_SCHEMA.validate(options)
        defaults["betas"] = tuple(defaults["betas"])
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() > 2:
                    raise ValueError(f"SOAP supports parameters with at most 2 dimensions, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient; the first call per parameter only initializes.

        Args:
            closure: optional function that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.to(torch.promote_types(p.dtype, torch.float32))
                if not state:
                    self._initialize(state, grad, group)
                else:
                    self._update(p, grad, state, group)
        return loss

    @staticmethod
    def _sides(grad: Tensor, max_precond_dim: int) -> list[int]:
        if grad.dim() != 2:
            return []
        return [d for d in (0, 1) if grad.shape[d] <= max_precond_dim]

    @staticmethod
    def _bases(state: dict) -> Bases:
        return {d: state[f"basis_{d}"] for d in (0, 1) if f"basis_{d}" in state}

    def _initialize(self, state: dict, grad: Tensor, group: dict) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        for d in self._sides(grad, group["max_precond_dim"]):
            factor = torch.zeros(grad.shape[d], grad.shape[d], dtype=grad.dtype, device=grad.device)
            state[f"factor_{d}"] = factor.lerp_(_outer(grad, d), 1.0 - group["shampoo_beta"])
            state[f"basis_{d}"] = eigenbasis(factor)

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        bases = self._bases(state)
        rotated = project(grad, bases)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(rotated, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
        direction = project(exp_avg / (exp_avg_sq.sqrt() + group["eps"]), bases, back=True)
        step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        p.mul_(1.0 - lr * group["weight_decay"])
        p.add_(direction.to(p.dtype), alpha=-step_size)
        for d in bases:
            state[f"factor_{d}"].lerp_(_outer(grad, d), 1.0 - group["shampoo_beta"])
        if bases and t % group["precondition_frequency"] == 0:
            self._refresh(state, bases)

    def _refresh(self, state: dict, bases: Bases) -> None:
        """Power-QR refresh of every basis; rotate the first moment, permute the second."""
        exp_avg = project(state["exp_avg"], bases, back=True)
        for d in bases:
            q, order = power_qr(state[f"factor_{d}"], bases[d])
            state[f"basis_{d}"] = q
            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(d, order)
        state["exp_avg"] = project(exp_avg, self._bases(state))

"""Losses that own their curvature in output (logit) space.

Each loss maps model outputs ``z`` and targets ``y`` to a scalar and knows, in closed form, its gradient
``g = ∇_z ℓ(z)`` and the product of its Hessian ``H_z = ∇²_z ℓ(z)`` with a vector in output space. The
curvature code (:mod:`gnlib.curvature`) composes these with Jacobian products of the model, so it never
needs to know which loss it is working with (the idea of kfac-jax's loss objects).

Shapes: ``z`` is ``(..., V)`` (any number of leading dims: tokens, rows), ``y`` is ``(...)`` class ids
(:class:`CrossEntropy`) or ``(..., V)`` regression targets (:class:`MSE`). Output-space vectors ``v``
and the returned gradients and products have the shape of ``z``. ``n`` below is the number of leading
positions, ``z.numel() // V`` (tokens for a language model, rows for regression).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class Loss(ABC):
    """A mean-over-positions loss with analytic output-space gradient and Hessian-vector product."""

    @abstractmethod
    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """ℓ(z): a scalar tensor, differentiable with autograd (forward and reverse mode)."""

    @abstractmethod
    def value_and_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(ℓ(z), ∇_z ℓ(z)) computed together, without autograd; the gradient has the shape of ``z``."""

    @abstractmethod
    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """H_z v with H_z = ∇²_z ℓ(z); ``v`` and the result have the shape of ``z``."""

    def grad(self, z: Tensor, y: Tensor) -> Tensor:
        """∇_z ℓ(z), shape of ``z``."""
        return self.value_and_grad(z, y)[1]

    def quadratic(self, z: Tensor, y: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
        """Second-order Taylor model of ℓ around ``z`` at the step ``dz``, and its gradient in ``dz``.

        Returns:
            ``(ℓ(z) + gᵀdz + ½ dzᵀ H_z dz, g + H_z dz)`` with ``g = ∇_z ℓ(z)``; the second has the shape
            of ``z``. This is the Gauss-Newton model when ``dz = JΔ``.
        """
        return self.quadratic_model(z, y)(dz)

    def quadratic_model(self, z: Tensor, y: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """:meth:`quadratic` around ``z`` as a function of ``dz``, computing what depends on ``z`` alone once.

        For several steps around one point (layerwise GN: one J_bΔ_b per block).
        """
        value, g = self.value_and_grad(z, y)

        def at(dz: Tensor) -> tuple[Tensor, Tensor]:
            h_dz = self.hvp(z, y, dz)
            return value + (g * dz).sum() + 0.5 * (dz * h_dz).sum(), g + h_dz

        return at

    def quadratic_along(self, z: Tensor, y: Tensor, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The quadratic model on the line ``α dz``, as its three coefficients.

        Returns:
            ``(ℓ(z), gᵀdz, dzᵀH_z dz)``, scalars: the model at ``α dz`` is ``ℓ(z) + α gᵀdz + ½α² dzᵀH_z dz``
            for every α, from one gradient and one Hessian product (the line search's predictions).
        """
        value, g = self.value_and_grad(z, y)
        return value, (g * dz).sum(), (dz * self.hvp(z, y, dz)).sum()


def _n_positions(z: Tensor) -> int:
    return z.numel() // z.shape[-1]


#: Target id of positions that count in no loss (PyTorch's ``ignore_index``, e.g. padding or prompt tokens).
IGNORE_INDEX = -100


class CrossEntropy(Loss):
    """Softmax cross-entropy averaged over the positions (tokens) whose target is not ``IGNORE_INDEX``.

    ℓ(z) = (1/n) Σ_{i: y_i ≠ −100} [logsumexp(z_i) − z_{i, y_i}] over the leading positions of ``z``
    (..., V) with integer targets ``y`` (...), ``n`` the number of counted positions (PyTorch's
    ``cross_entropy`` with its default ``ignore_index=-100``, as the baselines train). Per counted
    position, with ``p_i = softmax(z_i)``: gradient ``(p_i − e_{y_i}) / n`` and Hessian
    ``(diag(p_i) − p_i p_iᵀ) / n``, applied to ``v_i`` as ``(p_i ⊙ v_i − p_i (p_iᵀ v_i)) / n`` — no V×V
    matrix is formed; an ignored position has zero gradient and zero Hessian. The Hessian is PSD and
    depends on the targets only through which positions count.
    """

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy over the counted positions (scalar)."""
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)

    def value_and_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy and ``(softmax(z) − onehot(y)) / n`` (zero at ignored positions) from one log-softmax."""
        value, p, y, weight = self._value_and_probs(z, y)
        return value, _add_at_targets_(p.mul_(weight), y, weight.neg())

    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``(p ⊙ v − p (pᵀv)) / n`` per counted position (zero at ignored ones), ``p = softmax(z)``."""
        counted, n = _counted(y, z.dtype)
        p = torch.softmax(z, dim=-1)
        pv = p * v
        return pv.sub_(p * pv.sum(-1, keepdim=True)).mul_(counted / n)  # in place, and batched by vmap

    def quadratic_model(self, z: Tensor, y: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """See :meth:`Loss.quadratic_model`; one softmax shared by every step, one new logits-sized buffer per step.

        Per position i, with weight w_i (1/n if counted, else 0) and s_i = p_iᵀdz_i: g_i = (p_i − e_{y_i}) w_i
        and H_i dz_i = p_i ⊙ (dz_i − s_i) w_i, so u_i = (p_i ⊙ dz_i − p_i (s_i − 1)) w_i − e_{y_i} w_i and
        gᵀdz = Σ (s_i − dz_{i,y_i}) w_i. As uᵀdz = gᵀdz + dzᵀH dz, q = ℓ + ½ (gᵀdz + uᵀdz).
        """
        value, p, y, weight = self._value_and_probs(z, y)

        def at(dz: Tensor) -> tuple[Tensor, Tensor]:
            p_dz = p * dz
            s = p_dz.sum(-1, keepdim=True)
            u = _add_at_targets_(p_dz.addcmul_(p, s - 1, value=-1).mul_(weight), y, weight.neg())
            return value + 0.5 * (self._slope(s, dz, y, weight) + _dot(u, dz)), u

        return at

    def quadratic_along(self, z: Tensor, y: Tensor, dz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """See :meth:`Loss.quadratic_along`; one softmax and one product p ⊙ dz serve the three.

        Per position i, with weight w_i (1/n if counted, else 0) and s_i = p_iᵀdz_i: gᵀdz sums
        (s_i − dz_{i,y_i}) w_i and dzᵀH dz sums (dz_iᵀ(p_i ⊙ dz_i) − s_i²) w_i.
        """
        value, p, y, weight = self._value_and_probs(z, y)
        p_dz = p.mul_(dz)
        s = p_dz.sum(-1, keepdim=True)
        bend = _dot(dz, p_dz.mul_(weight)) - _dot(s.square(), weight)
        return value, self._slope(s, dz, y, weight), bend

    @staticmethod
    def _slope(s: Tensor, dz: Tensor, y: Tensor, weight: Tensor) -> Tensor:
        """gᵀdz = Σ_i (s_i − dz_{i,y_i}) w_i from the row sums s_i = p_iᵀdz_i (shapes (..., 1))."""
        return _dot(s - dz.gather(-1, y), weight)

    @staticmethod
    def _value_and_probs(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean cross-entropy, softmax(z), y with a trailing unit dim (ignored ids as 0), weights w (..., 1)).

        w_i = 1/n where position i counts, 0 where it is ignored.
        """
        log_p = torch.log_softmax(z, dim=-1)
        counted, n = _counted(y, z.dtype)
        y = y.clamp(min=0).unsqueeze(-1)
        return -(log_p.gather(-1, y) * counted).sum() / n, log_p.exp_(), y, counted / n


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a ⊙ b over all entries of two same-shape tensors, without an elementwise product in memory.

    In their promoted dtype, as ``(a * b).sum()`` would be (``torch.dot`` itself refuses mixed dtypes).
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def _counted(y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(1 where ``y`` counts, 0 where it is ``IGNORE_INDEX``, shape ``(..., 1)``; their number n), of ``dtype``."""
    counted = (y != IGNORE_INDEX).unsqueeze(-1).to(dtype)
    return counted, counted.sum()


def _add_at_targets_(t: Tensor, y: Tensor, value: Tensor) -> Tensor:
    """Add ``value`` (shape of ``y``) in place at the target entries ``t[..., y]`` (``y`` has a trailing unit dim)."""
    return t.scatter_add_(-1, y, value.to(t.dtype))


class MSE(Loss):
    """Half squared error, summed over the last dim and averaged over positions (rows).

    ℓ(z) = (1/n) Σ_i ½‖z_i − y_i‖² for ``z`` and ``y`` of shape (..., V), ``n`` leading positions.
    Gradient ``(z − y) / n``; Hessian ``I / n`` (so the GGN is JᵀJ / n, the Gauss-Newton matrix of
    least squares).
    """

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """Mean over rows of ½‖z − y‖² (scalar)."""
        return 0.5 * (z - y).square().sum() / _n_positions(z)

    def value_and_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and ``(z − y) / n``."""
        r = z - y
        n = _n_positions(z)
        return 0.5 * r.square().sum() / n, r / n

    def hvp(self, z: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``v / n``."""
        return v / _n_positions(z)

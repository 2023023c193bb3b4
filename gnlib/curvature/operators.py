"""Linear operators on the flat parameter space: the one base class behind every matrix-free matrix.

:class:`LinearOperator` is subclassed by :class:`gnlib.curvature.GGNOperator`,
:class:`gnlib.curvature.HessianOperator` and :class:`gnlib.curvature.blocks.BlockDiagonalOperator`; sums and scalar
multiples of operators are operators too. Its docstring states the operator protocol that
:mod:`gnlib.curvature.spectra` and :mod:`gnlib.optim.directions` rely on.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor, nn

from gnlib.curvature.linearization import Linearization
from gnlib.curvature.passes import (
    DEFAULT_LOSS,
    Batch,
    _check_params,
    _check_wrt,
    _GradientGraph,
)
from gnlib.losses import Loss
from gnlib.params import Params, check_like, flatten, numel, unflatten


class LinearOperator:
    """A square (n, n) matrix A known only through its products, n = size of the flat parameter space.

    **Operator protocol.** Functions that take an "operator" (:mod:`gnlib.curvature.spectra`,
    :mod:`gnlib.optim.directions`, :class:`gnlib.curvature.blocks.BlockDiagonalOperator`) need only ``.shape == (n, n)``
    and ``op @ x`` for a flat tensor x of shape (n,) or (n, k) (same shape back), and read ``.dtype``
    and ``.device`` when present (float64 on the CPU otherwise); a dense (n, n) ``torch.Tensor``
    qualifies. Every :class:`LinearOperator` follows it and adds:

    - ``op @ x``: x a flat tensor of shape (n,) (Ax back, shape (n,)), (n, k) (AX back, shape (n, k);
      columns go through :meth:`_matmat`), or a params dict with the names and shapes of ``op.like``
      (Ax back as a params dict). x must have the operator's dtype and device; anything else raises a
      ``ValueError`` naming the expected shape, n included.
    - ``.shape``, ``.dtype``, ``.device``, ``.like`` (the params dict fixing names, shapes and flat order,
      :mod:`gnlib.params`; None when the operator has no parameter names), ``.symmetric`` (A = Aᵀ).
    - ``op.to_scipy()``: a SciPy ``LinearOperator`` for ``scipy.sparse.linalg`` (``eigsh``, ``cg``, ...).
      One dtype rule: it takes and returns float64 NumPy arrays whatever the operator's dtype; inputs
      are cast to the operator's dtype and device, products run there, results come back as float64 on
      the CPU. ``rmatvec``/``rmatmat`` (Aᵀx) are set for symmetric operators only.
    - ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A * c`` for operators of equal shape, dtype and device and
      a real scalar c: again operators, evaluated lazily (one product of each term per product).

    Subclasses call ``super().__init__`` and implement :meth:`_matvec` (and :meth:`_matmat` when a whole
    block of columns can be applied at once).
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        symmetric: bool,
        like: Mapping[str, Tensor] | None = None,
    ) -> None:
        """An (size, size) operator in ``dtype`` on ``device``; ``like`` names the flat coordinates."""
        self._shape = (size, size)
        self._dtype = dtype
        self._device = torch.device(device)
        self._symmetric = symmetric
        self._like = None if like is None else dict(like)

    @property
    def shape(self) -> tuple[int, int]:
        """(n, n)."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the vectors the operator takes and returns."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the vectors the operator takes and returns."""
        return self._device

    @property
    def symmetric(self) -> bool:
        """Whether A = Aᵀ (then ``to_scipy`` also provides Aᵀx)."""
        return self._symmetric

    @property
    def like(self) -> Params | None:
        """Params dict fixing the names, shapes and flat order of the coordinates (None: flat only)."""
        return self._like

    # --- to implement ---------------------------------------------------------------------------

    def _matvec(self, x: Tensor) -> Tensor:
        """Ax for a validated flat x of shape (n,)."""
        raise NotImplementedError

    def _matmat(self, x: Tensor) -> Tensor:
        """AX for a validated X of shape (n, k); by default one :meth:`_matvec` per column."""
        return torch.stack([self._matvec(column) for column in x.unbind(1)], dim=1)

    # --- products -------------------------------------------------------------------------------

    def __matmul__(self, x: Tensor | Mapping[str, Tensor]) -> Tensor | Params:
        """Ax for a flat (n,) or (n, k) tensor (same shape back) or a params dict like ``.like`` (dict back)."""
        if isinstance(x, Mapping):
            return unflatten(self._matvec(self._flat_of_params(x)), self._like)
        self._check_flat(x)
        return self._matvec(x) if x.dim() == 1 else self._matmat(x)

    def _check_flat(self, x: object) -> None:
        n = self._shape[0]
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.shape[0] != n:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x has shape {shape}, expected ({n},) or ({n}, k): the operator is {n} × {n}")
        self._check_dtype_device(x, "x")

    def _flat_of_params(self, x: Mapping[str, Tensor]) -> Tensor:
        if self._like is None:
            raise ValueError("this operator has no parameter names (.like is None): pass a flat tensor")
        check_like(x, self._like, "x")
        for name, t in x.items():
            self._check_dtype_device(t, f"x[{name!r}]")
        return flatten(x)

    def _check_dtype_device(self, t: Tensor, what: str) -> None:
        if t.dtype != self._dtype or t.device != self._device:
            raise ValueError(
                f"{what} is {t.dtype} on {t.device}, expected {self._dtype} on {self._device} like the operator"
            )

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """SciPy ``LinearOperator``: float64 NumPy in and out, products in the operator's dtype and device."""

        def apply(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(self._device, self._dtype)
            return (self @ t).detach().cpu().to(torch.float64).numpy()

        transpose = {"rmatvec": apply, "rmatmat": apply} if self._symmetric else {}
        return scipy.sparse.linalg.LinearOperator(
            self._shape, matvec=apply, matmat=apply, dtype=np.float64, **transpose
        )

    # --- composition ----------------------------------------------------------------------------

    def __add__(self, other: object) -> LinearOperator:
        """A + B, evaluated as Ax + Bx."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: object) -> LinearOperator:
        """A − B, evaluated as Ax − Bx."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __neg__(self) -> LinearOperator:
        """−A."""
        return ScaledOperator(self, -1.0)

    def __mul__(self, scalar: object) -> LinearOperator:
        """A · c for a real scalar c."""
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        return ScaledOperator(self, float(scalar))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        """Class, shape, dtype and device."""
        n = self._shape[0]
        return f"{type(self).__name__}({n} × {n}, {self._dtype}, {self._device}, symmetric={self._symmetric})"


class SumOperator(LinearOperator):
    """A + B for two operators of equal shape, dtype and device (symmetric when both are)."""

    def __init__(self, first: LinearOperator, second: LinearOperator) -> None:
        """Check that the terms match; the sum's ``like`` is the first term's (or the second's)."""
        if (first.shape, first.dtype, first.device) != (second.shape, second.dtype, second.device):
            raise ValueError(
                f"cannot add a {first.shape} {first.dtype} operator on {first.device} and a {second.shape} "
                f"{second.dtype} operator on {second.device}: shape, dtype and device must match"
            )
        like = first.like if first.like is not None else second.like
        super().__init__(
            first.shape[0], first.dtype, first.device, symmetric=first.symmetric and second.symmetric, like=like
        )
        self.terms = (first, second)

    def _matvec(self, x: Tensor) -> Tensor:
        return self.terms[0] @ x + self.terms[1] @ x

    _matmat = _matvec


class ScaledOperator(LinearOperator):
    """c · A for a real scalar c."""

    def __init__(self, operator: LinearOperator, scalar: float) -> None:
        """Wrap ``operator``; products are ``scalar * (operator @ x)``."""
        super().__init__(
            operator.shape[0], operator.dtype, operator.device, symmetric=operator.symmetric, like=operator.like
        )
        self.operator, self.scalar = operator, scalar

    def _matvec(self, x: Tensor) -> Tensor:
        return self.scalar * (self.operator @ x)

    _matmat = _matvec


# ---------------------------------------------------------------------------------------------------
# operators


class CurvatureOperator(LinearOperator):
    """A symmetric (n, n) curvature matrix on one batch, n = number of parameters in ``wrt``.

    Follows the operator protocol of :class:`gnlib.curvature.operators.LinearOperator` (``@``, ``to_scipy``, sums and
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

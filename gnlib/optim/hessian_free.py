"""Hessian-free building blocks (Martens 2010): truncated conjugate gradient, iterate backtracking, LM damping.

CG solves A x = b for a symmetric positive (semi-)definite A given only as a product ``apply(x)``, on flat
vectors (shape (n,)). For Gauss-Newton, A = G + λI and b = −∇ℓ, so the CG objective
φ(x) = ½ xᵀA x − bᵀx = gᵀx + ½ xᵀ(G + λI)x is the damped quadratic model's change q(x) − q(0).
Martens's devices, as in his paper:

- iterates are kept at i = ⌈1.3^j⌉ (and the last one) so the step can be *backtracked* to an earlier,
  shorter iterate when the quadratic model over-reaches on the true loss;
- progress stopping rule: stop at iteration i when φ_i < 0 and (φ_i − φ_{i−k}) / φ_i < k·ε with
  k = max(10, ⌈0.1 i⌉) (relative progress over the last k iterations below ε per iteration);
- Levenberg-Marquardt damping from the reduction ratio ρ = actual / predicted reduction:
  ρ < 1/4 (or undefined) → λ·3/2, ρ > 3/4 → λ·2/3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Iterate:
    """One kept CG iterate: its iteration number (0 = the start point), the vector x and φ(x)."""

    iteration: int
    x: Tensor
    phi: float


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        x: the last iterate (n,).
        phi: φ(x) = ½ xᵀAx − bᵀx at the last iterate.
        iterations: CG iterations run.
        products: products with A computed (iterations, plus one for a non-zero start).
        residual: ‖b − A x‖ at the end (the recursively updated residual).
        finite: False when a product or a scalar became NaN/Inf (CG stopped there; x is the last
            finite iterate).
        iterates: kept iterates at iterations ⌈1.3^j⌉ and the last one, in increasing order.
    """

    x: Tensor
    phi: float
    iterations: int
    products: int
    residual: float
    finite: bool
    iterates: list[Iterate] = field(default_factory=list)


def kept_iterations(max_iters: int) -> set[int]:
    """Iteration numbers ⌈1.3^j⌉ ≤ ``max_iters`` (j = 0, 1, ...): 1, 2, 3, 4, 5, 7, 9, 11, 14, 18, ..."""
    kept, j = set(), 0
    while (i := math.ceil(1.3**j)) <= max_iters:
        kept.add(i)
        j += 1
    return kept


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    max_iters: int,
    tol: float = 0.0,
    progress_tol: float = 0.0,
) -> CGResult:
    """Truncated CG on A x = b from ``x0`` (default 0), keeping iterates for backtracking.

    Args:
        apply: x ↦ A x on flat vectors (n,), A symmetric positive semi-definite.
        b: right-hand side (n,).
        x0: start point (n,) (Martens warm-starts from 0.95× the previous solution); None for 0.
        max_iters: iteration cap (>= 1).
        tol: stop once ‖r‖ ≤ tol·‖b‖ (relative residual); 0 disables.
        progress_tol: Martens's ε in the relative-progress rule (module docstring); 0 disables.

    Returns:
        :class:`CGResult`. Iteration stops early on a direction of zero or negative curvature
        (pᵀAp ≤ 0, possible only for a singular A), or on a non-finite value (``finite=False``).
    """
    kept = kept_iterations(max_iters)
    if x0 is None:
        x, r, products = torch.zeros_like(b), b.clone(), 0
    else:
        x, r, products = x0.clone(), b - apply(x0), 1
    finite = bool(torch.isfinite(r).all())
    if not finite:
        x, r = torch.zeros_like(b), b.clone()

    def phi_of(x: Tensor, r: Tensor) -> float:
        # A x = b − r, so φ = ½ xᵀ(b − r) − bᵀx = −½ xᵀ(b + r).
        return float(-0.5 * torch.dot(x, b + r))

    phis = [phi_of(x, r)]
    iterates = [Iterate(0, x.clone(), phis[0])] if x0 is not None and finite else []
    threshold = tol * float(b.norm())
    p, rr = r.clone(), torch.dot(r, r)
    iteration = 0
    while finite and iteration < max_iters and float(rr.sqrt()) > threshold:
        ap = apply(p)
        products += 1
        pap = torch.dot(p, ap)
        if not (torch.isfinite(ap).all() and torch.isfinite(pap)):
            finite = False
            break
        if pap <= 0:
            break
        step = rr / pap
        x = x + step * p
        r = r - step * ap
        rr_next = torch.dot(r, r)
        p = r + (rr_next / rr) * p
        rr = rr_next
        iteration += 1
        phis.append(phi_of(x, r))
        if iteration in kept:
            iterates.append(Iterate(iteration, x.clone(), phis[-1]))
        k = max(10, math.ceil(0.1 * iteration))
        if (
            progress_tol > 0
            and iteration > k
            and phis[-1] < 0
            and (phis[-1] - phis[-1 - k]) / phis[-1] < k * progress_tol
        ):
            break
    if not iterates or iterates[-1].iteration != iteration:
        iterates.append(Iterate(iteration, x.clone(), phis[-1]))
    return CGResult(x, phis[-1], iteration, products, float(r.norm()), finite, iterates)


def backtrack(iterates: Sequence[Iterate], loss_of: Callable[[Tensor], float]) -> tuple[Iterate, int]:
    """Martens's backtracking: from the last kept iterate go back while the true loss keeps decreasing.

    Args:
        iterates: kept CG iterates in increasing order (non-empty).
        loss_of: x ↦ true loss at θ + x (one forward pass per call).

    Returns:
        ``(chosen iterate, number of loss evaluations)``: the earliest iterate reached before the loss
        rose again (the best one along the way back).
    """
    best = iterates[-1]
    best_loss = loss_of(best.x)
    evaluations = 1
    for candidate in reversed(iterates[:-1]):
        loss = loss_of(candidate.x)
        evaluations += 1
        if not loss < best_loss:
            break
        best, best_loss = candidate, loss
    return best, evaluations


def lm_damping(damping: float, rho: float | None, floor: float = 1e-4) -> float:
    """Levenberg-Marquardt update: ρ < 1/4 or undefined (None/NaN) → max(λ·3/2, floor); ρ > 3/4 → λ·2/3; else λ.

    The floor lets a run started undamped (λ = 0) acquire damping when the quadratic model fails.
    """
    if rho is None or not math.isfinite(rho) or rho < 0.25:
        return max(damping * 1.5, floor)
    if rho > 0.75:
        return damping * (2.0 / 3.0)
    return damping

"""Spectral summaries of symmetric operators: top eigenpairs, trace, spectral density.

Every function takes an *operator* in the sense of the protocol stated once in
:class:`gnlib.curvature.operators.LinearOperator` (a dense ``torch.Tensor`` qualifies). Vectors are made in the
operator's ``.dtype`` on its ``.device``; random draws come from a local ``torch.Generator`` on the CPU
seeded with ``seed``, so results are deterministic and the same on every device.

Lanczos here keeps the whole Krylov basis and reorthogonalizes against it twice at every step
(classical Gram-Schmidt, twice), which is exact enough for eigenpairs and quadrature at the sizes
where one can afford storing ``n_iter`` vectors of length n.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gnlib.runtime import check_choice, invalid

DISTRIBUTIONS = ["rademacher", "gaussian"]
WHICH = ["largest", "smallest", "magnitude"]


def _size(op: Any) -> int:
    shape = tuple(op.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"op must be square (n, n), got shape {shape}")
    return shape[0]


def _dtype_device(op: Any) -> tuple[torch.dtype, torch.device]:
    return getattr(op, "dtype", torch.float64), torch.device(getattr(op, "device", "cpu"))


def _probes(n: int, count: int, distribution: str, generator: torch.Generator) -> Tensor:
    """(n, count) float64 CPU probes: Rademacher ±1 entries or standard Gaussian entries."""
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, count), generator=generator).to(torch.float64).mul_(2).sub_(1)
    return torch.randn(n, count, generator=generator, dtype=torch.float64)


def _lanczos(op: Any, start: Tensor, n_iter: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Run ``n_iter`` Lanczos steps from ``start`` with full reorthogonalization.

    Args:
        op: operator of size n.
        start: (n,) start vector in the operator's dtype/device (normalized here).
        n_iter: number of steps m (≤ n).
        generator: on breakdown (the Krylov space became invariant), continue from a fresh random
            vector orthogonal to the basis (off-diagonal entry 0) when given; stop early when None.

    Returns:
        T (m', m') float64 CPU tridiagonal matrix and Q (n, m') orthonormal basis, m' ≤ m (m' < m only
        after an early stop). Q T Qᵀ is the compression of op onto the Krylov space.
    """
    n = start.shape[0]
    basis = torch.zeros(n, n_iter, dtype=start.dtype, device=start.device)
    alphas: list[float] = []
    betas: list[float] = []
    tolerance = 10 * n * torch.finfo(start.dtype).eps
    scale = 0.0
    q = start / start.norm()
    for j in range(n_iter):
        basis[:, j] = q
        w = op @ q
        alphas.append((q @ w).item())
        span = basis[:, : j + 1]
        for _ in range(2):
            w = w - span @ (span.T @ w)
        beta = w.norm().item()
        scale = max(scale, math.hypot(alphas[-1], beta))
        if j == n_iter - 1:
            break
        if beta <= tolerance * scale:
            if generator is None:
                break
            w = _probes(n, 1, "gaussian", generator)[:, 0].to(start.dtype).to(start.device)
            for _ in range(2):
                w = w - span @ (span.T @ w)
            q, beta = w / w.norm(), 0.0
        else:
            q = w / beta
        betas.append(beta)
    m = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    return tridiagonal, basis[:, :m]


def lanczos(
    op: Any, k: int, *, n_iter: int | None = None, seed: int = 0, which: str = "largest"
) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Ritz pairs (θ, Q s) of the m-step Krylov compression T = Qᵀ A Q; the extreme ones converge first.

    Args:
        op: symmetric operator of size n.
        k: number of eigenpairs, 1 ≤ k ≤ n.
        n_iter: Lanczos steps m, k ≤ m ≤ n; default min(n, 2k + 40).
        seed: seed of the Gaussian start vector.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"`` (largest |λ|).

    Returns:
        eigenvalues (k,) sorted descending (by |λ| for ``"magnitude"``) and eigenvectors (n, k) with
        orthonormal columns, both in the operator's dtype on its device.

    Raises:
        ValueError: bad ``k``, ``n_iter`` or ``which``.
    """
    n = _size(op)
    check_choice("which", which, WHICH)
    if not 1 <= k <= n:
        raise invalid("", "k", k, f"an integer with 1 <= k <= n={n}")
    n_iter = min(n, 2 * k + 40) if n_iter is None else n_iter
    if not k <= n_iter <= n:
        raise invalid("", "n_iter", n_iter, f"an integer with k={k} <= n_iter <= n={n}")
    dtype, device = _dtype_device(op)
    generator = torch.Generator().manual_seed(seed)
    start = _probes(n, 1, "gaussian", generator)[:, 0].to(dtype).to(device)
    tridiagonal, basis = _lanczos(op, start, n_iter, generator)
    ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
    key = {"largest": ritz_values, "smallest": -ritz_values, "magnitude": ritz_values.abs()}[which]
    order = torch.argsort(key, descending=True)[:k]
    values = ritz_values[order] if which != "smallest" else ritz_values[order].flip(0)
    vectors = ritz_vectors[:, order] if which != "smallest" else ritz_vectors[:, order].flip(1)
    return values.to(dtype).to(device), basis @ vectors.to(dtype).to(device)


def hutchinson_trace(
    op: Any, n_samples: int, *, seed: int = 0, distribution: str = "rademacher", chunk: int = 16
) -> tuple[float, float]:
    """Hutchinson's unbiased trace estimate tr(A) ≈ (1/s) Σ_i z_iᵀ A z_i with random probes z_i.

    Args:
        op: operator of size n.
        n_samples: number of probes s ≥ 1.
        seed: seed of the probes.
        distribution: ``"rademacher"`` (±1 entries, minimal variance 2Σ_{i≠j} A_ij²) or ``"gaussian"``.
        chunk: probes multiplied at once as an (n, chunk) block.

    Returns:
        (estimate, standard_error): the sample mean and its standard error std(z_iᵀ A z_i)/√s
        (sample std with s − 1 degrees of freedom; nan when s = 1).

    Raises:
        ValueError: ``n_samples`` or ``chunk`` below 1, or an unknown ``distribution``.
    """
    n = _size(op)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if n_samples < 1:
        raise invalid("", "n_samples", n_samples, "an integer >= 1")
    if chunk < 1:
        raise invalid("", "chunk", chunk, "an integer >= 1")
    dtype, device = _dtype_device(op)
    probes = _probes(n, n_samples, distribution, torch.Generator().manual_seed(seed))
    samples = []
    for start in range(0, n_samples, chunk):
        z = probes[:, start : start + chunk].to(dtype).to(device)
        samples.append(((op @ z) * z).sum(0).to(torch.float64).cpu())
    values = torch.cat(samples)
    error = (values.std() / math.sqrt(n_samples)).item() if n_samples > 1 else math.nan
    return values.mean().item(), error


class SpectralDensity(NamedTuple):
    """Result of :func:`spectral_density` (float64 CPU tensors).

    Attributes:
        grid: (G,) points where the density is evaluated.
        density: (G,) smoothed eigenvalue density φ(x) = Σ_i w_i N(x; θ_i, σ²), integrating to ≈ 1.
        nodes: (N,) quadrature nodes θ_i (Ritz values of every probe, concatenated).
        weights: (N,) quadrature weights w_i ≥ 0 summing to 1, so Σ_i w_i f(θ_i) ≈ tr f(A) / n.
        sigma: Gaussian kernel width σ.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float


def spectral_density(
    op: Any,
    *,
    n_probes: int,
    n_iter: int,
    grid: Tensor | None = None,
    sigma: float | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    For each probe v (drawn as in :func:`hutchinson_trace` with the same seed, then normalized), m
    Lanczos steps give T = S diag(θ) Sᵀ; the nodes θ_j with weights S_0j² / n_probes form a quadrature
    rule for the spectral measure (1/n) Σ_λ δ_λ, exact on polynomials of degree < 2m for that probe.
    In particular Σ_i w_i θ_i = (1/n_probes) Σ_v vᵀAv, the Hutchinson estimate of tr(A)/n.

    Args:
        op: symmetric operator of size n.
        n_probes: number of random probes ≥ 1.
        n_iter: Lanczos steps per probe, 1 ≤ m ≤ n (a probe stops early if its Krylov space closes).
        grid: (G,) evaluation points; default 1000 points spanning the nodes ± 5σ.
        sigma: Gaussian kernel width; default 1% of max(λ_max − λ_min, |λ_max|, |λ_min|) over the nodes
            (1e-2 when all nodes are 0).
        seed: seed of the probes.
        distribution: probe entries, ``"rademacher"`` or ``"gaussian"``.

    Returns:
        :class:`SpectralDensity` (grid, density, nodes, weights, sigma).

    Raises:
        ValueError: ``n_probes`` < 1, ``n_iter`` outside [1, n], ``sigma`` ≤ 0 or a bad ``distribution``.
    """
    n = _size(op)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if n_probes < 1:
        raise invalid("", "n_probes", n_probes, "an integer >= 1")
    if not 1 <= n_iter <= n:
        raise invalid("", "n_iter", n_iter, f"an integer with 1 <= n_iter <= n={n}")
    if sigma is not None and not sigma > 0:
        raise invalid("", "sigma", sigma, "a number > 0")
    dtype, device = _dtype_device(op)
    probes = _probes(n, n_probes, distribution, torch.Generator().manual_seed(seed))
    nodes, weights = [], []
    for i in range(n_probes):
        tridiagonal, _ = _lanczos(op, probes[:, i].to(dtype).to(device), n_iter, None)
        theta, vectors = torch.linalg.eigh(tridiagonal)
        nodes.append(theta)
        weights.append(vectors[0].square() / n_probes)
    nodes_t, weights_t = torch.cat(nodes), torch.cat(weights)
    lo, hi = nodes_t.min().item(), nodes_t.max().item()
    if sigma is None:
        scale = max(hi - lo, abs(hi), abs(lo))
        sigma = 0.01 * scale if scale > 0 else 1e-2
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    return SpectralDensity(grid, smoothed_density(nodes_t, grid, sigma, weights_t), nodes_t, weights_t, float(sigma))


def smoothed_density(nodes: Tensor, grid: Tensor, sigma: float, weights: Tensor | None = None) -> Tensor:
    """A discrete spectral measure Σ_i w_i δ_θi smoothed with a Gaussian kernel: φ(x) = Σ_i w_i N(x; θ_i, σ²).

    :func:`spectral_density` smooths its quadrature rule with it; given the n exact eigenvalues of a matrix
    and the default weights w_i = 1/n, it smooths the exact measure (1/n) Σ_λ δ_λ with the same kernel,
    so the two densities compare point by point.

    Args:
        nodes: (N,) points θ_i (eigenvalues or quadrature nodes).
        grid: (G,) evaluation points x.
        sigma: kernel width σ > 0.
        weights: (N,) weights w_i (default 1/N each); with weights summing to 1 φ integrates to 1.

    Returns:
        (G,) float64 CPU density values φ(x).

    Raises:
        ValueError: ``sigma`` <= 0, or ``nodes``/``weights`` of different lengths.
    """
    if not sigma > 0:
        raise invalid("", "sigma", sigma, "a number > 0")
    nodes = torch.as_tensor(nodes, dtype=torch.float64).cpu().reshape(-1)
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu().reshape(-1)
    if weights is None:
        weights = torch.full_like(nodes, 1.0 / max(nodes.numel(), 1))
    weights = torch.as_tensor(weights, dtype=torch.float64).cpu().reshape(-1)
    if weights.shape != nodes.shape:
        raise ValueError(f"weights has {weights.numel()} entries for {nodes.numel()} nodes; give one per node")
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights


def ggn_hessian_summary(ggn: Tensor, hessian: Tensor) -> dict[str, float]:
    """How the dense GGN G and Hessian H of one loss at one point differ, in a few numbers.

    H = G + R, where R = Σ_k (∂ℓ/∂z_k) ∇²z_k is the residual the Gauss-Newton approximation drops; G is
    positive semi-definite, H need not be.

    Args:
        ggn: (n, n) symmetric G.
        hessian: (n, n) symmetric H, same size.

    Returns:
        ``residual_ratio`` ‖H − G‖_F / ‖H‖_F; ``trace_G`` tr G; ``lambda_max_G``, ``lambda_min_G``,
        ``lambda_max_H``, ``lambda_min_H`` the extreme eigenvalues; ``negative_mass_H`` Σ_{λ<0} |λ| / Σ |λ|
        over H's eigenvalues (0 when H is positive semi-definite, 1 when negative semi-definite).

    Raises:
        ValueError: the matrices are not square or differ in shape.
    """
    if ggn.ndim != 2 or ggn.shape[0] != ggn.shape[1] or ggn.shape != hessian.shape:
        raise ValueError(
            f"ggn and hessian must be square and alike, got shapes {tuple(ggn.shape)} and {tuple(hessian.shape)}"
        )
    eig_g, eig_h = torch.linalg.eigvalsh(ggn), torch.linalg.eigvalsh(hessian)
    return {
        "residual_ratio": ((hessian - ggn).norm() / hessian.norm()).item(),
        "trace_G": eig_g.sum().item(),
        "lambda_max_G": eig_g[-1].item(),
        "lambda_min_G": eig_g[0].item(),
        "lambda_max_H": eig_h[-1].item(),
        "lambda_min_H": eig_h[0].item(),
        "negative_mass_H": (eig_h.clamp(max=0).abs().sum() / eig_h.abs().sum()).item(),
    }

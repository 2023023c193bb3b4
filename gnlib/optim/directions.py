"""Update directions of second-order methods and their approximations, as functions of a curvature and a gradient.

The exact damped Gauss-Newton direction −(G + λI)⁻¹ g (dense solve or conjugate gradients), layerwise GN,
and the directions of diagonal GGN, Adam, Shampoo, SOAP and Muon with the per-sample statistics they are
built from; K-FAC is in :mod:`gnlib.optim.kfac`, the comparison with exact GN in
:mod:`gnlib.optim.direction_comparison`. A curvature is a dense (n, n) tensor or an operator; gradients and
directions are params dicts or their flat view. :func:`gn_directions` takes one cold-started GaussNewton
outer step per partition and returns each direction; :func:`adam_second_moment` reads the v̂ a trained
torch Adam holds.

docs/directions.md has the table of methods, the comparison maths and the shapes each function takes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.curvature.blocks import BlockDiagonalOperator, block_indices
from gnlib.losses import CrossEntropy, Loss
from gnlib.optim.factory import split_params
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.optim.hessian_free import conjugate_gradient
from gnlib.params import Params, flatten, unflatten
from gnlib.runtime import invalid

Vector = Tensor | Mapping[str, Tensor]
Batch = tuple[Tensor, Tensor]

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # the reference Muon's quintic coefficients


# ---------------------------------------------------------------------------------------------------
# helpers


def _flat(v: Vector) -> Tensor:
    return flatten(v) if isinstance(v, Mapping) else v


def _like_input(flat: Tensor, like: Vector) -> Vector:
    """``flat`` in the form of ``like``: a params dict shaped like it, or the flat tensor itself."""
    return unflatten(flat, like) if isinstance(like, Mapping) else flat


def _check_damping(damping: float) -> None:
    if not damping >= 0:
        raise invalid("", "damping", damping, "a number >= 0")


def _size(curvature: Any) -> int:
    shape = tuple(curvature.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"curvature must be square (n, n), got shape {shape}")
    return shape[0]


def _check_vector(v: Tensor, n: int, what: str) -> None:
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{what} has shape {tuple(v.shape)}, expected ({n},) to match the curvature")


# ---------------------------------------------------------------------------------------------------
# solves


def solve(curvature: Any, g: Vector, damping: float, *, tol: float = 1e-10, max_iter: int | None = None) -> Vector:
    """(C + λI)⁻¹ g: a dense solve for a tensor ``curvature``, conjugate gradients for an operator.

    Conjugate gradients (:func:`gnlib.optim.hessian_free.conjugate_gradient`) start from 0 and run until
    the relative residual ‖g − (C + λI)x‖/‖g‖ is at most ``tol``.

    Args:
        curvature: dense (n, n) tensor or operator.
        g: params dict or flat (n,) vector; the solution comes back in the same form.
        damping: λ ≥ 0.
        tol: relative residual to reach (operators only).
        max_iter: CG iteration cap (operators only; default 2n).

    Raises:
        ValueError: shapes that do not match, negative damping, or CG not reaching ``tol``.
    """
    _check_damping(damping)
    flat = _flat(g)
    n = _size(curvature)
    _check_vector(flat, n, "g")
    if isinstance(curvature, Tensor):
        eye = torch.eye(n, dtype=curvature.dtype, device=curvature.device)
        return _like_input(torch.linalg.solve(curvature + damping * eye, flat), g)
    if not tol > 0:
        raise invalid("", "tol", tol, "a number > 0")
    result = conjugate_gradient(lambda x: curvature @ x + damping * x, flat, max_iters=max_iter or 2 * n, tol=tol)
    if not (result.finite and result.residual <= tol * flat.norm().item()):
        raise ValueError(
            f"conjugate gradients reached a relative residual of {result.residual / flat.norm().item():.2e} > "
            f"tol={tol} after {result.iterations} iterations; raise max_iter or damping"
        )
    return _like_input(result.x, g)


def gn_direction(curvature: Any, g: Vector, damping: float, **cg: Any) -> Vector:
    """The exact damped Gauss-Newton direction −(G + λI)⁻¹ g (see :func:`solve`; ``cg``: tol, max_iter)."""
    d = solve(curvature, g, damping, **cg)
    return {name: -t for name, t in d.items()} if isinstance(d, Mapping) else -d


def layerwise_gn_direction(
    curvature: Any,
    g: Vector,
    partition: Mapping[str, list[str]],
    params_like: nn.Module | Mapping[str, Tensor],
    damping: float,
    **cg: Any,
) -> Vector:
    """Layerwise GN: −(G_bb + λI)⁻¹ g_b for every block b of ``partition``, the blocks solved independently.

    A dense curvature is sliced block by block; an operator is restricted to its diagonal blocks with
    :class:`gnlib.curvature.blocks.BlockDiagonalOperator` and solved by conjugate gradients (``cg``: tol, max_iter).
    With a single block this is :func:`gn_direction`.
    """
    _check_damping(damping)
    flat = _flat(g)
    n = _size(curvature)
    _check_vector(flat, n, "g")
    if not isinstance(curvature, Tensor):
        return gn_direction(BlockDiagonalOperator(curvature, partition, params_like), g, damping, **cg)
    out = torch.zeros_like(flat)
    for index in block_indices(partition, params_like).values():
        index = index.to(flat.device)
        block = curvature.index_select(0, index).index_select(1, index)
        eye = torch.eye(len(index), dtype=block.dtype, device=block.device)
        out[index] = -torch.linalg.solve(block + damping * eye, flat[index])
    return _like_input(out, g)


# ---------------------------------------------------------------------------------------------------
# diagonal preconditioners


def curvature_diagonal(curvature: Any, *, n_probes: int | None = None, seed: int = 0, chunk: int = 64) -> Tensor:
    """diag(C), flat (n,): read off a dense tensor, or from products with an operator.

    For an operator, ``n_probes=None`` multiplies it onto every basis vector (n products, exact);
    an integer uses that many Rademacher probes z and the unbiased estimate mean(z ⊙ Cz) (exact for a
    diagonal C with one probe).

    Raises:
        ValueError: ``n_probes`` < 1 or ``chunk`` < 1.
    """
    n = _size(curvature)
    if isinstance(curvature, Tensor):
        return curvature.diagonal().clone()
    if chunk < 1:
        raise invalid("", "chunk", chunk, "an integer >= 1")
    dtype = getattr(curvature, "dtype", torch.float64)
    device = getattr(curvature, "device", torch.device("cpu"))
    if n_probes is None:
        diagonal = torch.empty(n, dtype=dtype, device=device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            basis = torch.zeros(n, stop - start, dtype=dtype, device=device)
            basis[torch.arange(start, stop), torch.arange(stop - start)] = 1
            diagonal[start:stop] = (curvature @ basis)[start:stop].diagonal()
        return diagonal
    if n_probes < 1:
        raise invalid("", "n_probes", n_probes, "an integer >= 1, or None for the exact diagonal")
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, dtype=dtype, device=device)
    for start in range(0, n_probes, chunk):
        count = min(chunk, n_probes - start)
        z = (torch.randint(0, 2, (n, count), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        total += ((curvature @ z) * z).sum(1)
    return total / n_probes


def diagonal_direction(diagonal: Vector, g: Vector, damping: float) -> Vector:
    """−g / (d + λ) entrywise for a non-negative diagonal d (e.g. diag(G)), in the form of ``g``."""
    _check_damping(damping)
    flat_d, flat_g = _flat(diagonal), _flat(g)
    if flat_d.shape != flat_g.shape:
        raise ValueError(f"diagonal has shape {tuple(flat_d.shape)}, g has {tuple(flat_g.shape)}")
    return _like_input(-flat_g / (flat_d + damping), g)


def adam_direction(second_moment: Vector, g: Vector, eps: float = 1e-8) -> Vector:
    """Adam's direction without momentum: −g / (√v + ε) entrywise, in the form of ``g``."""
    if not eps >= 0:
        raise invalid("", "eps", eps, "a number >= 0")
    flat_v, flat_g = _flat(second_moment), _flat(g)
    if flat_v.shape != flat_g.shape:
        raise ValueError(f"second_moment has shape {tuple(flat_v.shape)}, g has {tuple(flat_g.shape)}")
    return _like_input(-flat_g / (flat_v.sqrt() + eps), g)


def adam_second_moment(model: nn.Module, optimizer: torch.optim.Optimizer) -> Params:
    """The bias-corrected second moment v̂ = v_t / (1 − β₂^t) that a torch Adam or AdamW holds for each parameter.

    torch keeps v_t = β₂ v_{t−1} + (1 − β₂) g_t² (``exp_avg_sq``, v_0 = 0) after t = ``state["step"]``
    updates, with β₂ = ``betas[1]`` of the parameter's group; dividing by 1 − β₂^t undoes the zero start, so
    v̂ is the one Adam's update −lr · m̂ / (√v̂ + ε) uses. :func:`adam_direction` takes it as
    ``second_moment``: the direction Adam's squared-gradient EMA from training gives on a new gradient.

    Args:
        model: the model whose parameters ``optimizer`` updates.
        optimizer: a ``torch.optim.Adam`` or ``AdamW`` (any optimizer whose state holds ``exp_avg_sq`` and
            ``step`` and whose groups hold ``betas``) that has taken at least one step.

    Returns:
        params dict in ``named_parameters()`` order: v̂ of each parameter, its shape, detached copies.

    Raises:
        ValueError: a parameter of ``model`` has no Adam state in ``optimizer`` (named in the message).
    """
    beta2 = {p: group["betas"][1] for group in optimizer.param_groups if "betas" in group for p in group["params"]}
    moments = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        if p not in beta2 or "exp_avg_sq" not in state:
            raise ValueError(
                f"parameter {name!r} has no Adam second moment in the optimizer: pass a torch Adam or AdamW over "
                "the model's parameters that has taken at least one step"
            )
        step = float(state["step"])
        moments[name] = state["exp_avg_sq"].detach() / (1 - beta2[p] ** step)
    return moments


# ---------------------------------------------------------------------------------------------------
# per-sample gradients and their statistics


def per_sample_gradients(
    model: nn.Module, params: Mapping[str, Tensor], batch: Batch, loss: Loss = CrossEntropy()
) -> Params:
    """Gradients of the loss on each batch row (a sequence, or a regression row) separately.

    Returns:
        params dict whose tensors have a leading axis of the batch size N: entry i is ∇ℓ_i, the gradient
        of the loss on row i alone. When every row has the same number of positions (always, for
        (B, T) token batches), the batch gradient is their mean.
    """
    inputs, targets = batch

    def row_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss.value(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    detached = {name: t.detach() for name, t in params.items()}
    return torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0))(detached, inputs, targets)


def second_moment(per_sample: Mapping[str, Tensor]) -> Params:
    """V = mean_i g_i² entrywise over the leading (sample) axis: the diagonal of the empirical Fisher."""
    return {name: t.square().mean(0) for name, t in per_sample.items()}


class KroneckerStatistics(NamedTuple):
    """Shampoo's two-sided statistics of one (m, n) weight matrix.

    Attributes:
        left: L = mean_i G_i G_iᵀ, (m, m).
        right: R = mean_i G_iᵀ G_i, (n, n).
    """

    left: Tensor
    right: Tensor


def kronecker_statistics(per_sample: Mapping[str, Tensor]) -> dict[str, KroneckerStatistics]:
    """L and R (:class:`KroneckerStatistics`) of every matrix (2-D tensor) from per-sample gradients (N, m, n)."""
    return {
        name: KroneckerStatistics(
            torch.einsum("sik,sjk->ij", t, t) / t.shape[0],
            torch.einsum("ski,skj->ij", t, t) / t.shape[0],
        )
        for name, t in per_sample.items()
        if t.dim() == 3
    }


def _inverse_root(matrix: Tensor, power: float, eps: float) -> Tensor:
    """(M + ε·λ_max I)^(−power) for a symmetric PSD M, by eigendecomposition (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(0)
    values = values + eps * values.max()
    return (vectors * values.pow(-power)) @ vectors.T


def _check_dict(g: Any, what: str) -> None:
    if not isinstance(g, Mapping):
        raise ValueError(f"{what} needs g as a params dict (names and shapes), got {type(g).__name__}")


def shampoo_direction(
    g: Mapping[str, Tensor],
    statistics: Mapping[str, KroneckerStatistics],
    second_moment: Mapping[str, Tensor],
    *,
    eps: float = 1e-6,
    adam_eps: float = 1e-8,
) -> Params:
    """Shampoo: −(L + εℓI)^-¼ G_W (R + εrI)^-¼ for each matrix in ``statistics``, Adam for the other tensors.

    ε is relative: ℓ and r are the largest eigenvalues of L and R, so the direction does not depend on
    the scale of the gradients. The tensors not in ``statistics`` get :func:`adam_direction` with
    ``second_moment`` and ``adam_eps`` (as SOAP and the reference Shampoo do for vectors).
    """
    _check_dict(g, "shampoo_direction")
    out = {}
    for name, t in g.items():
        if name in statistics:
            left, right = statistics[name]
            out[name] = -_inverse_root(left, 0.25, eps) @ t @ _inverse_root(right, 0.25, eps)
        else:
            out[name] = adam_direction(second_moment[name], t, adam_eps)
    return out


def soap_direction(
    g: Mapping[str, Tensor],
    statistics: Mapping[str, KroneckerStatistics],
    per_sample: Mapping[str, Tensor],
    *,
    eps: float = 1e-8,
) -> Params:
    """SOAP: Adam in the eigenbasis of Shampoo's factors for each matrix in ``statistics``, Adam elsewhere.

    With L = Q_L Λ Q_Lᵀ and R = Q_R Λ' Q_Rᵀ: Ĝ = Q_Lᵀ G_W Q_R, v̂ = mean_i (Q_Lᵀ G_i Q_R)², direction
    −Q_L (Ĝ / (√v̂ + ε)) Q_Rᵀ. Other tensors: −g / (√v + ε), v = mean_i g_i².
    """
    _check_dict(g, "soap_direction")
    out = {}
    for name, t in g.items():
        samples = per_sample[name]
        if name in statistics:
            q_left = torch.linalg.eigh(statistics[name].left)[1]
            q_right = torch.linalg.eigh(statistics[name].right)[1]
            rotated = q_left.T @ samples @ q_right
            step = adam_direction(rotated.square().mean(0), q_left.T @ t @ q_right, eps)
            out[name] = q_left @ step @ q_right.T
        else:
            out[name] = adam_direction(samples.square().mean(0), t, eps)
    return out


# ---------------------------------------------------------------------------------------------------
# Muon


def orthogonalize(matrix: Tensor, ns_steps: int | None = None) -> Tensor:
    """The polar factor UVᵀ of a matrix M = U S Vᵀ (exact, by SVD), or Muon's approximation of it.

    Args:
        matrix: (m, n).
        ns_steps: ``None`` for the exact polar factor; an integer for that many steps of the reference
            Muon's quintic Newton-Schulz iteration X ← aX + (bA + cA²)X, A = XXᵀ, from X = M/‖M‖_F with
            (a, b, c) = (3.4445, −4.7750, 2.0315), which maps singular values into roughly [0.7, 1.2].

    Raises:
        ValueError: not a matrix, or ``ns_steps`` < 1.
    """
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    if ns_steps is None:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u @ vh
    if ns_steps < 1:
        raise invalid("", "ns_steps", ns_steps, "an integer >= 1, or None for the exact polar factor")
    a, b, c = NEWTON_SCHULZ
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / (x.norm() + 1e-7)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_direction(
    g: Mapping[str, Tensor],
    second_moment: Mapping[str, Tensor],
    *,
    hidden: Sequence[str] | None = None,
    ns_steps: int | None = None,
    lr: float = 0.02,
    adamw_lr: float = 3e-3,
    eps: float = 1e-8,
) -> Params:
    """Muon's direction without momentum: −lr·max(1, m/n)^½·orth(G_W) on hidden matrices, −adamw_lr·Adam elsewhere.

    The hidden matrices are the 2-D tensors except the embedding and output head (``split_params``,
    as the study runs Muon), unless ``hidden`` names them. ``lr``/``adamw_lr`` are the reference
    learning rates (:data:`gnlib.optim.DEFAULTS`): they set the relative size of the two groups, which
    the cosine with another direction depends on (the quadratic reduction ratio does too, while
    ignoring the overall scale).

    Raises:
        ValueError: ``hidden`` names a tensor that is not a matrix of ``g``.
    """
    _check_dict(g, "muon_direction")
    hidden = split_params(g)[0] if hidden is None else list(hidden)
    wrong = [name for name in hidden if name not in g or g[name].dim() != 2]
    if wrong:
        raise invalid("", "hidden", wrong, f"names of matrices of g, {[n for n, t in g.items() if t.dim() == 2]}")
    out = {}
    for name, t in g.items():
        if name in hidden:
            rows, cols = t.shape
            out[name] = -lr * max(1.0, rows / cols) ** 0.5 * orthogonalize(t, ns_steps)
        else:
            out[name] = adamw_lr * adam_direction(second_moment[name], t, eps)
    return out


# ---------------------------------------------------------------------------------------------------
# paths


def follow(direction: Callable[[Tensor], Tensor], start: Tensor, steps: int, lr: float = 1.0) -> Tensor:
    """The path θ_{k+1} = θ_k + lr · direction(θ_k) from ``start`` (flat), as a (steps + 1, n) tensor.

    The path stops early (fewer rows) once an iterate is not finite.
    """
    if steps < 0:
        raise invalid("", "steps", steps, "an integer >= 0")
    path = [start.detach().clone()]
    for _ in range(steps):
        nxt = path[-1] + lr * direction(path[-1])
        if not torch.isfinite(nxt).all():
            break
        path.append(nxt.detach())
    return torch.stack(path)


# ------------------------------------------------------------------------------ probes on a model


def _replay(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A batch source that returns ``batches`` in order, again and again."""
    cycle = itertools.cycle(batches)
    return lambda: next(cycle)


def gn_directions(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    partitions: Mapping[str, Any],
    lr: float,
    **options: Any,
) -> dict[str, Params]:
    """The inner-solve direction d = θ̂ − θ of one cold-started GN outer step from the model's current θ, per partition.

    Every partition sees the same ``len(batches)`` inner batches, in order, from the same anchor; the
    model is left unchanged. The direction is the pre-line-search step (the GaussNewton step is taken
    with ``line_search=None``, i.e. α = 1, on a copy of the model).

    Args:
        model: the model at the anchor θ.
        batches: the inner batches (N = ``len(batches)`` inner steps).
        partitions: label → ``blocks`` option of :class:`~gnlib.optim.gauss_newton.GaussNewton` (None: full GN).
        lr: inner LR.
        **options: further GaussNewton options shared by every partition.

    Returns:
        label → direction (a params dict in model order).
    """
    directions = {}
    for label, blocks in partitions.items():
        copy = deepcopy(model)
        before = {n: p.detach().clone() for n, p in copy.named_parameters()}
        optimizer = GaussNewton(
            copy,
            _replay(list(batches)),
            blocks=blocks,
            inner_lr=lr,
            inner_steps=len(batches),
            line_search=None,
            line_search_batches=1,
            warm_start=False,
            **options,
        )
        optimizer.step()
        directions[label] = {n: p.detach() - before[n] for n, p in copy.named_parameters()}
    return directions

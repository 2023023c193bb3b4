"""K-FAC: the Kronecker factors G_WW ≈ B ⊗ A of each linear layer's GGN block, and the direction they give.

A is the layer input's second moment, B the second moment of the output-space gradients (Fisher sampled
from the model's predictive distribution, or the exact per-position square root of H_z). The direction is
−(B ⊗ A + λI)⁻¹ g per layer, exact damping through both eigenbases, and the diagonal-GGN direction for every
other tensor (docs/directions.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.losses import MSE, CrossEntropy, Loss
from gnlib.optim.directions import Batch, Vector, _check_damping, _check_dict, diagonal_direction
from gnlib.params import Params, check_like, unflatten
from gnlib.runtime import check_choice, invalid

FISHER_TYPES = ["mc", "exact"]


class KroneckerFactors(NamedTuple):
    """K-FAC's approximation G_WW ≈ B ⊗ A of one linear layer's GGN block (row-major vec of W, (out, in)).

    Attributes:
        input: A = (1/n) Σ_t a_t a_tᵀ over the n positions, a_t the layer input with a trailing 1 when
            the layer has a bias, (in[+1], in[+1]).
        output: B = E Σ_t b_t b_tᵀ, b_t the gradient of the output-space vector ũᵀz at the layer output
            (ũ with E ũũᵀ = H_z per position), (out, out).
        bias: name of the bias folded into the last input column, or None.
    """

    input: Tensor
    output: Tensor
    bias: str | None


def _qualified(module: str, leaf: str) -> str:
    """Parameter name of ``leaf`` in the module named ``module`` ("" for the root)."""
    return f"{module}.{leaf}" if module else leaf


def _output_factors(
    loss: Loss, z: Tensor, targets: Tensor, fisher: str, mc_samples: int, generator: torch.Generator
) -> list[Tensor]:
    """Output-space vectors ũ_k (shape of z) with Σ_k ũ_k ũ_kᵀ ≈ H_z within each position.

    ``"exact"``: the columns of a square root of each position's Hessian, summed over positions
    (cross-position products are kept, so exact only when positions do not interact in the model).
    ``"mc"``: ũ = ∇_z ℓ at targets sampled from the model's predictive distribution, times √n / √S for
    S samples (unbiased, cross-position terms vanish in expectation).
    """
    n = z.numel() // z.shape[-1]
    classes = z.shape[-1]
    if isinstance(loss, CrossEntropy):
        p = torch.softmax(z, dim=-1)
        if fisher == "exact":
            # diag(√p) − p √pᵀ is a square root of diag(p) − ppᵀ because Σ p = 1
            root = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)
            return [root[..., c] / n**0.5 for c in range(classes)]
        flat_p = p.reshape(-1, classes)
        samples = [
            torch.multinomial(flat_p.cpu(), 1, generator=generator).to(z.device).reshape(z.shape[:-1])
            for _ in range(mc_samples)
        ]
        return [
            (p - torch.nn.functional.one_hot(y, classes).to(p.dtype)) * (n / mc_samples) ** 0.5 / n for y in samples
        ]
    if isinstance(loss, MSE):
        if fisher == "exact":
            eye = torch.eye(classes, dtype=z.dtype, device=z.device)
            return [eye[c].expand_as(z) / n**0.5 for c in range(classes)]
        noise = [torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) for _ in range(mc_samples)]
        return [e / (n * mc_samples) ** 0.5 for e in noise]
    raise invalid("kfac_factors", "loss", type(loss).__name__, "CrossEntropy or MSE")


def kfac_factors(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batch: Batch,
    loss: Loss = CrossEntropy(),
    *,
    fisher: str = "mc",
    mc_samples: int = 1,
    seed: int = 0,
) -> dict[str, KroneckerFactors]:
    """K-FAC factors of every ``nn.Linear`` whose weight is a parameter, from forward hooks and backward passes.

    One forward at ``params`` records each linear layer's inputs a (positions × in) and outputs s; then
    for each output-space vector ũ (see ``fisher``) one backward gives b = ∂(ũᵀz)/∂s and adds bᵀb to B.
    A = aᵀa / n over the n positions (with a column of ones appended for a bias). For one layer with
    inputs that do not depend on θ and an MSE loss, B ⊗ A is that layer's GGN block exactly; in a
    transformer positions share weights and interact, and B ⊗ A is the "K-FAC expand" approximation.

    Args:
        model: the model (any module whose linear layers are ``nn.Linear``).
        params: where the factors are taken (params dict in ``named_parameters()`` order).
        batch: ``(inputs, targets)``.
        loss: :class:`~gnlib.losses.CrossEntropy` or :class:`~gnlib.losses.MSE`.
        fisher: ``"mc"``: ũ from ``mc_samples`` targets sampled from the model's predictive distribution
            (the Fisher, equal to the GGN for these losses, in expectation); ``"exact"``: ũ the columns of
            the per-position square root of H_z (one backward per output class; exact when positions
            do not interact, e.g. an MLP on rows).
        mc_samples: samples for ``"mc"``.
        seed: seeds the sampled targets.

    Returns:
        weight name → :class:`KroneckerFactors` for each ``nn.Linear`` whose weight is named in ``params``
        (a head tied to the embedding is not: it is named ``embed.weight``); other tensors are left out.

    Raises:
        ValueError: unknown ``fisher``, ``mc_samples`` < 1, or a loss other than CrossEntropy/MSE.
    """
    check_choice("fisher", fisher, FISHER_TYPES)
    if mc_samples < 1:
        raise invalid("", "mc_samples", mc_samples, "an integer >= 1")
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _qualified(name, "weight") in params
    }
    records: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [
        module.register_forward_hook(lambda mod, args, out, name=name: records.__setitem__(name, (args[0], out)))
        for name, module in linears.items()
    ]
    inputs, targets = batch
    leaves = {name: t.detach().requires_grad_() for name, t in params.items()}
    try:
        z = functional_call(model, leaves, (inputs,))
    finally:
        for hook in hooks:
            hook.remove()
    names = list(records)
    outputs = [records[name][1] for name in names]
    generator = torch.Generator().manual_seed(seed)
    second = {name: 0.0 for name in names}
    for u in _output_factors(loss, z.detach(), targets, fisher, mc_samples, generator):
        grads = torch.autograd.grad(z, outputs, grad_outputs=u, retain_graph=True, allow_unused=True)
        for name, s, b in zip(names, outputs, grads):
            b = (torch.zeros_like(s) if b is None else b).reshape(-1, s.shape[-1])
            second[name] = second[name] + b.T @ b
    factors = {}
    for name in names:
        a = records[name][0].detach()
        a = a.reshape(-1, a.shape[-1])
        bias = _qualified(name, "bias") if linears[name].bias is not None else None
        if bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        factors[_qualified(name, "weight")] = KroneckerFactors(a.T @ a / a.shape[0], second[name].detach(), bias)
    return factors


def kfac_direction(
    g: Mapping[str, Tensor],
    factors: Mapping[str, KroneckerFactors],
    damping: float,
    diagonal: Vector | None = None,
) -> Params:
    """K-FAC: −(B ⊗ A + λI)⁻¹ g_W per layer (weight and bias together), −g / (diag(G) + λ) elsewhere.

    The damping is exact, not factored: with A = Q_A Λ_A Q_Aᵀ and B = Q_B Λ_B Q_Bᵀ the layer's step is
    −Q_B [(Q_Bᵀ Ĝ Q_A) / (λ_B λ_Aᵀ + λ)] Q_Aᵀ, Ĝ = [G_W | g_b] the weight gradient with the bias gradient
    as its last column.

    Args:
        g: gradient (params dict).
        factors: from :func:`kfac_factors`.
        damping: λ ≥ 0.
        diagonal: diag(G) as a params dict or flat vector
            (:func:`~gnlib.optim.directions.curvature_diagonal`), needed when some tensor is in no factor.

    Raises:
        ValueError: a tensor outside the factors and no ``diagonal``.
    """
    _check_dict(g, "kfac_direction")
    _check_damping(damping)
    covered = set(factors) | {f.bias for f in factors.values() if f.bias is not None}
    rest = [name for name in g if name not in covered]
    out: Params = {}
    if rest:
        if diagonal is None:
            raise ValueError(f"tensors {rest} have no Kronecker factors: pass diagonal= (diag(G)) for them")
        diagonal = unflatten(diagonal, g) if isinstance(diagonal, Tensor) else diagonal
        check_like(diagonal, g, "diagonal")
        out.update({name: diagonal_direction(diagonal[name], g[name], damping) for name in rest})
    for name, layer in factors.items():
        out.update({k: -v for k, v in kronecker_solve(g, name, layer, kronecker_eigen(layer), damping).items()})
    return {name: out[name] for name in g}


class KroneckerEigen(NamedTuple):
    """Eigendecompositions A = Q_A diag(λ_A) Q_Aᵀ and B = Q_B diag(λ_B) Q_Bᵀ of one layer's factors."""

    values_a: Tensor
    q_a: Tensor
    values_b: Tensor
    q_b: Tensor


def kronecker_eigen(factors: KroneckerFactors) -> KroneckerEigen:
    """The eigendecompositions of one layer's factors (``torch.linalg.eigh``)."""
    values_a, q_a = torch.linalg.eigh(factors.input)
    values_b, q_b = torch.linalg.eigh(factors.output)
    return KroneckerEigen(values_a, q_a, values_b, q_b)


def kronecker_solve(
    g: Mapping[str, Tensor], name: str, factors: KroneckerFactors, eigen: KroneckerEigen, damping: float
) -> Params:
    """(B ⊗ A + λI)⁻¹ g for the layer whose weight is ``name`` (its bias too): weight (and bias) name → tensor.

    Exact damping through both eigenbases: Q_B [(Q_Bᵀ Ĝ Q_A) / (λ_B λ_Aᵀ + λ)] Q_Aᵀ, Ĝ = [G_W | g_b].
    """
    bias = factors.bias
    grad = g[name] if bias is None else torch.cat([g[name], g[bias].unsqueeze(1)], dim=1)
    scaled = (eigen.q_b.T @ grad @ eigen.q_a) / (torch.outer(eigen.values_b, eigen.values_a) + damping)
    step = eigen.q_b @ scaled @ eigen.q_a.T
    return {name: step} if bias is None else {name: step[:, :-1], bias: step[:, -1]}

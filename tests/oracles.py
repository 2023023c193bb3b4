"""Dense float64 references built with plain autograd, and the small models and batches they are built on.

gnlib's curvature code is tested against these, so they use ``torch.func`` and ``torch.autograd`` only, never
gnlib's own products or dense matrices. Notation: θ the flat parameters (n,), in the order of the params dict;
z = f(θ; x) the model's outputs, flattened to (n_out,); ℓ(z, y) the loss; J = ∂z/∂θ (n_out, n);
H_z = ∇²_z ℓ (n_out, n_out); G = Jᵀ H_z J the Gauss-Newton matrix (GGN) and H = ∇²_θ ℓ(f(θ; x), y) the
Hessian, both (n, n). A loss is any callable ``loss(z, y)`` with z in the model's output shape, e.g.
``CrossEntropy().value`` or :func:`token_cross_entropy`.
"""

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gnlib.models import build_model, mlp

F64 = torch.float64
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------- flat parameters


def flat_params(params: Mapping[str, Tensor]) -> Tensor:
    """θ: the tensors of ``params`` concatenated in the dict's order, shape (n,)."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflat_params(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The params dict of ``flat`` (n,): consecutive slices viewed in the names and shapes of ``like``."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[start : start + t.numel()].view(t.shape)
        start += t.numel()
    return out


def outputs_of(model: nn.Module, like: Mapping[str, Tensor], inputs: Tensor) -> Callable[[Tensor], Tensor]:
    """θ ↦ f(θ; x): the model's outputs (in their own shape) at flat parameters θ (n,), by ``functional_call``."""
    return lambda theta: functional_call(model, unflat_params(theta, like), (inputs,))


def token_cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over all tokens: logits z (..., V), integer targets y (...), by torch's own."""
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


# ------------------------------------------------------------------------------- dense matrices


def dense_jacobian(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """J = ∂ z / ∂θ at ``params``, by ``torch.func.jacrev``.

    Returns:
        (n_out, n): row k is the gradient of the k-th output (outputs flattened in C order).
    """
    outputs = outputs_of(model, params, inputs)
    return torch.func.jacrev(lambda theta: outputs(theta).reshape(-1))(flat_params(params))


def output_gradient(loss: LossFn, z: Tensor, targets: Tensor) -> Tensor:
    """g_z = ∇_z ℓ(z, y) by ``torch.func.grad``, flat (n_out,) for outputs z of any shape."""
    return torch.func.grad(lambda f: loss(f.reshape(z.shape), targets))(z.reshape(-1))


def output_hessian(loss: LossFn, z: Tensor, targets: Tensor) -> Tensor:
    """H_z = ∇²_z ℓ(z, y) by ``torch.func.hessian``, (n_out, n_out) over the flattened outputs."""
    return torch.func.hessian(lambda f: loss(f.reshape(z.shape), targets))(z.reshape(-1))


def dense_ggn(model: nn.Module, params: Mapping[str, Tensor], batch: Batch, loss: LossFn) -> Tensor:
    """G = Jᵀ H_z J (n, n), J from :func:`dense_jacobian` and H_z from :func:`output_hessian` at z = f(θ; x)."""
    inputs, targets = batch
    jac = dense_jacobian(model, params, inputs)
    z = outputs_of(model, params, inputs)(flat_params(params)).detach()
    return jac.T @ output_hessian(loss, z, targets) @ jac


def dense_hessian(model: nn.Module, params: Mapping[str, Tensor], batch: Batch, loss: LossFn) -> Tensor:
    """H = ∇²_θ ℓ(f(θ; x), y) (n, n) at ``params``, by ``torch.func.hessian`` through the model."""
    inputs, targets = batch
    outputs = outputs_of(model, params, inputs)
    return torch.func.hessian(lambda theta: loss(outputs(theta), targets))(flat_params(params))


def residual_hessian(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, weights: Tensor) -> Tensor:
    """H − G = Σ_k w_k ∇²_θ z_k for weights w = g_z (n_out,): the outputs' curvature weighted by ∂ℓ/∂z_k.

    Each output's Hessian is formed one by one (n_out, n, n) while that holds at most 2·10⁶ numbers;
    otherwise the same sum is the Hessian of θ ↦ Σ_k w_k z_k(θ), w fixed.

    Returns:
        (n, n).
    """
    flat = flat_params(params)
    outputs = outputs_of(model, params, inputs)

    def flat_outputs(theta: Tensor) -> Tensor:
        return outputs(theta).reshape(-1)

    if len(weights) * len(flat) ** 2 <= 2_000_000:
        per_output = torch.func.hessian(flat_outputs)(flat)  # (n_out, n, n)
        return torch.einsum("k,kij->ij", weights, per_output)
    return torch.func.hessian(lambda theta: weights @ flat_outputs(theta))(flat)


# ------------------------------------------------------------------------------- gradients and tangents


def loss_gradient(model: nn.Module, params: Mapping[str, Tensor], batch: Batch, loss: LossFn) -> dict[str, Tensor]:
    """∇_θ ℓ(f(θ; x), y) at ``params`` by ``torch.func.grad``, as a dict in the names and shapes of ``params``."""
    inputs, targets = batch
    return torch.func.grad(lambda p: loss(functional_call(model, p, (inputs,)), targets))(dict(params))


def subset_jvp(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    """J_S v_S: the outputs' tangent (in the outputs' shape) when only the parameters S named in ``v`` move.

    The other parameters stay fixed at ``params``; by ``torch.func.jvp`` over ``functional_call``.
    """
    subset = {name: params[name] for name in v}
    return torch.func.jvp(lambda sub: functional_call(model, {**params, **sub}, (inputs,)), (subset,), (dict(v),))[1]


# ------------------------------------------------------------------------------- models and batches


def mlp_problem(targets: str = "classes") -> tuple[nn.Module, Batch]:
    """A float64 tanh MLP 3 → 5 → 4 (44 parameters) and a batch of 6 rows.

    Args:
        targets: "classes" for integer targets in [0, 4) (cross-entropy), "values" for (6, 4) normal ones (MSE).
    """
    model = mlp([3, 5, 4], activation="tanh", seed=0).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    if targets == "classes":
        return model, (x, torch.randint(4, (6,), generator=g))
    return model, (x, torch.randn(6, 4, generator=g, dtype=F64))


DENSE_SHAPE = dict(d_model=4, n_heads=1, d_ff=8, vocab_size=8, max_seq_len=8)


def dense_transformer(tied: bool = False, n_layers: int = 2) -> nn.Module:
    """A float64 transformer small enough for dense matrices (n = 372 tied, 404 untied at 2 layers).

    The "tiny" preset at :data:`DENSE_SHAPE` (d_model 4, one head, d_ff 8, vocabulary 8, 8 positions), seed 0.
    """
    return build_model("tiny", n_layers=n_layers, tie_embeddings=tied, dtype=F64, **DENSE_SHAPE)


def small_transformer(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A one-layer transformer for optimizer steps: vocabulary 32, d_model 16, two heads, d_ff 32, 16 positions."""
    return build_model(
        "tiny", seed=seed, dtype=dtype, vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16
    )

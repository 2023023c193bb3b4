"""Curvature products against dense float64 references built independently with torch.func.

Models: a small MLP (cross-entropy and MSE), a one-layer LLaMA-style transformer with tied embeddings, the
study's reference transformer (GELU MLP, LayerNorm-ed queries and keys, fan-in init, untied), and a linear
model (a GLM: with cross-entropy, multinomial logistic regression). References from ``oracles``: J from
``torch.func.jacrev``, H_z and H from ``torch.func.hessian``, G = Jᵀ H_z J.
"""

from dataclasses import dataclass

import numpy as np
import oracles
import pytest
import scipy.sparse.linalg
import torch

from gnlib import curvature as C
from gnlib.curvature.blocks import per_layer, per_tensor
from gnlib.losses import MSE, CrossEntropy, Loss
from gnlib.models import build_model, linear_model
from gnlib.params import flatten, offsets, params_of, unflatten

RTOL, ATOL = 1e-6, 1e-10


@dataclass
class Case:
    """A model, its params and batch, and dense references."""

    model: torch.nn.Module
    params: dict
    batch: tuple
    loss: Loss
    J: torch.Tensor  # (n_out, n)
    Hz: torch.Tensor  # (n_out, n_out)
    G: torch.Tensor  # (n, n)
    H: torch.Tensor  # (n, n)
    z: torch.Tensor
    g_z: torch.Tensor  # ∇_z ℓ, flat (n_out,)

    @property
    def n(self) -> int:
        """Number of parameters."""
        return self.G.shape[0]

    def random_vectors(self, k: int, seed: int = 0) -> list[torch.Tensor]:
        """``k`` seeded standard normal flat vectors."""
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(self.n, generator=g, dtype=torch.float64) for _ in range(k)]

    def as_dict(self, flat: torch.Tensor) -> dict:
        """The params-dict view of a flat vector."""
        return unflatten(flat, self.params)


def _make_case(model, batch, loss) -> Case:
    params = params_of(model)
    inputs, targets = batch
    z = oracles.outputs_of(model, params, inputs)(oracles.flat_params(params)).detach()
    J = oracles.dense_jacobian(model, params, inputs)
    Hz = oracles.output_hessian(loss.value, z, targets)
    H = oracles.dense_hessian(model, params, batch, loss.value)
    g_z = oracles.output_gradient(loss.value, z, targets)
    return Case(model, params, batch, loss, J, Hz, J.T @ Hz @ J, H, z, g_z)


def _mlp_case(loss_name: str) -> Case:
    model, batch = oracles.mlp_problem("classes" if loss_name == "ce" else "values")
    return _make_case(model, batch, CrossEntropy() if loss_name == "ce" else MSE())


TRANSFORMER_SHAPE = dict(n_layers=1, d_model=8, n_heads=2, d_ff=16, vocab_size=7, max_seq_len=4, seed=0)


def _transformer(dtype=torch.float64, preset: str = "tiny", tie: bool = True):
    return build_model(preset, tie_embeddings=tie, dtype=dtype, **TRANSFORMER_SHAPE)


def _transformer_batch():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(7, (2, 5), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _transformer_case(preset: str = "tiny", tie: bool = True) -> Case:
    model = _transformer(preset=preset, tie=tie)
    # Move off the symmetric initialization (unit norm gains) so that every parameter matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return _make_case(model, _transformer_batch(), CrossEntropy())


def _transformer_ignore_index_case() -> Case:
    """The transformer case with some targets set to -100: those tokens count in no loss, gradient or curvature."""
    case = _transformer_case()
    inputs, targets = case.batch
    targets = targets.clone()
    targets[0, 1], targets[1, :2] = -100, -100
    return _make_case(case.model, (inputs, targets), CrossEntropy())


def _linear_case() -> Case:
    model = linear_model(4, 3, seed=0).double()
    g = torch.Generator().manual_seed(3)
    return _make_case(
        model,
        (torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(3, (5,), generator=g)),
        CrossEntropy(),
    )


_BUILDERS = {
    "mlp_ce": lambda: _mlp_case("ce"),
    "mlp_mse": lambda: _mlp_case("mse"),
    "transformer": _transformer_case,
    "transformer_reference": lambda: _transformer_case("paper_tiny", tie=False),
    "transformer_ignore_index": _transformer_ignore_index_case,
    "linear_ce": _linear_case,
}


@pytest.fixture(scope="module", params=list(_BUILDERS))
def case(request) -> Case:
    return _BUILDERS[request.param]()


@pytest.fixture(scope="module")
def transformer_case() -> Case:
    return _transformer_case()


def close(actual, expected, rtol=RTOL, atol=ATOL):
    """Compare with a tolerance relative to the scale of ``expected``."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + rtol * scale)


# ------------------------------------------------------------------------------------------------
# products vs dense references


def test_transformer_has_tied_embeddings_and_every_parameter_matters(transformer_case):
    assert "head.weight" not in transformer_case.params
    # Every parameter moves the outputs: no all-zero column of J.
    assert (transformer_case.J.abs().sum(0) > 0).all()


def test_reference_transformer_has_its_own_layers_and_every_parameter_matters():
    case = _BUILDERS["transformer_reference"]()
    assert {"head.weight", "blocks.0.attn.q_norm.bias", "blocks.0.attn.k_norm.weight", "blocks.0.mlp.w1.weight"} <= set(
        case.params
    )
    moves = (case.J.abs().sum(0) > 0).reshape(-1)
    n_embed = case.params["embed.weight"].numel()
    assert moves[n_embed:].all()  # untied: only the embedding rows of tokens absent from the batch stay still
    present = torch.zeros(7, 8, dtype=torch.bool)
    present[case.batch[0].unique()] = True
    assert torch.equal(moves[:n_embed], present.reshape(-1))


def test_jvp_and_vjp_match_dense_jacobian(case):
    g = torch.Generator().manual_seed(5)
    for v in case.random_vectors(3):
        close(C.jvp(case.model, case.params, case.batch, case.as_dict(v)).reshape(-1), case.J @ v)
        z, jv = C.outputs_and_jvp(case.model, case.params, case.batch[0], case.as_dict(v))
        close(z, case.z)
        close(jv.reshape(-1), case.J @ v)
        u = torch.randn(case.z.shape, generator=g, dtype=torch.float64)
        close(flatten(C.vjp(case.model, case.params, case.batch, u)), case.J.T @ u.reshape(-1))


def test_gradient_matches_dense(case):
    value, grad = C.gradient(case.model, case.params, case.batch, case.loss)
    close(value, case.loss.value(case.z, case.batch[1]))
    close(flatten(grad), case.J.T @ case.g_z)


def test_ggn_products_match_dense(case):
    lin = C.linearize(case.model, case.params, case.batch, case.loss)
    op = C.GGNOperator(case.model, case.params, case.batch, case.loss)
    close(flatten(lin.gradient), case.J.T @ case.g_z)
    for v in case.random_vectors(3):
        expected = case.G @ v
        close(flatten(C.ggn_vp(case.model, case.params, case.batch, case.as_dict(v), case.loss)), expected)
        close(flatten(lin.ggn_vp(case.as_dict(v))), expected)
        close(lin.jvp(case.as_dict(v)).reshape(-1), case.J @ v)
        close(op @ v, expected)


def test_hessian_products_match_dense(case):
    op = C.HessianOperator(case.model, case.params, case.batch, case.loss)
    for v in case.random_vectors(3):
        close(flatten(C.hvp(case.model, case.params, case.batch, case.as_dict(v), case.loss)), case.H @ v)
        close(op @ v, case.H @ v)


def test_dense_matrices_match_references(case):
    close(C.dense_jacobian(case.model, case.params, case.batch), case.J)
    close(C.dense_ggn(case.model, case.params, case.batch, case.loss), case.G)
    close(C.dense_hessian(case.model, case.params, case.batch, case.loss), case.H)


def test_dense_of_float32_model_is_float64():
    model32 = _transformer(torch.float32)
    J = C.dense_jacobian(model32, params_of(model32), _transformer_batch())
    assert J.dtype == torch.float64
    model64 = _transformer(torch.float64)
    close(J, C.dense_jacobian(model64, params_of(model64), _transformer_batch()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# structure


def test_ggn_is_symmetric_and_psd(case):
    G = C.dense_ggn(case.model, case.params, case.batch, case.loss)
    close(G, G.T, rtol=1e-12, atol=1e-14)
    eigenvalues = torch.linalg.eigvalsh(G)
    assert eigenvalues.min() > -1e-10 * eigenvalues.abs().max()
    v, w = case.random_vectors(2, seed=7)
    op = C.GGNOperator(case.model, case.params, case.batch, case.loss)
    close(w @ (op @ v), v @ (op @ w))


def test_ggn_equals_hessian_for_a_linear_model_with_cross_entropy():
    case = _linear_case()
    G = C.dense_ggn(case.model, case.params, case.batch, case.loss)
    H = C.dense_hessian(case.model, case.params, case.batch, case.loss)
    close(G, H, rtol=1e-12, atol=1e-14)
    for v in case.random_vectors(2):
        d = case.as_dict(v)
        close(
            flatten(C.ggn_vp(case.model, case.params, case.batch, d, case.loss)),
            flatten(C.hvp(case.model, case.params, case.batch, d, case.loss)),
        )


def test_hessian_minus_ggn_is_the_residual_term(case):
    """H − G = Σ_k (∂ℓ/∂z_k) ∇²_θ z_k."""
    residual = oracles.residual_hessian(case.model, case.params, case.batch[0], case.g_z)
    H = C.dense_hessian(case.model, case.params, case.batch, case.loss)
    G = C.dense_ggn(case.model, case.params, case.batch, case.loss)
    close(H - G, residual)


# ------------------------------------------------------------------------------------------------
# the Gauss-Newton inner step


def _reference_inner(case: Case, delta_flat: torch.Tensor, objective: str):
    """Value and Δ-gradient by autograd through dense J (independent of gnlib.curvature)."""
    targets = case.batch[1]
    delta = delta_flat.clone().requires_grad_()
    if objective == "loss":
        z = oracles.outputs_of(case.model, case.params, case.batch[0])(flatten(case.params) + delta)
        value = case.loss.value(z, targets)
    else:
        dz = case.J @ delta
        if objective == "gn":
            value = case.loss.value(case.z, targets) + case.g_z @ dz + 0.5 * dz @ case.Hz @ dz
        else:
            value = case.loss.value(case.z + dz.reshape(case.z.shape), targets)
    (grad,) = torch.autograd.grad(value, delta)
    return value.detach(), grad


@pytest.mark.parametrize("objective", ["gn", "prox_linear", "loss"])
def test_gn_inner_step_matches_autograd_of_the_objective(case, objective):
    for scale, v in zip((0.1, 1.0), case.random_vectors(2, seed=3)):
        delta = scale * v
        value, grad = C.gn_inner_step(case.model, case.params, case.as_dict(delta), case.batch, case.loss, objective)
        ref_value, ref_grad = _reference_inner(case, delta, objective)
        close(value, ref_value)
        close(flatten(grad), ref_grad)


@pytest.mark.parametrize("objective", ["gn", "prox_linear"])
def test_inner_objectives_at_zero_step_are_the_loss_and_gradient(case, objective):
    zero = {name: torch.zeros_like(p) for name, p in case.params.items()}
    value, grad = C.gn_inner_step(case.model, case.params, zero, case.batch, case.loss, objective)
    loss_value, loss_grad = C.gradient(case.model, case.params, case.batch, case.loss)
    close(value, loss_value)
    close(flatten(grad), flatten(loss_grad))


def test_inner_step_gradient_is_gradient_plus_ggn_product(transformer_case):
    case = transformer_case
    (v,) = case.random_vectors(1, seed=11)
    _, grad = C.gn_inner_step(case.model, case.params, case.as_dict(v), case.batch, case.loss)
    close(flatten(grad), case.J.T @ case.g_z + case.G @ v)


# ------------------------------------------------------------------------------------------------
# blocks: products over a subset of the parameters


def _block_slice(case: Case, names: list[str]) -> torch.Tensor:
    spans = offsets(case.params)
    return torch.cat([torch.arange(spans[name].start, spans[name].stop) for name in names])


def test_subset_products_are_diagonal_blocks(transformer_case):
    case = transformer_case
    names = ["blocks.0.attn.wq.weight", "blocks.0.mlp.w_up.weight", "norm.weight"]
    index = _block_slice(case, names)
    G_bb, H_bb, J_b = case.G[index][:, index], case.H[index][:, index], case.J[:, index]
    (v_full,) = case.random_vectors(1, seed=4)
    v = v_full[index]
    v_dict = unflatten(v, {name: case.params[name] for name in names})
    close(flatten(C.ggn_vp(case.model, case.params, case.batch, v_dict, case.loss)), G_bb @ v)
    close(flatten(C.hvp(case.model, case.params, case.batch, v_dict, case.loss)), H_bb @ v)
    close(C.jvp(case.model, case.params, case.batch, v_dict).reshape(-1), J_b @ v)
    ggn_block = C.GGNOperator(case.model, case.params, case.batch, case.loss).block(names)
    assert ggn_block.shape == (len(index), len(index))
    close(ggn_block @ v, G_bb @ v)
    close(C.HessianOperator(case.model, case.params, case.batch, case.loss).block(names) @ v, H_bb @ v)
    close(C.dense_ggn(case.model, case.params, case.batch, case.loss, wrt=names), G_bb)
    _, grad = C.gn_inner_step(case.model, case.params, v_dict, case.batch, case.loss)
    close(flatten(grad), J_b.T @ case.g_z + G_bb @ v)
    assert list(grad) == names


class _ParameterLogits(torch.nn.Module):
    """Logits (2, 3, 5) made of the parameters alone: z = a, or z = a + b. J·Δ may then share Δ's memory."""

    def __init__(self, names: str) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        for name in names:
            self.register_parameter(
                name, torch.nn.Parameter(torch.randn(2, 3, 5, dtype=torch.float64, generator=generator))
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.a.view(2, 3, 5) if len(self._parameters) == 1 else self.a + self.b


@pytest.mark.parametrize("names", ["a", "ab"])
def test_prox_linear_shifts_the_logits_without_writing_into_the_step(names):
    """ℓ(z_t + JΔ) may be formed inside J·Δ's buffer, never inside Δ's (dual numbers and autograd share it)."""
    model, loss = _ParameterLogits(names), CrossEntropy()
    params = dict(model.named_parameters())
    targets = torch.randint(5, (2, 3), generator=torch.Generator().manual_seed(1))
    batch = (torch.zeros(2, 3, dtype=torch.long), targets)
    delta = {name: torch.randn_like(p) for name, p in params.items()}
    kept = {name: t.clone() for name, t in delta.items()}
    z_t = model(batch[0]).detach()
    value, _ = C.gn_inner_step(model, params, delta, batch, loss, "prox_linear")
    close(value, loss.value(z_t + sum(kept.values()), targets))
    if len(names) > 1:
        blocks = [{name: delta[name]} for name in names]
        for (value, _), name in zip(C.layerwise_inner_steps(model, params, blocks, batch, loss, "prox_linear"), names):
            close(value, loss.value(z_t + kept[name], targets))
    assert all(torch.equal(delta[name], kept[name]) for name in delta)


@pytest.mark.parametrize("objective", ["gn", "prox_linear", "loss"])
@pytest.mark.parametrize("blocks", ["per_layer", "interleaved", "per_tensor"])
def test_layerwise_inner_steps_are_the_block_diagonal_inner_steps(case, objective, blocks):
    """Each block's value and gradient, from one shared pass, equal the dense block-diagonal references.

    "interleaved": three blocks that each take every third parameter across all layers, listed out of the
    forward's order, so that stacked tangents start in any order and meet stacks of other lengths.
    "per_tensor": a block per parameter, so that a bias's tangent starts a slot beyond the stack it meets.
    """
    partition = per_tensor(case.model) if blocks == "per_tensor" else per_layer(case.model)
    if blocks == "interleaved":
        names = list(case.params)
        partition = {f"every third from {r}": names[r::3] for r in (2, 0, 1) if names[r::3]}
    assert len(partition) >= 2
    (v,) = case.random_vectors(1, seed=12)
    indices = [_block_slice(case, names) for names in partition.values()]
    deltas = [
        unflatten(v[index], {name: case.params[name] for name in names})
        for index, names in zip(indices, partition.values())
    ]
    results = C.layerwise_inner_steps(case.model, case.params, deltas, case.batch, case.loss, objective)
    assert len(results) == len(partition)
    for (value, grad), index, names in zip(results, indices, partition.values()):
        assert list(grad) == names
        only_block = torch.zeros_like(v)
        only_block[index] = v[index]
        ref_value, ref_grad = _reference_inner(case, only_block, objective)
        close(value, ref_value)
        close(flatten(grad), ref_grad[index])
        if objective == "gn":  # J_bᵀ g_z + G_bb Δ_b with the diagonal block of the dense GGN
            close(flatten(grad), case.J[:, index].T @ case.g_z + case.G[index][:, index] @ v[index])


@pytest.mark.parametrize("slots", [1, 2])
def test_layerwise_slots_split_the_blocks_over_forwards_with_the_same_results(transformer_case, slots):
    case = transformer_case
    partition = per_layer(case.model)
    (v,) = case.random_vectors(1, seed=12)
    deltas = [{name: d for name, d in case.as_dict(v).items() if name in names} for names in partition.values()]
    together = C.layerwise_inner_steps(case.model, case.params, deltas, case.batch, case.loss)
    apart = C.layerwise_inner_steps(case.model, case.params, deltas, case.batch, case.loss, slots=slots)
    for (value, grad), (value_apart, grad_apart) in zip(together, apart):
        close(value_apart, value)
        close(flatten(grad_apart), flatten(grad))
    forwards = -(-len(deltas) // slots)
    assert C.layerwise_passes(case.model, len(deltas), slots) == (forwards, len(deltas), len(deltas))
    assert C.layerwise_passes(case.model, len(deltas)) == (1, len(deltas), len(deltas))
    with pytest.raises(ValueError, match="slots=0 is invalid; allowed: an integer >= 1, or None"):
        C.layerwise_inner_steps(case.model, case.params, deltas, case.batch, case.loss, slots=0)


def test_layerwise_inner_steps_reject_bad_blocks(transformer_case):
    case = transformer_case
    names = list(case.params)
    first = {names[0]: torch.zeros_like(case.params[names[0]])}
    with pytest.raises(ValueError, match="deltas must be disjoint blocks"):
        C.layerwise_inner_steps(case.model, case.params, [first, dict(first)], case.batch, case.loss)
    with pytest.raises(ValueError, match="deltas must be a non-empty list"):
        C.layerwise_inner_steps(case.model, case.params, first, case.batch, case.loss)
    with pytest.raises(ValueError, match="objective"):
        C.layerwise_inner_steps(case.model, case.params, [first], case.batch, case.loss, "newton")


# ------------------------------------------------------------------------------------------------
# operators


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_operator_protocol(transformer_case, kind):
    case = transformer_case
    op_class, dense = (C.GGNOperator, case.G) if kind == "ggn" else (C.HessianOperator, case.H)
    op = op_class(case.model, case.params, case.batch, case.loss)
    assert op.shape == (case.n, case.n) and op.dtype == torch.float64 and op.device == torch.device("cpu")
    X = torch.stack(case.random_vectors(3, seed=9), dim=1)
    close(op @ X, dense @ X)
    out = op @ case.as_dict(X[:, 0])
    assert list(out) == list(case.params)
    close(flatten(out), dense @ X[:, 0])
    scipy_op = op.to_scipy()
    x = np.random.default_rng(0).standard_normal(case.n)
    np.testing.assert_allclose(scipy_op @ x, (dense @ torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-10)
    top = scipy.sparse.linalg.eigsh(scipy_op, k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), torch.linalg.eigvalsh(dense)[-3:].numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# float32


def test_float32_agrees_with_float64():
    batch = _transformer_batch()
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = _transformer(dtype)
        params = params_of(model)
        g = torch.Generator().manual_seed(0)
        v = {name: torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for name, p in params.items()}
        results[dtype] = [
            flatten(C.ggn_vp(model, params, batch, v)),
            flatten(C.linearize(model, params, batch).ggn_vp(v)),
            flatten(C.hvp(model, params, batch, v)),
            *(flatten(C.gn_inner_step(model, params, v, batch, objective=o)[1]) for o in ("gn", "prox_linear")),
        ]
    for r32, r64 in zip(results[torch.float32], results[torch.float64]):
        assert r32.dtype == torch.float32
        close(r32.double(), r64, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors(transformer_case):
    case = transformer_case
    m, p, b = case.model, case.params, case.batch
    good = {name: torch.zeros_like(t) for name, t in p.items()}
    wrong_shape = dict(good, **{"norm.weight": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="norm.weight.*shape"):
        C.ggn_vp(m, p, b, wrong_shape)
    with pytest.raises(ValueError, match="unexpected"):
        C.gn_inner_step(m, p, dict(good, bogus=torch.zeros(1, dtype=torch.float64)), b)
    with pytest.raises(ValueError, match="float32"):
        C.hvp(m, p, b, {name: t.float() for name, t in good.items()})
    with pytest.raises(ValueError, match="objective=.* is invalid; allowed: "):
        C.gn_inner_step(m, p, good, b, objective="newton")
    with pytest.raises(ValueError, match="params.*missing"):
        C.gradient(m, {k: t for k, t in p.items() if k != "embed.weight"}, b)
    with pytest.raises(ValueError, match="u has shape"):
        C.vjp(m, p, b, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="wrt"):
        C.linearize(m, p, b, wrt=["no.such.weight"])
    op = C.GGNOperator(m, p, b)
    with pytest.raises(ValueError, match=r"expected \(\d+,\) or \(\d+, k\)"):
        op @ torch.zeros(case.n + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="not among"):
        op.block(["no.such.weight"])


def test_dense_refuses_models_that_are_too_big(transformer_case):
    case = transformer_case
    for fn in (C.dense_jacobian, C.dense_ggn, C.dense_hessian):
        with pytest.raises(ValueError, match=rf"{case.n} parameters exceed max_params=100"):
            fn(case.model, case.params, case.batch, max_params=100)
    big = build_model("tiny", dtype=torch.float64)
    with pytest.raises(ValueError, match="max_params=5000.*GiB"):
        C.dense_hessian(big, params_of(big), _transformer_batch())
    with pytest.raises(ValueError, match="max_bytes"):
        C.dense_jacobian(case.model, case.params, case.batch, max_bytes=1000)

"""Directions of GN and its approximations, each checked against a dense float64 solve where it must be exact."""

import math

import oracles
import pytest
import torch

from gnlib import curvature
from gnlib.curvature import blocks
from gnlib.losses import MSE, CrossEntropy
from gnlib.models import linear_model
from gnlib.optim import direction_comparison, directions, kfac
from gnlib.params import flatten, numel, params_of, unflatten

F64 = torch.float64


def spd(n: int, seed: int = 0, shift: float = 0.1) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a @ a.T / n + shift * torch.eye(n, dtype=F64)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Bare:
    """An operator with only .shape, .dtype, .device and @ on flat tensors."""

    def __init__(self, matrix):
        """Wrap a dense matrix."""
        self._matrix, self.shape, self.dtype, self.device = matrix, matrix.shape, matrix.dtype, matrix.device

    def __matmul__(self, x):
        """Matrix product."""
        return self._matrix @ x


@pytest.fixture(scope="module")
def mlp_setup():
    """(model, params, batch, G) for a float64 tanh MLP 3 → 5 → 4 with cross-entropy on 6 rows."""
    model, batch = oracles.mlp_problem()
    params = params_of(model)
    return model, params, batch, curvature.dense_ggn(model, params, batch, CrossEntropy())


@pytest.fixture(scope="module")
def transformer_setup():
    """(model, params, batch, G, g) for a 2-layer float64 transformer with 404 parameters."""
    model = oracles.dense_transformer()
    params = params_of(model)
    tokens = torch.randint(0, 8, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = (tokens[:, :-1], tokens[:, 1:])
    _, g = curvature.gradient(model, params, batch, CrossEntropy())
    return model, params, batch, curvature.dense_ggn(model, params, batch), g


# --- solves -----------------------------------------------------------------------------------------


def test_solve_by_conjugate_gradients_matches_dense_solve_with_damping():
    a, b = spd(40, shift=0.0), randn(40, seed=1)
    expected = torch.linalg.solve(a + 0.05 * torch.eye(40, dtype=F64), b)
    torch.testing.assert_close(directions.solve(Bare(a), b, 0.05, tol=1e-12), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(directions.solve(a, b, 0.05), expected, rtol=1e-12, atol=1e-12)


def test_solve_raises_when_conjugate_gradients_do_not_converge():
    a, b = spd(40, shift=1e-6), randn(40, seed=1)
    with pytest.raises(ValueError, match="max_iter"):
        directions.solve(Bare(a), b, 0.0, tol=1e-12, max_iter=3)


def test_gn_direction_by_cg_on_the_ggn_operator_equals_dense_solve(mlp_setup):
    model, params, batch, dense = mlp_setup
    _, g = curvature.gradient(model, params, batch, CrossEntropy())
    op = curvature.GGNOperator(model, params, batch, CrossEntropy())
    by_cg = directions.gn_direction(op, g, 1e-3, tol=1e-12)
    by_dense = directions.gn_direction(dense, g, 1e-3)
    assert isinstance(by_cg, dict) and list(by_cg) == list(params)
    expected = -torch.linalg.solve(dense + 1e-3 * torch.eye(len(dense), dtype=F64), flatten(g))
    torch.testing.assert_close(flatten(by_dense), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flatten(by_cg), expected, rtol=1e-7, atol=1e-9)


def test_exact_gn_direction_of_a_transformer_minimizes_the_quadratic(transformer_setup):
    model, params, batch, dense, g = transformer_setup
    d = directions.gn_direction(dense, flatten(g), 1e-4)
    # the gradient of the damped quadratic g + (G + λI)d vanishes at its minimizer
    residual = flatten(g) + dense @ d + 1e-4 * d
    assert residual.norm() <= 1e-10 * flatten(g).norm()
    op = curvature.GGNOperator(model, params, batch)
    torch.testing.assert_close(flatten(directions.gn_direction(op, g, 1e-4, tol=1e-11)), d, rtol=1e-6, atol=1e-7)


def test_layerwise_direction_with_one_block_is_the_exact_direction(mlp_setup):
    model, params, batch, dense = mlp_setup
    g = randn(numel(params), seed=2)
    full = directions.layerwise_gn_direction(dense, g, {"all": list(params)}, params, 0.01)
    torch.testing.assert_close(full, directions.gn_direction(dense, g, 0.01), rtol=1e-12, atol=1e-12)


def test_layerwise_direction_solves_each_block_dense_and_by_cg(transformer_setup):
    model, params, _, dense, g = transformer_setup
    partition = blocks.per_layer(model)
    dense_way = directions.layerwise_gn_direction(dense, g, partition, params, 1e-3)
    expected = unflatten(torch.zeros(numel(params), dtype=F64), params)
    for block, names in partition.items():
        sub = blocks.block_view(dense, partition, params, block, block)
        gb = torch.cat([g[n].reshape(-1) for n in names])
        solution = -torch.linalg.solve(sub + 1e-3 * torch.eye(len(sub), dtype=F64), gb)
        expected.update(unflatten(solution, {n: params[n] for n in names}))
    torch.testing.assert_close(flatten(dense_way), flatten(expected), rtol=1e-10, atol=1e-12)
    cg_way = directions.layerwise_gn_direction(Bare(dense), g, partition, params, 1e-3, tol=1e-12)
    torch.testing.assert_close(flatten(cg_way), flatten(expected), rtol=1e-7, atol=1e-9)


# --- diagonal, Adam ---------------------------------------------------------------------------------


def test_diagonal_direction_is_exact_when_the_curvature_is_diagonal():
    diag = torch.linspace(0.1, 3.0, 20, dtype=F64)
    g = randn(20, seed=3)
    matrix = torch.diag(diag)
    d = directions.diagonal_direction(directions.curvature_diagonal(matrix), g, 0.2)
    torch.testing.assert_close(d, directions.gn_direction(matrix, g, 0.2), rtol=1e-12, atol=0)
    assert direction_comparison.cosine(d, directions.gn_direction(matrix, g, 0.2)) == pytest.approx(1.0, abs=1e-12)


def test_curvature_diagonal_of_operators_exact_and_estimated(mlp_setup):
    model, params, batch, dense = mlp_setup
    op = curvature.GGNOperator(model, params, batch, CrossEntropy())
    torch.testing.assert_close(directions.curvature_diagonal(op, chunk=7), dense.diagonal(), rtol=1e-10, atol=1e-12)
    diag = torch.linspace(-1, 2, 30, dtype=F64)
    # a Rademacher probe z gives z ⊙ Dz = diag(D) exactly
    torch.testing.assert_close(directions.curvature_diagonal(Bare(torch.diag(diag)), n_probes=1), diag)
    estimate = directions.curvature_diagonal(Bare(dense), n_probes=4000, seed=1)
    assert (estimate - dense.diagonal()).norm() <= 0.1 * dense.diagonal().norm()


def test_per_sample_gradients_average_to_the_batch_gradient(transformer_setup):
    model, params, batch, _, g = transformer_setup
    samples = directions.per_sample_gradients(model, params, batch)
    assert all(samples[n].shape == (3, *params[n].shape) for n in params)
    torch.testing.assert_close(flatten({n: t.mean(0) for n, t in samples.items()}), flatten(g), rtol=1e-10, atol=1e-12)
    _, first = curvature.gradient(model, params, (batch[0][:1], batch[1][:1]))
    torch.testing.assert_close(flatten({n: t[0] for n, t in samples.items()}), flatten(first), rtol=1e-10, atol=1e-12)
    v = directions.second_moment(samples)
    torch.testing.assert_close(v["head.weight"], (samples["head.weight"] ** 2).mean(0))


def test_adam_direction_is_sign_descent_with_the_squared_gradient_and_keeps_the_form():
    g = {"w": randn(3, 4, seed=4), "b": randn(4, seed=5)}
    d = directions.adam_direction({n: t.square() for n, t in g.items()}, g, eps=0.0)
    assert list(d) == ["w", "b"]
    torch.testing.assert_close(flatten(d), -flatten(g).sign())
    flat = directions.adam_direction(torch.full((16,), 4.0, dtype=F64), flatten(g), eps=0.0)
    torch.testing.assert_close(flat, -flatten(g) / 2)


# --- Shampoo, SOAP, Muon ------------------------------------------------------------------------------


def test_shampoo_of_a_single_sample_is_the_orthogonalized_gradient():
    grad = randn(5, 5, seed=6)
    samples = {"w": grad.unsqueeze(0), "gain": randn(1, 5, seed=7)}
    stats = directions.kronecker_statistics(samples)
    assert list(stats) == ["w"]
    torch.testing.assert_close(stats["w"].left, grad @ grad.T)
    d = directions.shampoo_direction(
        {"w": grad, "gain": samples["gain"][0]}, stats, directions.second_moment(samples), eps=0.0, adam_eps=0.0
    )
    u, _, vh = torch.linalg.svd(grad)
    torch.testing.assert_close(d["w"], -u @ vh, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(d["gain"], -samples["gain"][0].sign())


def test_shampoo_with_scaled_identity_factors_rescales_the_gradient():
    grad = randn(3, 4, seed=8)
    stats = {"w": directions.KroneckerStatistics(4.0 * torch.eye(3, dtype=F64), 9.0 * torch.eye(4, dtype=F64))}
    d = directions.shampoo_direction({"w": grad}, stats, {}, eps=0.0)
    torch.testing.assert_close(d["w"], -grad / (4.0**0.25 * 9.0**0.25))


def test_soap_equals_adam_when_the_factors_are_diagonal():
    # per-sample gradients that are diagonal matrices give diagonal L and R (eigenbasis = signed permutation)
    diagonals = randn(6, 4, seed=9).abs() + torch.arange(4, dtype=F64)
    samples = {"w": torch.diag_embed(diagonals), "v": randn(6, 3, seed=10)}
    g = {n: t.mean(0) for n, t in samples.items()}
    d = directions.soap_direction(g, directions.kronecker_statistics(samples), samples, eps=1e-12)
    adam = directions.adam_direction(directions.second_moment(samples), g, eps=1e-12)
    torch.testing.assert_close(flatten(d), flatten(adam), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("transpose", [False, True], ids=["tall", "wide"])
def test_orthogonalize_exact_and_newton_schulz(transpose):
    m = randn(6, 4, seed=11)
    m = m.T if transpose else m
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    exact = directions.orthogonalize(m)
    torch.testing.assert_close(exact, u @ vh, rtol=0, atol=1e-12)
    # Newton-Schulz maps each singular value alone: from σ / (‖M‖_F + 1e-7), five steps of the quintic
    # p(x) = ax + bx³ + cx⁵ give U p⁵(σ) Vᵀ. This pins the iteration at every scale of M (it is
    # scale-invariant up to the 1e-7), where the cosine with UVᵀ (0.9915 here) would not; measured
    # max |difference| 4.7e-15 over both shapes and the three scales, so atol 1e-12 is rounding only.
    a, b, c = directions.NEWTON_SCHULZ
    for scale in (1e-3, 1.0, 1e3):
        x = scale * s / (scale * m.norm() + 1e-7)
        for _ in range(5):
            x = a * x + b * x**3 + c * x**5
        approx = directions.orthogonalize(scale * m, ns_steps=5)
        torch.testing.assert_close(approx, u @ torch.diag(x) @ vh, rtol=0, atol=1e-12)
    singular = torch.linalg.svdvals(approx)  # the docstring's "roughly [0.7, 1.2]": 0.79 to 1.11 here
    assert approx.shape == m.shape and singular.min() > 0.7 and singular.max() < 1.2
    with pytest.raises(ValueError, match="ns_steps"):
        directions.orthogonalize(m, ns_steps=0)


def test_muon_direction_groups_and_scales(transformer_setup):
    model, params, batch, _, g = transformer_setup
    v = directions.second_moment(directions.per_sample_gradients(model, params, batch))
    d = directions.muon_direction(g, v, lr=0.5, adamw_lr=0.1)
    wq = "blocks.0.attn.wq.weight"
    torch.testing.assert_close(d[wq], -0.5 * directions.orthogonalize(g[wq]))
    gate = "blocks.1.mlp.w_gate.weight"  # (8, 4): rows > cols scales by sqrt(2)
    torch.testing.assert_close(d[gate], -0.5 * math.sqrt(2) * directions.orthogonalize(g[gate]))
    for name in ("embed.weight", "head.weight", "norm.weight"):
        torch.testing.assert_close(d[name], 0.1 * directions.adam_direction(v[name], g[name]))
    with pytest.raises(ValueError, match="hidden"):
        directions.muon_direction(g, v, hidden=["norm.weight"])


def test_muon_is_exact_when_gradients_are_orthogonal_and_curvature_is_identity():
    q = torch.linalg.qr(randn(4, 4, seed=12))[0]
    g = {"w": 3.0 * q}
    d = directions.muon_direction(g, {}, hidden=["w"], lr=0.02)
    exact = directions.gn_direction(torch.eye(16, dtype=F64), flatten(g), 0.0)
    # the same direction, and of length lr·‖UVᵀ‖_F = 0.02·2 against the exact step's 3·2
    torch.testing.assert_close(flatten(d), 0.02 / 3.0 * exact, rtol=1e-12, atol=1e-14)


def test_muon_direction_matches_torch_optim_muon(transformer_setup):
    """Independent oracle: one step of ``torch.optim.Muon`` (no momentum, no weight decay) from zero."""
    _, _, _, _, g = transformer_setup
    d = directions.muon_direction(g, {n: t.square() for n, t in g.items()}, ns_steps=5, lr=0.5)
    hidden = [name for name, t in g.items() if t.dim() == 2 and name not in ("embed.weight", "head.weight")]
    weights = {name: torch.nn.Parameter(torch.zeros_like(g[name])) for name in hidden}
    muon = torch.optim.Muon(weights.values(), lr=0.5, weight_decay=0.0, momentum=0.0, adjust_lr_fn="original")
    for name, weight in weights.items():
        weight.grad = g[name].clone()
    muon.step()
    # torch runs Newton-Schulz in bfloat16 (unit roundoff 2⁻⁸), gnlib in float64: measured relative
    # Frobenius differences 0.025 over all hidden matrices together, 0.008 to 0.049 per matrix (and at
    # most 0.037 over 250 Gaussian matrices of five shapes). The nearest wrong variants measure far off:
    # 7 steps 0.071, 3 steps 0.24, 4 or 6 steps 0.37, the exact polar factor 0.23 (0.15 to 0.36 per
    # matrix), no max(1, rows/cols)^½ scaling 0.20.
    ours, theirs = flatten({n: d[n] for n in hidden}), flatten({n: w.detach() for n, w in weights.items()})
    assert (ours - theirs).norm() <= 0.04 * theirs.norm()
    for name, weight in weights.items():
        assert (d[name] - weight.detach()).norm() <= 0.06 * weight.detach().norm(), name


# --- K-FAC ------------------------------------------------------------------------------------------


def test_kfac_is_exact_for_a_linear_model_with_mse():
    model = linear_model(3, 2, seed=0).to(F64)
    params = params_of(model)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(10, 3, generator=gen, dtype=F64), torch.randn(10, 2, generator=gen, dtype=F64))
    dense = curvature.dense_ggn(model, params, batch, MSE())
    factors = kfac.kfac_factors(model, params, batch, MSE(), fisher="exact")
    assert list(factors) == ["weight"] and factors["weight"].bias == "bias"
    _, g = curvature.gradient(model, params, batch, MSE())
    d = kfac.kfac_direction(g, factors, 1e-3)
    torch.testing.assert_close(flatten(d), flatten(directions.gn_direction(dense, g, 1e-3)), rtol=1e-10, atol=1e-12)


def test_kfac_on_one_row_equals_layerwise_gn_with_cross_entropy(mlp_setup):
    model, params, batch, _ = mlp_setup
    row = (batch[0][:1], batch[1][:1])
    dense = curvature.dense_ggn(model, params, row, CrossEntropy())
    _, g = curvature.gradient(model, params, row, CrossEntropy())
    factors = kfac.kfac_factors(model, params, row, fisher="exact")
    assert list(factors) == ["0.weight", "2.weight"]
    d = kfac.kfac_direction(g, factors, 1e-2)
    layerwise = directions.layerwise_gn_direction(dense, g, blocks.per_layer(model), params, 1e-2)
    torch.testing.assert_close(flatten(d), flatten(layerwise), rtol=1e-9, atol=1e-11)


def test_kfac_monte_carlo_factors_approach_the_exact_ones(mlp_setup):
    model, params, batch, _ = mlp_setup
    exact = kfac.kfac_factors(model, params, batch, fisher="exact")
    sampled = kfac.kfac_factors(model, params, batch, fisher="mc", mc_samples=4000, seed=3)
    for name in exact:
        torch.testing.assert_close(sampled[name].input, exact[name].input)
        error = (sampled[name].output - exact[name].output).norm() / exact[name].output.norm()
        assert error < 0.08, (name, error)


def test_kfac_on_a_transformer_covers_linear_weights_and_falls_back_to_the_diagonal(transformer_setup):
    model, params, batch, dense, g = transformer_setup
    factors = kfac.kfac_factors(model, params, batch, mc_samples=2)
    linear = [
        n
        for n in params
        if n.endswith(
            ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "_gate.weight", "_up.weight", "_down.weight")
        )
    ] + ["head.weight"]
    assert list(factors) == linear
    with pytest.raises(ValueError, match="diagonal"):
        kfac.kfac_direction(g, factors, 1e-3)
    diag = directions.curvature_diagonal(dense)
    d = kfac.kfac_direction(g, factors, 1e-3, diagonal=diag)
    fallback = directions.diagonal_direction(diag, flatten(g), 1e-3)
    torch.testing.assert_close(d["embed.weight"], unflatten(fallback, g)["embed.weight"])
    assert direction_comparison.cosine(d, g) < 0  # a descent direction


def test_kfac_rejects_bad_options(mlp_setup):
    model, params, batch, _ = mlp_setup
    with pytest.raises(ValueError, match="fisher"):
        kfac.kfac_factors(model, params, batch, fisher="empirical")
    with pytest.raises(ValueError, match="mc_samples"):
        kfac.kfac_factors(model, params, batch, mc_samples=0)


# --- comparison -------------------------------------------------------------------------------------


def test_reduction_ratio_is_one_for_exact_and_a_squared_cosine_otherwise():
    a, g = spd(30, seed=13), randn(30, seed=14)
    exact = directions.gn_direction(a, g, 0.1)
    others = {"exact": exact, "gradient": -g, "random": randn(30, seed=15), "scaled": 7.0 * exact}
    table = direction_comparison.compare_directions(others, exact, a, g, 0.1).set_index("method")
    assert table.loc["exact", "reduction_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["scaled", "reduction_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert (table["reduction_ratio"] <= 1 + 1e-12).all() and (table["reduction_ratio"] >= 0).all()
    # ratio = squared cosine in the (A + λI) inner product
    m = a + 0.1 * torch.eye(30, dtype=F64)
    d = -g
    metric_cosine = (d @ m @ exact) / torch.sqrt((d @ m @ d) * (exact @ m @ exact))
    assert table.loc["gradient", "reduction_ratio"] == pytest.approx(metric_cosine.item() ** 2, rel=1e-10)
    assert table.loc["exact", "reduction"] == pytest.approx(0.5 * (g @ torch.linalg.solve(m, g)).item(), rel=1e-10)
    assert table.loc["gradient", "descent"] and table.loc["exact", "cosine"] == pytest.approx(1.0)


def test_blockwise_cosine_and_zero_vectors(mlp_setup):
    model, params, _, _ = mlp_setup
    a = randn(numel(params), seed=16)
    b = a.clone()
    sizes = {n: t.numel() for n, t in params.items()}
    b[: sizes["0.weight"] + sizes["0.bias"]] *= -1
    cos = direction_comparison.blockwise_cosine(a, b, blocks.per_layer(model), params)
    assert cos == pytest.approx({"0": -1.0, "2": 1.0})
    assert math.isnan(direction_comparison.cosine(torch.zeros(3), torch.ones(3)))


def test_follow_newton_on_a_quadratic_converges_in_one_step():
    a, b = spd(5, seed=17), randn(5, seed=18)
    path = directions.follow(lambda x: directions.gn_direction(a, a @ x - b, 0.0), torch.zeros(5, dtype=F64), 3)
    assert path.shape == (4, 5)
    torch.testing.assert_close(path[1], torch.linalg.solve(a, b))
    diverging = directions.follow(lambda x: x * 1e200, torch.ones(2, dtype=F64), 10)
    assert len(diverging) < 11 and torch.isfinite(diverging).all()


def test_bad_inputs_raise_value_errors():
    a = spd(4)
    with pytest.raises(ValueError, match="damping"):
        directions.gn_direction(a, torch.ones(4, dtype=F64), -1.0)
    with pytest.raises(ValueError, match="shape"):
        directions.gn_direction(a, torch.ones(5, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="params dict"):
        directions.shampoo_direction(torch.ones(4), {}, {})
    with pytest.raises(ValueError, match="n_probes"):
        directions.curvature_diagonal(Bare(a), n_probes=0)


def test_standard_directions_on_a_transformer(transformer_setup):
    model, params, batch, dense, g = transformer_setup
    grad, found = direction_comparison.standard_directions(model, params, batch, dense, 1e-3, kfac_samples=4)
    assert tuple(found) == direction_comparison.METHODS
    torch.testing.assert_close(flatten(grad), flatten(g))
    torch.testing.assert_close(flatten(found["exact GN"]), flatten(directions.gn_direction(dense, g, 1e-3)))
    table = direction_comparison.compare_directions(found, found["exact GN"], dense, g, 1e-3).set_index("method")
    assert table["reduction_ratio"].between(0, 1 + 1e-9).all() and table.loc[
        "exact GN", "reduction_ratio"
    ] == pytest.approx(1)
    assert table["descent"].all()  # every method's direction points downhill
    _, one_block = direction_comparison.standard_directions(
        model, params, batch, dense, 1e-3, partition="full", ns_steps=None
    )
    torch.testing.assert_close(flatten(one_block["layerwise GN"]), flatten(one_block["exact GN"]))

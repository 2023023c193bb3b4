"""Lanczos, Hutchinson and stochastic Lanczos quadrature against exact float64 eigendecompositions."""

import math

import pytest
import torch

from gnlib.curvature import spectra
from gnlib.curvature.blocks import BlockDiagonalOperator, block_diagonal


def matrix_with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ with a seeded random orthogonal Q (float64)."""
    n = len(eigenvalues)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    return (q * values) @ q.T


@pytest.fixture(scope="module")
def psd_matrix():
    """200×200 PSD matrix: five separated top eigenvalues over a bulk in [0, 10]."""
    bulk = torch.linspace(0, 10, 195, dtype=torch.float64)
    return matrix_with_spectrum(torch.cat([torch.tensor([100.0, 80.0, 60.0, 40.0, 25.0], dtype=torch.float64), bulk]))


class Wrapped:
    """A bare operator: only .shape, .dtype, .device and @ (no indexing, no tensor methods)."""

    def __init__(self, matrix):
        """Wrap a dense matrix and count products."""
        self._matrix = matrix
        self.shape, self.dtype, self.device = matrix.shape, matrix.dtype, matrix.device
        self.products = 0

    def __matmul__(self, x):
        """Matrix product (counted)."""
        self.products += 1
        return self._matrix @ x


def test_lanczos_top_eigenvalues_match_eigvalsh(psd_matrix):
    values, vectors = spectra.lanczos(psd_matrix, 5)
    exact = torch.linalg.eigvalsh(psd_matrix).flip(0)[:5]
    torch.testing.assert_close(values, exact, rtol=1e-8, atol=0)
    assert vectors.shape == (200, 5)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(psd_matrix @ vectors, vectors * values, rtol=0, atol=1e-6)


def test_lanczos_on_bare_operator_uses_n_iter_products(psd_matrix):
    op = Wrapped(psd_matrix)
    values, _ = spectra.lanczos(op, 3, n_iter=50, seed=1)
    assert op.products == 50
    torch.testing.assert_close(values, torch.linalg.eigvalsh(psd_matrix).flip(0)[:3], rtol=1e-8, atol=0)


def test_lanczos_which_smallest_and_magnitude():
    eigenvalues = torch.tensor([-30.0, -3.0, 1.0, 2.0, 20.0] + [0.5] * 35, dtype=torch.float64)
    matrix = matrix_with_spectrum(eigenvalues, seed=3)
    largest, _ = spectra.lanczos(matrix, 2, n_iter=40)
    smallest, vectors = spectra.lanczos(matrix, 2, n_iter=40, which="smallest")
    magnitude, _ = spectra.lanczos(matrix, 3, n_iter=40, which="magnitude")
    torch.testing.assert_close(largest, torch.tensor([20.0, 2.0], dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(smallest, torch.tensor([-3.0, -30.0], dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(magnitude, torch.tensor([-30.0, 20.0, -3.0], dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(matrix @ vectors, vectors * smallest, rtol=0, atol=1e-8)


def test_lanczos_restarts_when_the_krylov_space_closes():
    # two distinct eigenvalues: any start vector spans an invariant space of dimension 2
    matrix = matrix_with_spectrum([5.0, 5.0, 5.0] + [1.0] * 17, seed=4)
    values, vectors = spectra.lanczos(matrix, 3, n_iter=8)
    torch.testing.assert_close(values, torch.full((3,), 5.0, dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(matrix @ vectors, 5 * vectors, rtol=0, atol=1e-10)


def test_lanczos_is_deterministic_and_keeps_dtype(psd_matrix):
    first = spectra.lanczos(psd_matrix, 2, seed=7)
    second = spectra.lanczos(psd_matrix, 2, seed=7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    values, vectors = spectra.lanczos(psd_matrix.float(), 2)
    assert values.dtype == torch.float32 and vectors.dtype == torch.float32
    torch.testing.assert_close(values.double(), torch.linalg.eigvalsh(psd_matrix).flip(0)[:2], rtol=1e-5, atol=0)


def test_lanczos_on_block_diagonal_operator():
    like = {"a": torch.zeros(6, 5), "b": torch.zeros(30)}
    matrix = matrix_with_spectrum(torch.linspace(-1, 10, 60, dtype=torch.float64), seed=5)
    partition = {"a": ["a"], "b": ["b"]}
    values, _ = spectra.lanczos(BlockDiagonalOperator(matrix, partition, like), 2, n_iter=60)
    exact = torch.linalg.eigvalsh(block_diagonal(matrix, partition, like)).flip(0)[:2]
    torch.testing.assert_close(values, exact, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, r"k=0 is invalid; allowed: an integer with 1 <= k <= n=200"),
        ({"k": 201}, r"k=201"),
        ({"k": 5, "n_iter": 4}, r"n_iter=4 is invalid; allowed: an integer with k=5 <= n_iter <= n=200"),
        ({"k": 5, "n_iter": 201}, r"n_iter=201"),
        ({"k": 5, "which": "top"}, r"which='top'.*'largest', 'smallest', 'magnitude'"),
    ],
)
def test_lanczos_bad_arguments(psd_matrix, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectra.lanczos(psd_matrix, **kwargs)


def test_lanczos_rejects_non_square():
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        spectra.lanczos(torch.zeros(3, 4), 1)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_within_three_standard_errors(psd_matrix, distribution):
    estimate, error = spectra.hutchinson_trace(psd_matrix, 300, seed=0, distribution=distribution)
    exact = torch.trace(psd_matrix).item()
    assert error > 0
    assert abs(estimate - exact) < 3 * error
    # the standard error is an honest scale: not orders of magnitude above the actual spread
    assert error < 0.1 * exact


def test_hutchinson_is_exact_for_diagonal_matrices_with_rademacher_probes():
    diagonal = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    estimate, error = spectra.hutchinson_trace(diagonal, 5)
    assert estimate == pytest.approx(55.0, abs=1e-12) and error == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_chunking_and_seed(psd_matrix):
    one = spectra.hutchinson_trace(psd_matrix, 20, seed=3, chunk=1)
    many = spectra.hutchinson_trace(psd_matrix, 20, seed=3, chunk=16)
    assert one[0] == pytest.approx(many[0], rel=1e-12) and one[1] == pytest.approx(many[1], rel=1e-10)
    assert spectra.hutchinson_trace(psd_matrix, 20, seed=4)[0] != one[0]
    assert math.isnan(spectra.hutchinson_trace(psd_matrix, 1)[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_samples": 0}, r"n_samples=0 is invalid; allowed: an integer >= 1"),
        ({"n_samples": 4, "chunk": 0}, r"chunk=0"),
        ({"n_samples": 4, "distribution": "normal"}, r"distribution='normal'.*'rademacher', 'gaussian'"),
    ],
)
def test_hutchinson_bad_arguments(psd_matrix, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectra.hutchinson_trace(psd_matrix, **kwargs)


def test_slq_density_integrates_to_one_and_has_the_trace_as_mean(psd_matrix):
    n = psd_matrix.shape[0]
    result = spectra.spectral_density(psd_matrix, n_probes=30, n_iter=30, seed=2)
    assert result.grid.shape == result.density.shape == (1000,)
    assert torch.trapezoid(result.density, result.grid).item() == pytest.approx(1.0, abs=1e-6)
    assert result.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (result.weights >= 0).all()
    mean = (result.weights * result.nodes).sum().item()
    # Lanczos quadrature integrates x exactly: its mean is the Hutchinson estimate with the same probes
    estimate, error = spectra.hutchinson_trace(psd_matrix, 30, seed=2)
    assert mean == pytest.approx(estimate / n, rel=1e-10)
    assert abs(mean - torch.trace(psd_matrix).item() / n) < 3 * error / n
    assert torch.trapezoid(result.grid * result.density, result.grid).item() == pytest.approx(mean, rel=1e-6)


def test_slq_with_full_krylov_space_recovers_the_spectrum():
    eigenvalues = torch.linspace(-2, 5, 40, dtype=torch.float64)
    result = spectra.spectral_density(matrix_with_spectrum(eigenvalues, seed=6), n_probes=1, n_iter=40)
    torch.testing.assert_close(result.nodes.sort().values, eigenvalues, rtol=0, atol=1e-10)


def test_slq_stops_early_on_a_closed_krylov_space_and_uses_given_grid():
    matrix = matrix_with_spectrum([3.0] * 5 + [1.0] * 15, seed=7)
    grid = torch.linspace(0, 4, 401, dtype=torch.float64)
    result = spectra.spectral_density(matrix, n_probes=4, n_iter=10, grid=grid, sigma=0.05)
    assert result.nodes.shape == (8,)  # two Ritz values per probe
    torch.testing.assert_close(result.nodes.reshape(4, 2), torch.tensor([[1.0, 3.0]] * 4, dtype=torch.float64))
    assert torch.equal(result.grid, grid) and result.sigma == 0.05
    mass_at_3 = result.weights[result.nodes > 2].sum().item()
    assert mass_at_3 == pytest.approx(5 / 20, abs=0.15)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_probes": 0, "n_iter": 5}, r"n_probes=0 is invalid; allowed: an integer >= 1"),
        ({"n_probes": 2, "n_iter": 0}, r"n_iter=0 is invalid; allowed: an integer with 1 <= n_iter <= n=200"),
        ({"n_probes": 2, "n_iter": 201}, r"n_iter=201"),
        ({"n_probes": 2, "n_iter": 5, "sigma": 0.0}, r"sigma=0.0 is invalid; allowed: a number > 0"),
    ],
)
def test_spectral_density_bad_arguments(psd_matrix, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectra.spectral_density(psd_matrix, **kwargs)


def test_smoothed_density_by_hand():
    nodes, grid = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5, 1.0, 3.0])
    normal = lambda x, mu, s: math.exp(-0.5 * ((x - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))  # noqa: E731
    expected = [0.5 * (normal(x, 0.0, 0.5) + normal(x, 1.0, 0.5)) for x in grid.tolist()]
    torch.testing.assert_close(spectra.smoothed_density(nodes, grid, 0.5), torch.tensor(expected, dtype=torch.float64))
    weighted = spectra.smoothed_density(nodes, grid, 0.5, torch.tensor([0.25, 0.75]))
    expected = [0.25 * normal(x, 0.0, 0.5) + 0.75 * normal(x, 1.0, 0.5) for x in grid.tolist()]
    torch.testing.assert_close(weighted, torch.tensor(expected, dtype=torch.float64))
    wide = torch.linspace(-5, 6, 4001, dtype=torch.float64)
    assert abs(torch.trapezoid(spectra.smoothed_density(nodes, wide, 0.5), wide).item() - 1) < 1e-9
    with pytest.raises(ValueError, match="sigma"):
        spectra.smoothed_density(nodes, grid, 0.0)
    with pytest.raises(ValueError, match="weights"):
        spectra.smoothed_density(nodes, grid, 0.5, torch.ones(3) / 3)


def test_spectral_density_smooths_its_quadrature_rule():
    matrix = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    result = spectra.spectral_density(matrix, n_probes=3, n_iter=8, seed=0)
    by_hand = spectra.smoothed_density(result.nodes, result.grid, result.sigma, result.weights)
    torch.testing.assert_close(result.density, by_hand, rtol=0, atol=0)
    exact = spectra.smoothed_density(torch.linalg.eigvalsh(matrix), result.grid, result.sigma)
    assert exact.shape == result.density.shape and torch.isfinite(exact).all()


def test_ggn_hessian_summary_by_hand():
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    ggn = rotation @ torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)) @ rotation.T
    hessian = rotation @ torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)) @ rotation.T
    summary = spectra.ggn_hessian_summary(ggn, hessian)
    expected = {
        "residual_ratio": math.sqrt(2.0**2 + 0.5**2) / math.sqrt(2.0**2 + 1.0**2 + 0.5**2),  # H - G = diag(0, -2, 0.5)
        "trace_G": 3.0,
        "lambda_max_G": 2.0,
        "lambda_min_G": 0.0,
        "lambda_max_H": 2.0,
        "lambda_min_H": -1.0,
        "negative_mass_H": 1.0 / 3.5,
    }
    assert list(summary) == list(expected)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-12), key
    with pytest.raises(ValueError, match="square and alike"):
        spectra.ggn_hessian_summary(ggn, hessian[:2, :2])

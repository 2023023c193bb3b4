"""Losses: values against torch's own, gradients and Hessian products against torch.func references (oracles)."""

import warnings

import oracles
import pytest
import torch
import torch.nn.functional as F

from gnlib.losses import MSE, CrossEntropy


def _ce_case(shape=(2, 3), vocab=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(vocab, shape, generator=g)
    return z, y, g


def _mse_case(rows=(4,), width=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*rows, width, generator=g, dtype=torch.float64)
    y = torch.randn(*rows, width, generator=g, dtype=torch.float64)
    return z, y, g


def test_cross_entropy_value_is_token_mean():
    z, y, _ = _ce_case(shape=(2, 3))
    expected = F.cross_entropy(z.reshape(-1, 5), y.reshape(-1), reduction="none").mean()
    torch.testing.assert_close(CrossEntropy().value(z, y), expected)
    torch.testing.assert_close(CrossEntropy().value_and_grad(z, y)[0], expected)


def test_mse_value_is_row_mean_of_half_squared_norm():
    z, y, _ = _mse_case(rows=(2, 3))
    expected = torch.stack([0.5 * (z[i, j] - y[i, j]).square().sum() for i in range(2) for j in range(3)]).mean()
    torch.testing.assert_close(MSE().value(z, y), expected)


@pytest.mark.parametrize("loss, case", [(CrossEntropy(), _ce_case), (MSE(), _mse_case)])
def test_grad_matches_autograd(loss, case):
    z, y, _ = case()
    expected = torch.func.grad(lambda t: loss.value(t, y))(z)
    torch.testing.assert_close(loss.grad(z, y), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.value_and_grad(z, y)[1], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss, case", [(CrossEntropy(), _ce_case), (MSE(), _mse_case)])
def test_hvp_matches_dense_hessian(loss, case):
    z, y, g = case()
    hessian = oracles.output_hessian(loss.value, z, y)
    for _ in range(3):
        v = torch.randn(z.shape, generator=g, dtype=z.dtype)
        torch.testing.assert_close(loss.hvp(z, y, v).reshape(-1), hessian @ v.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss, case", [(CrossEntropy(), _ce_case), (MSE(), _mse_case)])
def test_quadratic_is_second_order_taylor_model(loss, case):
    z, y, g = case()
    dz = torch.randn(z.shape, generator=g, dtype=z.dtype)
    hessian = oracles.output_hessian(loss.value, z, y)
    grad = torch.func.grad(lambda t: loss.value(t, y))(z).reshape(-1)

    def taylor(d):
        d = d.reshape(-1)
        return loss.value(z, y) + grad @ d + 0.5 * d @ hessian @ d

    value, u = loss.quadratic(z, y, dz)
    torch.testing.assert_close(value, taylor(dz), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u, torch.func.grad(taylor)(dz), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss, case", [(CrossEntropy(), _ce_case), (MSE(), _mse_case)])
def test_quadratic_model_serves_several_steps_around_one_point(loss, case):
    """The shared work on z is reused, not consumed: every step gets its own exact Taylor model."""
    z, y, g = case()
    model = loss.quadratic_model(z, y)
    for _ in range(3):
        dz = torch.randn(z.shape, generator=g, dtype=z.dtype)
        value, u = model(dz)
        expected_value, expected_u = loss.quadratic(z, y, dz)
        hessian_dz = (oracles.output_hessian(loss.value, z, y) @ dz.reshape(-1)).reshape(z.shape)
        torch.testing.assert_close(u, loss.grad(z, y) + hessian_dz, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u, expected_u, rtol=1e-12, atol=1e-12)
    # a float32 step around a float64 point is promoted, as elementwise products would be
    step = torch.randn(z.shape, generator=g).to(torch.float32)
    torch.testing.assert_close(model(step)[0], model(step.double())[0], rtol=1e-6, atol=1e-9)


def _with_ignored_targets(shape=(3, 4), vocab=5, seed=0):
    z, y, g = _ce_case(shape, vocab, seed)
    y[0, 1], y[2, :3] = -100, -100
    return z, y, g


@pytest.mark.parametrize(
    "loss, case", [(CrossEntropy(), _ce_case), (CrossEntropy(), _with_ignored_targets), (MSE(), _mse_case)]
)
def test_quadratic_along_a_line_has_the_derivatives_of_the_loss_and_predicts_every_step(loss, case):
    """(ℓ, gᵀdz, dzᵀH dz) are ℓ(z + α dz) and its first two α-derivatives at 0, by nested torch.func.jvp."""
    z, y, g = case()
    dz = torch.randn(z.shape, generator=g, dtype=z.dtype)
    value, slope, bend = loss.quadratic_along(z, y, dz)

    def along(alpha: torch.Tensor) -> torch.Tensor:
        return loss.value(z + alpha * dz, y)

    def first(alpha: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(along, (alpha,), (torch.ones_like(alpha),))[1]

    zero = torch.zeros((), dtype=z.dtype)
    torch.testing.assert_close(value, along(zero), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slope, first(zero), rtol=1e-10, atol=1e-12)
    second = torch.func.jvp(first, (zero,), (torch.ones_like(zero),))[1]
    torch.testing.assert_close(bend, second, rtol=1e-10, atol=1e-12)
    for alpha in (1.0, 0.5, 2**-1.5, -3.0):
        predicted = value + alpha * slope + 0.5 * alpha**2 * bend
        torch.testing.assert_close(predicted, loss.quadratic(z, y, alpha * dz)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss, case", [(CrossEntropy(), _ce_case), (MSE(), _mse_case)])
def test_hvp_is_batched_by_vmap(loss, case):
    """Dense GGN blocks vmap the Hessian product over columns: it must run batched, not in a per-column fallback."""
    z, y, _ = case()
    columns = torch.eye(z.numel(), dtype=z.dtype).reshape(-1, *z.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when an operation has no batching rule
        batched = torch.func.vmap(lambda c: loss.hvp(z, y, c))(columns)
    torch.testing.assert_close(
        batched.reshape(z.numel(), -1), oracles.output_hessian(loss.value, z, y), rtol=1e-10, atol=1e-12
    )


def test_cross_entropy_hessian_is_psd_with_constant_null_space():
    z, y, _ = _ce_case(shape=(3,))
    hessian = oracles.output_hessian(CrossEntropy().value, z, y)
    assert torch.linalg.eigvalsh(hessian).min() > -1e-12
    ones = torch.ones_like(z)
    torch.testing.assert_close(CrossEntropy().hvp(z, y, ones), torch.zeros_like(z), atol=1e-14, rtol=0)


def test_cross_entropy_hvp_is_per_token_and_analytic_for_a_large_vocabulary():
    # A V×V Hessian per token would need 4 * 50000² * 8 bytes = 80 GB here.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 50_000, generator=g)
    y = torch.randint(50_000, (4,), generator=g)
    v = torch.randn(4, 50_000, generator=g)
    out = CrossEntropy().hvp(z, y, v)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(out[1], (p[1] * v[1] - p[1] * (p[1] @ v[1])) / 4)


def test_mse_hessian_is_identity_over_rows():
    z, y, g = _mse_case(rows=(5,))
    v = torch.randn(z.shape, generator=g, dtype=z.dtype)
    torch.testing.assert_close(MSE().hvp(z, y, v), v / 5)


def test_ignored_targets_count_in_no_value_gradient_or_curvature():
    z, y, g = _with_ignored_targets()
    loss, v = CrossEntropy(), torch.randn(z.shape, generator=g, dtype=torch.float64)
    kept = y != -100
    expected = F.cross_entropy(z[kept], y[kept])
    torch.testing.assert_close(loss.value(z, y), expected)
    value, grad = loss.value_and_grad(z, y)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, torch.func.grad(lambda t: F.cross_entropy(t[kept], y[kept]))(z))
    hessian = oracles.output_hessian(loss.value, z, y)
    torch.testing.assert_close(loss.hvp(z, y, v).reshape(-1), hessian @ v.reshape(-1))
    q, u = loss.quadratic(z, y, v)
    torch.testing.assert_close(q, value + (grad * v).sum() + 0.5 * v.reshape(-1) @ hessian @ v.reshape(-1))
    torch.testing.assert_close(u.reshape(-1), grad.reshape(-1) + hessian @ v.reshape(-1))
    assert (grad[~kept] == 0).all() and (loss.hvp(z, y, v)[~kept] == 0).all()

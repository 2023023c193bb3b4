"""The linear-operator base class, through its three subclasses, against dense float64 matrices.

References come from ``oracles``, plain autograd on a tiny tanh MLP (3 → 4 → 3, 31 parameters) and
``torch.nn.functional.cross_entropy``: J = ``torch.func.jacrev`` of the logits, H_z and H =
``torch.func.hessian`` of the loss in the logits and in the flat parameters, G = Jᵀ H_z J, and
blockdiag(G) masks G to the per-layer blocks, whose flat ranges are read off the parameter shapes.
"""

import numpy as np
import oracles
import pytest
import scipy.sparse.linalg
import torch

from gnlib import LinearOperator
from gnlib.curvature import GGNOperator, HessianOperator
from gnlib.curvature.blocks import BlockDiagonalOperator, per_layer
from gnlib.losses import CrossEntropy
from gnlib.models import mlp
from gnlib.params import params_of, unflatten

F64 = torch.float64
RTOL, ATOL = 1e-10, 1e-12


class Dense:
    """Reference matrices and the operators that should equal them."""

    def __init__(self, dtype: torch.dtype = F64) -> None:
        """Model, batch, dense G, H and blockdiag(G) in float64; operators in ``dtype``."""
        model = mlp([3, 4, 3], seed=0).to(F64)
        params = params_of(model)
        gen = torch.Generator().manual_seed(1)
        inputs, targets = torch.randn(5, 3, generator=gen, dtype=F64), torch.randint(0, 3, (5,), generator=gen)
        self.G = oracles.dense_ggn(model, params, (inputs, targets), torch.nn.functional.cross_entropy)
        self.H = oracles.dense_hessian(model, params, (inputs, targets), torch.nn.functional.cross_entropy)
        mask = torch.zeros_like(self.G, dtype=torch.bool)
        start = 0
        for layer in ("0", "2"):
            size = params[f"{layer}.weight"].numel() + params[f"{layer}.bias"].numel()
            mask[start : start + size, start : start + size] = True
            start += size
        self.blockdiag_G = self.G * mask
        self.n = len(self.G)

        cast = model.to(dtype)
        cast_params = {name: t.to(dtype) for name, t in params.items()}
        batch = (inputs.to(dtype), targets)
        self.ops = {
            "ggn": GGNOperator(cast, cast_params, batch, CrossEntropy()),
            "hessian": HessianOperator(cast, cast_params, batch, CrossEntropy()),
        }
        self.ops["blockdiag"] = BlockDiagonalOperator(self.ops["ggn"], per_layer(cast), cast_params)
        self.dense = {"ggn": self.G, "hessian": self.H, "blockdiag": self.blockdiag_G}
        self.params = cast_params

    def vectors(self, k: int, seed: int) -> torch.Tensor:
        """(n, k) seeded standard normal columns, float64."""
        return torch.randn(self.n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module")
def dense() -> Dense:
    """The float64 references and operators."""
    return Dense()


KINDS = ["ggn", "hessian", "blockdiag"]


@pytest.mark.parametrize("kind", KINDS)
def test_product_with_a_vector_a_matrix_and_a_params_dict(dense, kind):
    op, matrix = dense.ops[kind], dense.dense[kind]
    assert isinstance(op, LinearOperator) and op.symmetric
    assert op.shape == (dense.n, dense.n) and op.dtype == F64 and op.device == torch.device("cpu")
    x = dense.vectors(4, seed=2)
    torch.testing.assert_close(op @ x[:, 0], matrix @ x[:, 0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(op @ x, matrix @ x, rtol=RTOL, atol=ATOL)
    as_dict = op @ unflatten(x[:, 1], op.like)
    assert list(as_dict) == list(dense.params)
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in as_dict.values()]), matrix @ x[:, 1], rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("kind", KINDS)
def test_to_scipy_matvec_and_rmatvec_equal_the_dense_matrix(dense, kind):
    scipy_op, matrix = dense.ops[kind].to_scipy(), dense.dense[kind].numpy()
    assert scipy_op.dtype == np.float64 and scipy_op.shape == matrix.shape
    x = dense.vectors(3, seed=3).numpy()
    np.testing.assert_allclose(scipy_op.matvec(x[:, 0]), matrix @ x[:, 0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scipy_op.rmatvec(x[:, 0]), matrix.T @ x[:, 0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scipy_op.matmat(x), matrix @ x, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(scipy_op.rmatmat(x), matrix.T @ x, rtol=RTOL, atol=ATOL)
    top = scipy.sparse.linalg.eigsh(scipy_op, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(matrix)[-2:], rtol=1e-8, atol=ATOL)


def test_to_scipy_is_float64_for_a_float32_operator():
    single = Dense(torch.float32)
    op = single.ops["ggn"]
    assert op.dtype == torch.float32
    scipy_op = op.to_scipy()
    x = single.vectors(1, seed=4)[:, 0].numpy()
    y = scipy_op.matvec(x)
    assert scipy_op.dtype == np.float64 and y.dtype == np.float64
    np.testing.assert_allclose(y, single.G.numpy() @ x, rtol=1e-4, atol=1e-6)


def test_sums_differences_and_scalar_multiples(dense):
    ggn, hessian = dense.ops["ggn"], dense.ops["hessian"]
    x = dense.vectors(2, seed=5)
    cases = {
        "A + B": (ggn + hessian, dense.G + dense.H),
        "A - B": (ggn - hessian, dense.G - dense.H),
        "2 * A": (2 * ggn, 2 * dense.G),
        "A * 0.5": (ggn * 0.5, 0.5 * dense.G),
        "-A": (-hessian, -dense.H),
        "2 * (A + B) - A": (2 * (ggn + hessian) - ggn, dense.G + 2 * dense.H),
    }
    for label, (op, matrix) in cases.items():
        assert isinstance(op, LinearOperator) and op.symmetric, label
        torch.testing.assert_close(op @ x[:, 0], matrix @ x[:, 0], rtol=RTOL, atol=ATOL, msg=label)
        torch.testing.assert_close(op @ x, matrix @ x, rtol=RTOL, atol=ATOL, msg=label)
    scipy_sum = (ggn + hessian).to_scipy()
    np.testing.assert_allclose(
        scipy_sum.rmatvec(x[:, 0].numpy()), (dense.G + dense.H).numpy() @ x[:, 0].numpy(), rtol=RTOL, atol=ATOL
    )


def test_wrong_inputs_raise_errors_naming_the_expected_size(dense):
    op = dense.ops["ggn"]
    n = dense.n
    with pytest.raises(ValueError, match=rf"x has shape \({n - 1},\), expected \({n},\) or \({n}, k\)"):
        op @ torch.zeros(n - 1, dtype=F64)
    with pytest.raises(ValueError, match=rf"x has shape \(2, {n}\), expected \({n},\) or \({n}, k\)"):
        op @ torch.zeros(2, n, dtype=F64)
    with pytest.raises(ValueError, match="expected torch.float64"):
        op @ torch.zeros(n, dtype=torch.float32)
    with pytest.raises(ValueError, match="x does not match the parameters"):
        op @ {"0.weight": torch.zeros(4, 3, dtype=F64)}
    with pytest.raises(ValueError, match=r"shape, dtype and device must match"):
        hessian = dense.ops["hessian"]
        op + HessianOperator(hessian.model, hessian.params, hessian.batch, wrt=["0.weight"])
    with pytest.raises(TypeError):
        op * True


def test_rmatvec_only_for_symmetric_operators(dense):
    lower = torch.tril(dense.G) + torch.eye(dense.n, dtype=F64)
    op = BlockDiagonalOperator(lower, {"all": list(dense.params)}, dense.params)
    assert not op.symmetric
    scipy_op = op.to_scipy()
    x = dense.vectors(1, seed=6)[:, 0].numpy()
    np.testing.assert_allclose(scipy_op.matvec(x), lower.numpy() @ x, rtol=RTOL, atol=ATOL)
    with pytest.raises(NotImplementedError):
        scipy_op.rmatvec(x)

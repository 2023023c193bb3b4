"""SOAP against oracles: Adam when nothing is preconditioned, a hand-computed step, exact eigenbases."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

from gnlib.optim import SOAP
from gnlib.optim.soap import eigenbasis, power_qr, project


def _grads(shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()} for _ in range(n)]


def _leaves(shapes: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for k, s in shapes.items()}


def _apply(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    for k, p in params.items():
        p.grad = grads[k].clone()
    opt.step()


SHAPES = {"w": (5, 3), "gain": (4,)}


def test_without_preconditioning_soap_is_adamw_after_a_skipped_first_step():
    # max_precond_dim=0: every side keeps the identity basis, so the update is AdamW's. eps=0 makes the
    # two eps placements (SOAP: sqrt(v)+eps before bias correction; torch: after) coincide exactly.
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=0.0, weight_decay=0.1)
    soap_params, adam_params = _leaves(SHAPES), _leaves(SHAPES)
    soap = SOAP(list(soap_params.items()), max_precond_dim=0, **hp)
    adam = torch.optim.AdamW(list(adam_params.values()), **hp)
    grads = _grads(SHAPES, 6)
    before = {k: p.detach().clone() for k, p in soap_params.items()}
    _apply(soap, soap_params, grads[0])
    for k in SHAPES:
        assert torch.equal(soap_params[k].detach(), before[k]), "the first call must not move the parameters"
        assert not any(key.startswith("basis") for key in soap.state[soap_params[k]])
    for g in grads[1:]:
        _apply(soap, soap_params, g)
        _apply(adam, adam_params, g)
        for k in SHAPES:
            torch.testing.assert_close(soap_params[k], adam_params[k], rtol=1e-12, atol=1e-14)


def test_hand_computed_step_on_a_3x2_matrix():
    lr, beta1, beta2, beta_s, eps, wd = 0.1, 0.9, 0.99, 0.8, 1e-2, 0.1
    W0 = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    G1 = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    G2 = np.array([[0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]])
    # Call 1 only builds the factors L1 = (1-βs) G1 G1ᵀ (3x3), R1 = (1-βs) G1ᵀ G1 (2x2) and their
    # eigenbases (columns by decreasing eigenvalue); W is unchanged.
    L1, R1 = (1 - beta_s) * G1 @ G1.T, (1 - beta_s) * G1.T @ G1
    QL, QR = (np.linalg.eigh(F)[1][:, ::-1] for F in (L1, R1))
    # Call 2 = update t=1: Adam on the rotated gradient G̃ = Q_Lᵀ G2 Q_R, rotated back.
    Gt = QL.T @ G2 @ QR
    m = (1 - beta1) * Gt
    v = (1 - beta2) * Gt**2
    U = QL @ (m / (np.sqrt(v) + eps)) @ QR.T
    step_size = lr * math.sqrt(1 - beta2) / (1 - beta1)  # bias corrections sqrt(1-β2^1) / (1-β1^1)
    W1 = W0 * (1 - lr * wd) - step_size * U
    # Then the factors take G2: L2 = βs L1 + (1-βs) G2 G2ᵀ, R2 likewise (no refresh before update 10).
    L2, R2 = beta_s * L1 + (1 - beta_s) * G2 @ G2.T, beta_s * R1 + (1 - beta_s) * G2.T @ G2

    w = torch.tensor(W0, requires_grad=True)
    opt = SOAP([w], lr=lr, betas=(beta1, beta2), shampoo_beta=beta_s, eps=eps, weight_decay=wd)
    for G in (G1, G2):
        w.grad = torch.tensor(G)
        opt.step()
        if G is G1:
            assert torch.equal(w.detach(), torch.tensor(W0))
    state = opt.state[w]
    torch.testing.assert_close(w.detach(), torch.tensor(W1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["factor_0"], torch.tensor(L2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["factor_1"], torch.tensor(R2), rtol=1e-12, atol=1e-12)
    assert state["step"] == 1


def test_hand_computed_refresh_reorders_the_second_moment_and_rotates_the_first():
    beta1, beta2, beta_s = 0.9, 0.99, 0.5
    G1 = np.array([[3.0, 1.0], [0.5, -1.0], [0.2, 0.3]])
    G2 = np.array([[0.1, -0.2], [0.5, 0.4], [4.0, -3.0]])
    L1, R1 = (1 - beta_s) * G1 @ G1.T, (1 - beta_s) * G1.T @ G1
    QL, QR = (np.linalg.eigh(F)[1][:, ::-1] for F in (L1, R1))
    Gt = QL.T @ G2 @ QR
    m, v = (1 - beta1) * Gt, (1 - beta2) * Gt**2  # moments after update 1, in the old eigenbasis
    L2, R2 = beta_s * L1 + (1 - beta_s) * G2 @ G2.T, beta_s * R1 + (1 - beta_s) * G2.T @ G2
    # Refresh (precondition_frequency=1): sort old columns by Rayleigh quotient diag(QᵀFQ), descending,
    # then Q_new = qr(F Q_sorted); Ṽ follows the permutation, M̃ is rotated: Q_newᵀ (Q_L M̃ Q_Rᵀ) Q_new.
    order_L = np.argsort(-np.einsum("ij,ij->j", QL, L2 @ QL))
    order_R = np.argsort(-np.einsum("ij,ij->j", QR, R2 @ QR))
    assert order_L.tolist() == [2, 0, 1] and order_R.tolist() == [1, 0], "this data must reorder both bases"
    QL_new, QR_new = np.linalg.qr(L2 @ QL[:, order_L])[0], np.linalg.qr(R2 @ QR[:, order_R])[0]
    v_new = v[order_L][:, order_R]
    m_new = QL_new.T @ (QL @ m @ QR.T) @ QR_new

    w = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    opt = SOAP([w], betas=(beta1, beta2), shampoo_beta=beta_s, precondition_frequency=1)
    for G in (G1, G2):
        w.grad = torch.tensor(G)
        opt.step()
    state = opt.state[w]
    # QR fixes each column only up to sign: compare |Q_newᵀ Q| with I, and the sign-free quantities.
    for Q_expected, key in ((QL_new, "basis_0"), (QR_new, "basis_1")):
        signs = torch.tensor(Q_expected).T @ state[key]
        torch.testing.assert_close(signs.abs(), torch.eye(len(signs), dtype=signs.dtype), rtol=0, atol=1e-12)
    signs_L, signs_R = (
        torch.diagonal(torch.tensor(Q).T @ state[k]) for Q, k in ((QL_new, "basis_0"), (QR_new, "basis_1"))
    )
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor(v_new), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        state["exp_avg"], signs_L[:, None] * torch.tensor(m_new) * signs_R, rtol=1e-12, atol=1e-14
    )


def test_first_bases_diagonalize_the_factors_in_decreasing_order():
    w = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
    opt = SOAP([w])
    w.grad = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    opt.step()
    state = opt.state[w]
    for d in (0, 1):
        F, Q = state[f"factor_{d}"], state[f"basis_{d}"]
        torch.testing.assert_close(Q.T @ Q, torch.eye(len(Q), dtype=Q.dtype), rtol=0, atol=1e-12)
        D = Q.T @ F @ Q
        off = D - torch.diag(D.diagonal())
        assert off.abs().max() <= 1e-12 * F.norm()
        assert torch.all(D.diagonal()[:-1] >= D.diagonal()[1:] - 1e-12 * F.norm())


def test_power_qr_refresh_converges_to_the_eigenbasis_and_keeps_an_exact_one():
    gen = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64)).Q
    eigenvalues = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    F = U @ torch.diag(eigenvalues) @ U.T
    # An exact basis given in the wrong order comes back sorted and still exact.
    Q, order = power_qr(F, U.flip(-1))
    assert order.tolist() == [4, 3, 2, 1, 0]
    torch.testing.assert_close(Q.T @ F @ Q, torch.diag(eigenvalues), rtol=0, atol=1e-12)
    # From a random basis, repeated refreshes are subspace iteration: eigenvalue ratios 1/2 per step.
    Q = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64)).Q
    for _ in range(60):
        Q, _ = power_qr(F, Q)
    torch.testing.assert_close(Q.T @ F @ Q, torch.diag(eigenvalues), rtol=0, atol=1e-10)


def test_first_moment_lives_in_the_eigenbasis_and_rotates_at_refresh():
    # Q_L M̃ Q_Rᵀ must equal the plain EMA of the gradients of updates 1..t in every basis.
    shapes = {"w": (6, 4)}
    params = _leaves(shapes)
    beta1 = 0.9
    opt = SOAP(list(params.items()), betas=(beta1, 0.95), precondition_frequency=3)
    grads = _grads(shapes, 8, seed=5)
    _apply(opt, params, grads[0])
    state = opt.state[params["w"]]
    ema = torch.zeros(6, 4, dtype=torch.float64)
    for t, g in enumerate(grads[1:], start=1):
        basis = state["basis_0"].clone()
        _apply(opt, params, g)
        assert torch.equal(basis, state["basis_0"]) == (t % 3 != 0), f"refresh at update {t} only if t % 3 == 0"
        ema = beta1 * ema + (1 - beta1) * g["w"]
        bases = {0: state["basis_0"], 1: state["basis_1"]}
        torch.testing.assert_close(project(state["exp_avg"], bases, back=True), ema, rtol=1e-10, atol=1e-12)


def test_long_sides_stay_unpreconditioned():
    w = torch.zeros(20, 3, requires_grad=True)
    opt = SOAP([w], max_precond_dim=10)
    w.grad = torch.randn(20, 3)
    opt.step()
    assert "basis_0" not in opt.state[w] and opt.state[w]["basis_1"].shape == (3, 3)


def test_eigh_failure_falls_back_to_float64_with_jitter_then_to_the_previous_basis(monkeypatch):
    F = torch.diag(torch.tensor([3.0, 2.0, 1.0])) + 0.1
    real_eigh = torch.linalg.eigh

    def eigh_raising_in_float32(a):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return real_eigh(a)

    def eigh_nan_in_float32(a):
        values, vectors = real_eigh(a)
        return values, vectors * float("nan") if a.dtype == torch.float32 else vectors

    for failing in (eigh_raising_in_float32, eigh_nan_in_float32):
        monkeypatch.setattr(torch.linalg, "eigh", failing)
        Q = eigenbasis(F)
        assert Q.dtype == torch.float32
        D = Q.T @ F @ Q
        assert (D - torch.diag(D.diagonal())).abs().max() < 1e-5 * F.norm()

    def eigh_failing(a):
        raise torch.linalg.LinAlgError("simulated convergence failure")

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing)
    previous = torch.linalg.qr(torch.randn(3, 3)).Q
    assert torch.equal(eigenbasis(F, previous), previous)
    assert torch.equal(eigenbasis(F), torch.eye(3))
    w = torch.ones(3, 2, requires_grad=True)
    opt = SOAP([w])
    for _ in range(3):
        w.grad = torch.randn(3, 2)
        opt.step()
    assert torch.isfinite(w).all() and torch.equal(opt.state[w]["basis_0"], torch.eye(3))


def test_non_finite_factor_keeps_the_previous_basis():
    previous = torch.eye(2)
    assert torch.equal(eigenbasis(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), previous), previous)
    bad = torch.tensor([[float("inf"), 0.0], [0.0, 1.0]])
    Q, order = power_qr(bad, previous)
    assert torch.equal(Q, previous) and order.tolist() == [0, 1]


def test_state_dict_round_trip_continues_identically():
    shapes = {"w": (6, 4), "gain": (4,)}
    grads = _grads(shapes, 10, seed=6)

    def build(params):
        return SOAP(list(params.items()), precondition_frequency=2)

    params = _leaves(shapes)
    opt = build(params)
    for g in grads[:5]:
        _apply(opt, params, g)
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state tensors
    saved_params = {k: p.detach().clone() for k, p in params.items()}
    for g in grads[5:]:
        _apply(opt, params, g)

    resumed = {k: p.clone().requires_grad_() for k, p in saved_params.items()}
    opt2 = build(resumed)
    opt2.load_state_dict(saved_opt)
    for g in grads[5:]:
        _apply(opt2, resumed, g)
    for k in shapes:
        assert torch.equal(resumed[k].detach(), params[k].detach())


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(shampoo_beta=1.5), "shampoo_beta"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(max_precond_dim=2.5), "max_precond_dim"),
    ],
)
def test_invalid_hyperparameters_are_named(kwargs, parameter):
    with pytest.raises(ValueError, match=re.escape(f"{parameter}=")):
        SOAP([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_more_than_two_dimensions_is_rejected():
    with pytest.raises(ValueError, match="at most 2 dimensions"):
        SOAP([torch.zeros(2, 2, 2, requires_grad=True)])

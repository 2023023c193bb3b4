"""Gauss-Newton optimizer (gnlib.optim.gauss_newton) and its CG pieces (gnlib.optim.hessian_free).

Oracles: least squares (lstsq), logistic regression (dense Newton with the Hessian from ``oracles``), dense
block-diagonal solves and a dense simulation of the inner loop on a tiny MLP, all in float64.
"""

from __future__ import annotations

import io
import math

import oracles
import pytest
import torch

from gnlib import curvature
from gnlib.curvature.costs import layerwise_pass_counts
from gnlib.data import BatchSampler
from gnlib.experiment.train import TrainSettings, train
from gnlib.losses import MSE, CrossEntropy
from gnlib.models import linear_model, mlp
from gnlib.optim.gauss_newton import GaussNewton, make_gauss_newton
from gnlib.optim.gn_options import GN_VARIANTS, LINE_SEARCH
from gnlib.optim.hessian_free import backtrack, conjugate_gradient, kept_iterations, lm_damping
from gnlib.optim.line_search import PassCount
from gnlib.params import flatten, params_of, unflatten

F64 = torch.float64
# one CG solve per outer step, run until its residual is negligible: the exact (damped) GN direction
EXACT_CG = dict(solver="cg", inner_steps=1, cg_tol=1e-13, cg_progress_tol=0.0, cg_backtrack=False)


# --------------------------------------------------------------------------------------------- helpers


def _regression(n: int = 40, d_in: int = 3, d_out: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=F64)
    y = x @ torch.randn(d_in, d_out, generator=g, dtype=F64) + 0.3 * torch.randn(n, d_out, generator=g, dtype=F64)
    return x, y


def _linear(d_in: int = 3, d_out: int = 2, seed: int = 0) -> torch.nn.Module:
    return linear_model(d_in, d_out, seed=seed).to(F64)


def _fixed(batch):
    return lambda: batch


class _Stream:
    """Seeded random row subsets of a fixed data set, with a resumable generator; records what it drew."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: int, seed: int = 0) -> None:
        self.x, self.y, self.rows = x, y, rows
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self):
        index = torch.randperm(len(self.x), generator=self.generator)[: self.rows]
        self.drawn.append((self.x[index], self.y[index]))
        return self.drawn[-1]


def _token_sampler(seed: int = 0, batch_size: int = 4, seq_len: int = 16) -> BatchSampler:
    # A learnable stream: a repeated pattern of 32 symbols with some noise.
    g = torch.Generator().manual_seed(123)
    tokens = torch.arange(2000) * 7 % 32
    noise = torch.rand(2000, generator=g) < 0.1
    tokens[noise] = torch.randint(0, 32, (int(noise.sum()),), generator=g)
    return BatchSampler(tokens, batch_size, seq_len, seed=seed)


def _move(model: torch.nn.Module, before: dict) -> torch.Tensor:
    return flatten(params_of(model)) - flatten(before)


# --------------------------------------------------------------------------------------------- CG pieces


def test_cg_solves_a_dense_spd_system_and_keeps_iterates_at_powers_of_1_3():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=g, dtype=F64)
    a = m @ m.T + 0.5 * torch.eye(12, dtype=F64)
    b = torch.randn(12, generator=g, dtype=F64)
    result = conjugate_gradient(lambda x: a @ x, b, max_iters=40, tol=1e-12)
    torch.testing.assert_close(result.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    assert result.finite and result.iterations <= 40
    assert result.phi == pytest.approx(float(0.5 * result.x @ a @ result.x - b @ result.x), rel=1e-9)
    assert sorted(kept_iterations(20)) == [1, 2, 3, 4, 5, 7, 9, 11, 14, 18]
    kept = [it.iteration for it in result.iterates]
    assert kept[-1] == result.iterations and set(kept[:-1]) <= kept_iterations(40)
    # A warm start at the solution needs no iteration.
    warm = conjugate_gradient(lambda x: a @ x, b, result.x, max_iters=40, tol=1e-6)
    assert warm.iterations == 0 and warm.products == 1


def test_cg_reports_a_nonfinite_product():
    result = conjugate_gradient(lambda x: x * float("nan"), torch.ones(3, dtype=F64), max_iters=5)
    assert not result.finite


def test_backtracking_and_levenberg_marquardt_rules():
    from gnlib.optim.hessian_free import Iterate

    iterates = [Iterate(i, torch.tensor([float(i)]), -float(i)) for i in (1, 2, 3, 4)]
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5}  # going back from 4: 2.5 → 2.0 → 1.0 → 3.0 stops at 2
    chosen, evaluations = backtrack(iterates, lambda x: losses[int(x.item())])
    assert chosen.iteration == 2 and evaluations == 4
    assert lm_damping(1.0, 0.1) == 1.5 and lm_damping(1.0, float("nan")) == 1.5 and lm_damping(1.0, None) == 1.5
    assert lm_damping(1.0, 0.9) == pytest.approx(2 / 3) and lm_damping(1.0, 0.5) == 1.0


# --------------------------------------------------------------------------------------------- exact solutions


def _lstsq_solution(model, x, y):
    design = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (d_in + 1, d_out)
    return torch.cat([solution[:-1].T.reshape(-1), solution[-1]])  # weight (d_out, d_in) then bias


def test_cg_reaches_the_least_squares_minimizer_in_one_outer_step():
    x, y = _regression()
    model = _linear()
    gn = GaussNewton(model, _fixed((x, y)), damping=0.0, cg_iters=50, loss=MSE(), **EXACT_CG)
    diagnostics = gn.step()
    torch.testing.assert_close(flatten(params_of(model)), _lstsq_solution(model, x, y), rtol=0, atol=1e-10)
    assert diagnostics["alpha"] == 1.0 and diagnostics["rejected"] == 0
    # The GN model of least squares is exact: ρ = 1.
    assert diagnostics["rho"] == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize(
    "solver, options, steps, lr, tolerance",
    [("sgd", {"momentum": 0.0}, 300, 0.5, 1e-9), ("adamw", {}, 1500, 0.05, 1e-4)],
)
def test_first_order_inner_solver_reaches_the_least_squares_minimizer(solver, options, steps, lr, tolerance):
    x, y = _regression()
    model = _linear()
    gn = GaussNewton(
        model,
        _fixed((x, y)),
        solver=solver,
        solver_options=options,
        inner_steps=steps,
        inner_lr=lr,
        grad_clip=None,
        line_search=None,
        loss=MSE(),
    )
    gn.step()
    error = (flatten(params_of(model)) - _lstsq_solution(model, x, y)).abs().max()
    assert error < tolerance


def test_cg_direction_equals_the_dense_newton_direction_for_logistic_regression():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=F64)
    y = torch.randint(0, 4, (30,), generator=g)
    model = _linear(3, 4, seed=2)
    before = params_of(model)
    damping = 1e-3

    hessian = oracles.dense_hessian(model, before, (x, y), CrossEntropy().value)
    grad = flatten(oracles.loss_gradient(model, before, (x, y), CrossEntropy().value))
    newton = -torch.linalg.solve(hessian + damping * torch.eye(len(grad), dtype=F64), grad)
    gn = GaussNewton(model, _fixed((x, y)), damping=damping, cg_iters=200, line_search=None, **EXACT_CG)
    gn.step()
    torch.testing.assert_close(_move(model, before), newton, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------- layerwise


def test_layerwise_with_one_block_equals_full_gn():
    x, y = _regression(seed=3)
    runs = []
    for blocks in (None, {"everything": [n for n, _ in mlp([3, 4, 2]).named_parameters()]}):
        model = mlp([3, 4, 2], seed=0).to(F64)
        gn = GaussNewton(model, _Stream(x, y, rows=16), blocks=blocks, inner_steps=3, loss=MSE())
        rows = [gn.step() for _ in range(2)]
        runs.append((flatten(params_of(model)), rows))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_layerwise_cg_equals_the_dense_block_diagonal_solve():
    x, y = _regression(seed=4)
    model = mlp([3, 5, 2], seed=1).to(F64)
    before = params_of(model)
    jac = oracles.dense_jacobian(model, before, x)
    n = len(x)
    residual = (model(x) - y).detach().reshape(-1)
    ggn, grad = jac.T @ jac / n, jac.T @ residual / n  # MSE: H_z = I/n, g_z = (z − y)/n
    damping = 1e-4
    sizes = {name: t.numel() for name, t in before.items()}
    expected, offset = [], 0
    for names in (["0.weight", "0.bias"], ["2.weight", "2.bias"]):  # per_layer blocks "0" and "2"
        width = sum(sizes[name] for name in names)
        block = slice(offset, offset + width)
        eye = torch.eye(width, dtype=F64)
        expected.append(-torch.linalg.solve(ggn[block, block] + damping * eye, grad[block]))
        offset += width
    gn = GaussNewton(
        model,
        _fixed((x, y)),
        blocks="per_layer",
        damping=damping,
        cg_iters=200,
        line_search=None,
        loss=MSE(),
        **EXACT_CG,
    )
    assert [g["block"] for g in gn.param_groups] == ["0", "2"]
    gn.step()
    torch.testing.assert_close(_move(model, before), torch.cat(expected), rtol=0, atol=1e-8)


def test_layerwise_sgd_inner_loop_matches_a_dense_jacobi_iteration_with_prox_and_weight_decay():
    x, y = _regression(seed=5)
    model = mlp([3, 4, 2], seed=2).to(F64)
    before = params_of(model)
    theta = flatten(before)
    jac = oracles.dense_jacobian(model, before, x)
    n = len(x)
    ggn, grad = jac.T @ jac / n, jac.T @ (model(x) - y).detach().reshape(-1) / n
    lr, prox, wd, steps = 0.3, 0.7, 0.2, 4
    inv_numel = torch.cat([torch.full((t.numel(),), 1.0 / t.numel(), dtype=F64) for t in before.values()])
    in_first = torch.cat([torch.full((t.numel(),), n.startswith("0."), dtype=torch.bool) for n, t in before.items()])
    mask = {True: in_first, False: ~in_first}
    loss0 = MSE().value(model(x), y).item()
    delta, q_end = torch.zeros_like(theta), loss0
    for k in range(steps):
        rate = lr * (1 + math.cos(math.pi * k / steps)) / 2
        update, q_end = torch.zeros_like(theta), loss0
        for block in mask.values():  # Jacobi: block b's gradient uses G_bb Δ_b only
            own = torch.where(block, delta, 0.0)
            gradient = grad + ggn @ own + 2 * prox * own * inv_numel
            update += torch.where(block, rate * wd * (theta + delta) + rate * gradient, 0.0)
            # layerwise q: ℓ0 + Σ_b (own quadratic change + own proximal term)
            q_end += (grad @ own + 0.5 * own @ ggn @ own + prox * (own**2 * inv_numel).sum()).item()
        delta = delta - update
    gn = GaussNewton(
        model,
        _fixed((x, y)),
        blocks="per_layer",
        solver="sgd",
        solver_options={"momentum": 0.0},
        inner_steps=steps,
        inner_lr=lr,
        prox=prox,
        weight_decay=wd,
        grad_clip=None,
        line_search=None,
        loss=MSE(),
    )
    diagnostics = gn.step()
    torch.testing.assert_close(_move(model, before), delta, rtol=0, atol=1e-12)
    assert diagnostics["q_start"] == pytest.approx(loss0, rel=1e-12)
    assert diagnostics["q_end"] == pytest.approx(q_end, rel=1e-12)


def test_inner_gradient_is_clipped_to_grad_clip():
    x, y = _regression(seed=10)
    model = _linear()
    before = params_of(model)
    grad = flatten(oracles.loss_gradient(model, before, (x, y), MSE().value))
    assert grad.norm() > 0.1
    gn = GaussNewton(
        model,
        _fixed((x, y)),
        solver="sgd",
        solver_options={"momentum": 0.0},
        inner_steps=1,
        inner_lr=0.5,
        grad_clip=0.1,
        line_search=None,
        loss=MSE(),
    )
    gn.step()
    # torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    torch.testing.assert_close(_move(model, before), -0.5 * 0.1 * grad / (grad.norm() + 1e-6), rtol=0, atol=1e-12)


@pytest.mark.parametrize("warm_start", [True, False])
def test_warm_start_continues_from_the_pre_line_search_iterate(warm_start):
    x, y = _regression(n=80, seed=11)
    model = _linear()
    before = params_of(model)
    gn = GaussNewton(
        model,
        _Stream(x, y, rows=20),
        solver="adamw",
        inner_steps=3,
        inner_lr=0.05,
        line_search=(0.25,),
        warm_start=warm_start,
        loss=MSE(),
    )
    diagnostics = gn.step()
    assert diagnostics["alpha"] == 0.25
    step = _move(model, before)  # α·Δ̂
    state = gn.state_dict()["blocks"]["full"]
    start = flatten(state["delta"])  # where the next inner loop starts: θ̂ − θ_{t+1} = (1 − α)Δ̂ = 3·αΔ̂
    torch.testing.assert_close(start, 3 * step if warm_start else torch.zeros_like(step), rtol=1e-12, atol=1e-15)
    assert bool(state["optimizer"]["state"]) == warm_start  # AdamW moments kept only when warm-starting


# --------------------------------------------------------------------------------------------- objectives


def test_prox_linear_equals_gn_on_a_model_linear_in_its_parameters_with_mse():
    x, y = _regression(n=60, seed=6)
    runs = []
    for objective in ("gn", "prox_linear"):
        model = _linear(seed=3)
        gn = GaussNewton(
            model,
            _Stream(x, y, rows=20, seed=1),
            objective=objective,
            solver="adamw",
            inner_steps=4,
            inner_lr=0.05,
            loss=MSE(),
        )
        rows = [gn.step() for _ in range(3)]
        runs.append((flatten(params_of(model)), rows))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    for a, b in zip(runs[0][1], runs[1][1]):
        for key in ("q_start", "q_end", "loss", "alpha", "predicted_reduction"):
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12)


def test_the_quadratic_decreases_along_the_inner_loop_with_a_small_inner_lr():
    model = oracles.small_transformer()
    batch = _token_sampler()()
    gn = GaussNewton(model, _fixed(batch), inner_steps=5, inner_lr=1e-3, line_search_batches=1)
    diagnostics = gn.step()
    assert diagnostics["q_end"] < diagnostics["q_start"]
    # At Δ = 0 the quadratic equals the loss.
    assert diagnostics["q_start"] == pytest.approx(diagnostics["loss_before"], rel=1e-5)


# --------------------------------------------------------------------------------------------- safety


class _Poisoned:
    """Normal batches, except draw number ``bad`` (0-based) whose inputs are NaN."""

    def __init__(self, batch, bad: int) -> None:
        self.batch, self.bad, self.count = batch, bad, 0

    def __call__(self):
        self.count += 1
        x, y = self.batch
        return (torch.full_like(x, float("nan")), y) if self.count - 1 == self.bad else (x, y)


@pytest.mark.parametrize("solver", ["sgd", "cg"])
@pytest.mark.parametrize("where", ["inner", "line_search"])
def test_a_nonfinite_value_rejects_the_step_and_shrinks_the_lr_or_raises_damping(solver, where):
    x, y = _regression(seed=7)
    model = _linear()
    before = params_of(model)
    inner_steps = 2
    source = _Poisoned((x, y), bad=0 if where == "inner" else inner_steps)
    gn = GaussNewton(model, source, solver=solver, inner_steps=inner_steps, loss=MSE())
    diagnostics = gn.step()
    assert diagnostics["rejected"] == 1 and diagnostics["reason"] == "nonfinite" and diagnostics["alpha"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    if solver == "cg":
        assert gn.damping == 1.5
    else:
        assert gn.param_groups[0]["lr"] == 0.005
    diagnostics = gn.step()  # clean batches from now on
    assert diagnostics["rejected"] == 0 and diagnostics["loss"] < diagnostics["loss_before"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_line_search_picks_the_best_alpha_of_the_grid_and_rejects_an_increase():
    x, y = _regression(n=80, seed=8)
    model = _linear()
    source = _Stream(x, y, rows=20)
    gn = GaussNewton(model, source, solver="sgd", inner_steps=3, inner_lr=0.3, line_search_batches=2, loss=MSE())
    before = params_of(model)
    diagnostics = gn.step()
    direction = _move(model, before) / diagnostics["alpha"]
    ls_batches = source.drawn[3:]
    assert len(ls_batches) == 2

    def true_loss(alpha):
        point = unflatten(flatten(before) + alpha * direction, before)
        return sum(MSE().value(torch.func.functional_call(model, point, (bx,)), by) for bx, by in ls_batches).item() / 2

    losses = {alpha: true_loss(alpha) for alpha in LINE_SEARCH}
    assert diagnostics["alpha"] == min(losses, key=losses.get)
    assert diagnostics["loss"] == pytest.approx(min(losses.values()), rel=1e-12)
    assert diagnostics["loss_before"] == pytest.approx(true_loss(0.0), rel=1e-12)
    assert diagnostics["loss"] < diagnostics["loss_before"]
    assert diagnostics["delta_norm"] == pytest.approx(diagnostics["alpha"] * diagnostics["direction_norm"])
    # Cost accounting, full GN with a first-order solver: inner (1 fwd, 1 tangent, 1 bwd) per batch; line
    # search per batch 1 forward with tangent + 1 forward per α.
    passes = (diagnostics["forward_passes"], diagnostics["tangent_passes"], diagnostics["backward_passes"])
    assert passes == (3 + 2 * 6, 3 + 2, 3)
    assert diagnostics["tokens"] == 5 * 20 * 2
    # FLOP model by default: forward 1/3, tangent 2/3, backward 2/3 of a gradient step
    assert diagnostics["grad_equivalents"] == pytest.approx(15 / 3 + 5 * 2 / 3 + 3 * 2 / 3)

    # A wildly overshooting inner step increases the loss at every α: rejected, parameters unchanged.
    overshoot = GaussNewton(
        model,
        source,
        solver="sgd",
        solver_options={"momentum": 0.0},
        inner_steps=1,
        inner_lr=100.0,
        grad_clip=None,
        loss=MSE(),
    )
    now = params_of(model)
    diagnostics = overshoot.step()
    assert diagnostics["rejected"] == 1 and diagnostics["reason"] == "no_decrease" and diagnostics["alpha"] == 0.0
    assert diagnostics["loss"] == diagnostics["loss_before"] and diagnostics["actual_reduction"] < 0
    assert diagnostics["delta_norm"] == 0.0
    assert all(torch.equal(now[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("objective", ["gn", "prox_linear"])
def test_line_search_predicts_each_alpha_with_the_model_of_each_batch(objective):
    # GN: the quadratic ℓ(z) + gᵀ(αJd) + ½(αJd)ᵀH(αJd); prox-linear: ℓ(z + αJd); averaged over the batches
    model = oracles.small_transformer(dtype=F64)
    sampler = _token_sampler()
    batches = [sampler(), sampler()]
    anchor = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    direction = {n: 0.05 * torch.randn(p.shape, generator=g, dtype=F64) for n, p in anchor.items()}
    for alpha in LINE_SEARCH:
        gn = GaussNewton(model, sampler, objective=objective, line_search=[alpha], line_search_accept="argmin")
        out = gn._line_search(anchor, direction, batches, PassCount())
        expected_before, expected_model = 0.0, 0.0
        for inputs, targets in batches:
            z, jd = curvature.outputs_and_jvp(model, anchor, inputs, direction)
            loss = CrossEntropy()
            at = loss.quadratic(z, targets, alpha * jd)[0] if objective == "gn" else loss.value(z + alpha * jd, targets)
            expected_before += loss.value(z, targets).item() / 2
            expected_model += at.item() / 2
        assert out["alpha"] == alpha
        assert out["loss_before"] == pytest.approx(expected_before, rel=1e-12)
        assert out["predicted_reduction"] == pytest.approx(expected_before - expected_model, rel=1e-9)


@pytest.mark.parametrize(
    "options, reads",
    [
        ({}, 4),  # the first and last inner steps, the direction's finiteness and norm, the line search
        ({"solver": "adamw"}, 4),
        ({"objective": "prox_linear", "ema": 0.1}, 4),
        ({"blocks": "per_layer"}, 6),  # and the anchor loss of the first and last inner steps' batches
    ],
)
def test_an_outer_step_reads_the_device_a_fixed_few_times(options, reads, host_reads):
    # whatever the inner steps, the line-search grid and its batches: no host sync per inner step or per α
    counted = []
    for inner_steps, line_search, batches in ((2, LINE_SEARCH, 1), (6, LINE_SEARCH[:2], 3)):
        gn = GaussNewton(
            oracles.small_transformer(),
            _token_sampler(),
            inner_steps=inner_steps,
            line_search=line_search,
            line_search_batches=batches,
            **options,
        )
        gn.step()  # the inner optimizers' state is created
        with host_reads() as host:
            diagnostics = gn.step()
        assert diagnostics["reason"] in (None, "no_decrease")
        counted.append(host.count)
    assert counted == [reads, reads]


def test_ema_of_outer_iterates_is_returned_for_evaluation():
    x, y = _regression(seed=9)
    model = _linear()
    gn = GaussNewton(model, _fixed((x, y)), solver="sgd", inner_steps=2, ema=0.75, loss=MSE())
    assert GaussNewton(model, _fixed((x, y)), loss=MSE()).eval_parameters() is None
    theta0 = params_of(model)
    gn.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(gn.eval_parameters()[name], 0.75 * theta0[name] + 0.25 * p.detach())


# --------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("options", [dict(solver="muon", ema=0.9, blocks="per_layer"), dict(solver="cg", cg_iters=3)])
def test_state_dict_round_trip_continues_identically(options):
    def setup():
        model = oracles.small_transformer(seed=4)
        sampler = _token_sampler(seed=5)
        return model, sampler, GaussNewton(model, sampler, inner_steps=2, line_search_batches=1, **options)

    model, sampler, gn = setup()
    straight = [gn.step() for _ in range(4)]
    reference = params_of(model)

    model, sampler, gn = setup()
    for _ in range(2):
        gn.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": gn.state_dict(), "sampler": sampler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, sampler, gn = setup()
    model.load_state_dict(saved["model"])
    gn.load_state_dict(saved["optimizer"])
    sampler.load_state_dict(saved["sampler"])
    resumed = [gn.step() for _ in range(2)]
    assert resumed == straight[2:]
    assert all(torch.equal(reference[n], p) for n, p in model.named_parameters())
    if options.get("ema"):
        assert gn.state_dict()["ema"] is not None


def test_load_state_dict_rejects_another_partition():
    model = mlp([3, 4, 2]).to(F64)
    full = GaussNewton(model, _fixed(_regression()), loss=MSE())
    layerwise = GaussNewton(model, _fixed(_regression()), blocks="per_layer", loss=MSE())
    with pytest.raises(ValueError, match="blocks"):
        layerwise.load_state_dict(full.state_dict())


# --------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, parameter",
    [
        (dict(solver="lbfgs"), "solver"),
        (dict(objective="newton"), "objective"),
        (dict(inner_steps=0), "inner_steps"),
        (dict(inner_lr=-1.0), "inner_lr"),
        (dict(inner_schedule="linear"), "inner_schedule"),
        (dict(blocks={}), "partition"),
        (dict(blocks="per_head"), "blocks"),
        (dict(line_search=()), "line_search"),
        (dict(line_search=(1.0, 0.0)), "line_search"),
        (dict(line_search=(1.0, 1.0)), "line_search"),
        (dict(line_search_batches=0), "line_search_batches"),
        (dict(layerwise_slots=0), "layerwise_slots"),
        (dict(ema=1.0), "ema"),
        (dict(damping=1.0), "damping"),
        (dict(solver="cg", damping=-1.0), "damping"),
        (dict(solver="cg", objective="prox_linear"), "objective"),
        (dict(grad_clip=0.0), "grad_clip"),
        (dict(solver="cg", prox=0.1), "prox"),
        (dict(prox=float("nan")), "prox"),
        (dict(solver_options={"lr": 1.0}), "solver_options"),
        (dict(solver="adamw", solver_options={"momentum": 0.9}), "momentum"),
        (dict(pass_costs={"forward": 1.0}), "pass_costs"),
        (dict(cg_iters=0), "cg_iters"),
    ],
)
def test_bad_options_raise_naming_the_parameter(options, parameter):
    with pytest.raises(ValueError, match=parameter):
        GaussNewton(_linear(), _fixed(_regression()), **options)


def test_make_gauss_newton_builds_each_variant():
    model = oracles.small_transformer()
    sampler = _token_sampler()
    built = {name: make_gauss_newton(name, model, sampler, lr=0.02) for name in GN_VARIANTS}
    assert built["gn"].objective == "gn" and [g["block"] for g in built["gn"].param_groups] == ["full"]
    assert built["gn_prox"].objective == "prox_linear"
    assert [g["block"] for g in built["gn_layerwise"].param_groups] == ["embed", "block0", "head"]
    assert built["gn_cg"].solver == "cg" and built["gn_cg"].param_groups[0]["lr"] == 0.02
    assert all(g["lr"] == 0.02 for g in built["gn_layerwise"].param_groups)
    with pytest.raises(ValueError, match="name"):
        make_gauss_newton("gn_full", model, sampler, lr=0.01)
    with pytest.raises(ValueError, match="unknown option"):
        make_gauss_newton("gn", model, sampler, lr=0.01, inner_iters=3)
    with pytest.raises(ValueError, match="fixes"):
        make_gauss_newton("gn_cg", model, sampler, lr=0.01, solver="muon")


# --------------------------------------------------------------------------------------------- training


def test_train_drives_gauss_newton_on_a_tiny_transformer():
    model = oracles.small_transformer(seed=6)
    sampler = _token_sampler(seed=7)
    val = [_token_sampler(seed=100 + i)() for i in range(2)]
    gn = make_gauss_newton("gn", model, sampler, lr=0.02, inner_steps=3, line_search_batches=1)
    history = train(model, gn, sampler, val, TrainSettings(steps=3, eval_every=1, progress=False))
    rows = history.rows
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert {"q_start", "q_end", "alpha", "rho", "rejected", "grad_equivalents", "forward_passes"} <= set(rows[-1])
    assert rows[-1]["tokens"] == 3 * (3 + 1) * 4 * 16
    assert all(r["train_loss"] is not None for r in rows[1:])


def test_a_nonfinite_middle_inner_step_is_caught_at_the_last_and_the_next_step_starts_clean():
    """The inner loop reads its device-side finiteness flag at the first and last inner step only."""
    x, y = _regression(seed=7)
    model = _linear()
    before = params_of(model)
    gn = GaussNewton(model, _Poisoned((x, y), bad=1), solver="sgd", inner_steps=3, loss=MSE())
    diagnostics = gn.step()
    assert diagnostics["rejected"] == 1 and diagnostics["reason"] == "nonfinite"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.isfinite(t).all() for block in gn._blocks.values() for t in block.delta.values())
    diagnostics = gn.step()
    assert diagnostics["rejected"] == 0 and diagnostics["loss"] < diagnostics["loss_before"]


def test_the_inner_muon_orthogonalizes_in_float32_and_a_bad_ns_dtype_is_named():
    """GN's inner Muon runs Newton-Schulz in float32 (as optax); ns_dtype takes bfloat16 or float32 only."""
    x, y = _regression(seed=3)
    model = mlp([x.shape[1], 8, y.shape[1]]).to(x.dtype)
    gn = GaussNewton(model, lambda: (x, y), solver="muon", inner_steps=1, loss=MSE())
    gn.step()
    groups = [g for b in gn._blocks.values() for g in b.optimizer.param_groups if "ns_dtype" in g]
    assert groups and {g["ns_dtype"] for g in groups} == {"float32"}
    with pytest.raises(ValueError, match=r"ns_dtype.*'bfloat16', 'float32'"):
        GaussNewton(model, lambda: (x, y), solver="muon", solver_options={"ns_dtype": "float16"})


@pytest.mark.parametrize("kind", ["transformer", "transformer_slots", "mlp"])
def test_layerwise_pass_counts(kind):
    """Layerwise GN's passes: per inner step one forward per ``slots`` blocks, and a tangent and a backward per block.

    The transformer's per-block tangents and backwards run through part of the model and count as their
    share of a whole pass's FLOPs (fewer than one each per block); a model without its own forward-mode
    rules counts them whole and adds the backward that records Jᵀw. Line search per batch: a forward
    carrying the direction, then one forward per α.
    """
    slots = 2 if kind == "transformer_slots" else None
    if kind.startswith("transformer"):
        model, batches, loss = oracles.small_transformer(), _token_sampler(), CrossEntropy()
    else:
        model, batches, loss = mlp([3, 4, 2]).to(F64), _fixed(_regression()), MSE()
    gn = GaussNewton(model, batches, blocks="per_layer", inner_steps=3, loss=loss, layerwise_slots=slots)
    blocks = [block.names for block in gn._blocks.values()]
    inputs = (_token_sampler() if kind.startswith("transformer") else batches)()[0]  # the batches' shape
    diagnostics = gn.step()
    passes = (diagnostics["forward_passes"], diagnostics["tangent_passes"], diagnostics["backward_passes"])
    line_search = (2 * (1 + len(LINE_SEARCH)), 2, 0)
    forwards = 1 if slots is None else -(-len(blocks) // slots)  # one forward per `slots` blocks
    per_step = layerwise_pass_counts(model, blocks, inputs, slots)
    if kind == "mlp":
        assert per_step == (1, len(blocks), len(blocks) + 1)
    else:
        assert per_step[0] == forwards and 1 < per_step[1] < len(blocks) and 1 < per_step[2] < len(blocks)
    inner = tuple(3 * n for n in per_step)
    anchor_losses = (2, 0, 0)  # layerwise: the loss at the anchor on the first and last inner batches
    assert passes == pytest.approx(tuple(a + b + c for a, b, c in zip(inner, line_search, anchor_losses)))

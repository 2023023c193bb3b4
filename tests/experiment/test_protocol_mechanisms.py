"""The mechanisms the reference protocol needs, each against a hand-computed expectation.

Argmin line search on N fresh batches, per-group weight decay and clipping of the inner solver, Muon's
bias-corrected Nesterov momentum, EMA evaluation with the raw loss beside it, baseline clipping, Muon's
AdamW part at Muon's LR and the reference's evaluation schedule.
"""

from __future__ import annotations

import math

import oracles
import pytest
import torch

from gnlib.experiment.protocols import paper_eval_schedule
from gnlib.experiment.runs import summarize
from gnlib.experiment.train import TrainSettings, evaluate, train
from gnlib.losses import MSE, CrossEntropy
from gnlib.models import linear_model
from gnlib.optim import make_optimizer
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.optim.gn_options import line_search_grid
from gnlib.optim.muon import Muon
from gnlib.params import flatten, params_of, unflatten

F64 = torch.float64


class _Replay:
    """Returns ``batches`` in order (cycling) and counts the draws."""

    def __init__(self, batches):
        self.batches, self.draws = list(batches), 0

    def __call__(self):
        batch = self.batches[self.draws % len(self.batches)]
        self.draws += 1
        return batch


def _linear_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = linear_model(3, 2, seed=seed).to(F64)
    x = torch.randn(20, 3, generator=g, dtype=F64)
    y_inner = torch.randn(20, 2, generator=g, dtype=F64)
    with torch.no_grad():
        y_here = model(x)  # the anchor fits these targets exactly: every α > 0 raises their loss
    return model, x, y_inner, y_here


def _mse_gradient(model, x, y):
    params = params_of(model)
    return flatten(oracles.loss_gradient(model, params, (x, y), MSE().value))


# ------------------------------------------------------------------------------------------ line search


def test_line_search_grid_is_two_to_minus_half_i():
    assert line_search_grid(5) == pytest.approx([1.0, 2**-0.5, 0.5, 2**-1.5, 0.25], rel=1e-15)
    assert line_search_grid(10) == pytest.approx([2 ** (-i / 2) for i in range(10)], rel=1e-15)
    with pytest.raises(ValueError, match="n=0"):
        line_search_grid(0)


@pytest.mark.parametrize("accept", ["argmin", "decrease"])
def test_argmin_line_search_takes_the_best_alpha_even_when_every_alpha_raises_the_loss(accept):
    n = 3
    model, x, y_inner, y_here = _linear_problem()
    before = flatten(params_of(model)).clone()
    gradient = _mse_gradient(model, x, y_inner)
    source = _Replay([(x, y_inner)] * n + [(x, y_here)] * n)  # N inner batches, then N line-search batches
    gn = GaussNewton(
        model,
        source,
        solver="sgd",
        solver_options={"momentum": 0.0},
        inner_steps=n,
        inner_lr=0.1,
        inner_schedule="constant",
        grad_clip=None,
        warm_start=False,
        line_search=line_search_grid(5),
        line_search_batches=None,
        line_search_accept=accept,
        loss=MSE(),
    )
    diagnostics = gn.step()
    assert source.draws == 2 * n  # N inner + N line-search batches, each evaluated at every α
    assert diagnostics["tokens"] == 2 * n * y_here.numel()
    # GN on a linear model with MSE is exact: N SGD steps of lr η on the same quadratic, d = -(I - (I - ηH)^N) H^-1 g
    like = params_of(model)
    hessian = oracles.dense_hessian(model, unflatten(before, like), (x, y_inner), MSE().value)
    step = torch.zeros_like(before)
    for _ in range(n):
        step = step - 0.1 * (gradient + hessian @ step)
    after = flatten(params_of(model))
    if accept == "argmin":  # L(α) = L(0) + α²·c on the line-search batches: the smallest α wins
        assert diagnostics["alpha"] == 0.25 and diagnostics["rejected"] == 0 and diagnostics["reason"] is None
        torch.testing.assert_close(after, before + 0.25 * step, rtol=0, atol=1e-12)
        assert diagnostics["loss"] > diagnostics["loss_before"]
    else:
        assert diagnostics["alpha"] == 0.0 and diagnostics["reason"] == "no_decrease"
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_line_search_batches_none_means_inner_steps():
    model, x, y, _ = _linear_problem()
    gn = GaussNewton(model, _Replay([(x, y)]), solver="sgd", inner_steps=7, line_search_batches=None, loss=MSE())
    assert gn.line_search_batches == 7
    with pytest.raises(ValueError, match="line_search_accept='always'.*'decrease', 'argmin'"):
        GaussNewton(model, _Replay([(x, y)]), line_search_accept="always", loss=MSE())


# --------------------------------------------------------------------------------- inner groups


def _tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _one_inner_step(model, batch, **options):
    """Δ of one cold inner step (α = 1, no line search), the model restored."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gn = GaussNewton(
        model, _Replay([batch]), inner_steps=1, inner_schedule="constant", line_search=None, warm_start=False, **options
    )
    gn.step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    return delta


def test_weight_decay_except_muon_decays_the_adamw_part_and_gains_only():
    model, batch = oracles.small_transformer(dtype=F64), _tokens()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.01, 0.5
    common = dict(solver="muon", inner_lr=lr, grad_clip=None)
    plain = _one_inner_step(model, batch, **common)
    decayed = _one_inner_step(model, batch, weight_decay=wd, weight_decay_scope="except_muon", **common)
    everywhere = _one_inner_step(model, batch, weight_decay=wd, **common)
    muon_matrices = {n for n, t in theta.items() if t.dim() == 2 and n not in ("embed.weight", "head.weight")}
    assert muon_matrices and len(muon_matrices) < len(theta)
    for name, t in theta.items():
        # Adam's and Muon's updates do not depend on the parameter: the decay adds -lr·wd·(θ_t + Δ), Δ = 0
        expected = torch.zeros_like(t) if name in muon_matrices else -lr * wd * t
        torch.testing.assert_close(decayed[name] - plain[name], expected, rtol=0, atol=1e-14)
        torch.testing.assert_close(everywhere[name] - plain[name], -lr * wd * t, rtol=0, atol=1e-14)


@pytest.mark.parametrize("per", ["block", "group"])
def test_inner_gradient_is_clipped_per_block_or_per_group(per):
    model, batch = oracles.small_transformer(dtype=F64), _tokens()
    params = params_of(model)
    gradient = oracles.loss_gradient(model, params, batch, CrossEntropy().value)
    lr, clip = 0.1, 1e-3
    delta = _one_inner_step(
        model, batch, solver="sgd", solver_options={"momentum": 0.0}, inner_lr=lr, grad_clip=clip, grad_clip_per=per
    )
    head = ["embed.weight", "head.weight"]
    groups = [list(gradient)] if per == "block" else [head, [n for n in gradient if n not in head]]
    for names in groups:
        norm = torch.linalg.vector_norm(torch.stack([gradient[n].norm() for n in names]))
        assert norm > clip
        for n in names:  # clip_grad_norm_: g · max_norm / (‖g_group‖ + 1e-6)
            torch.testing.assert_close(delta[n], -lr * gradient[n] * clip / (norm + 1e-6), rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------------- Muon momentum


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_bias_correction_follows_optax(nesterov, monkeypatch):
    # Newton-Schulz (torch's, in bfloat16) replaced by the identity: the step is then -lr·scale·U_t exactly
    monkeypatch.setattr("gnlib.optim.muon._zeropower_via_newtonschulz", lambda update, *_: update)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g, dtype=F64) for _ in range(3)]
    w = torch.randn(4, 3, generator=g, dtype=F64)
    mu, lr = 0.95, 0.1
    corrected = Muon(
        [w.clone().requires_grad_()],
        lr=lr,
        momentum=mu,
        nesterov=nesterov,
        weight_decay=0.0,
        bias_correction=True,
        adjust_lr_fn="original",
    )
    param = corrected.param_groups[0]["params"][0]
    expected, buf = w.clone(), torch.zeros_like(w)
    for t, grad in enumerate(grads, start=1):
        param.grad = grad.clone()
        corrected.step()
        buf = mu * buf + (1 - mu) * grad
        # optax: Nesterov μ·B_t/(1 − μ^(t+1)) + (1 − μ)·g_t/(1 − μ^t); plain B_t/(1 − μ^t)
        update = mu * buf / (1 - mu ** (t + 1)) + (1 - mu) * grad / (1 - mu**t) if nesterov else buf / (1 - mu**t)
        expected = expected - lr * math.sqrt(4 / 3) * update  # shape scaling sqrt(max(1, rows/cols))
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-13)


def test_muon_without_bias_correction_is_torch_muon():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, generator=g)
    ours = Muon([w.clone().requires_grad_()], lr=0.05, weight_decay=0.01, bias_correction=False)
    torch_muon = torch.optim.Muon([w.clone().requires_grad_()], lr=0.05, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(5, 3, generator=g)
        for opt in (ours, torch_muon):
            opt.param_groups[0]["params"][0].grad = grad.clone()
            opt.step()
    assert torch.equal(ours.param_groups[0]["params"][0], torch_muon.param_groups[0]["params"][0])


# ------------------------------------------------------------------------------------------ EMA


def test_ema_evaluation_reports_ema_and_raw_val_loss():
    model, x, y, _ = _linear_problem()
    val = [(x[:10], y[:10]), (x[10:], y[10:])]
    beta = 0.5
    gn = GaussNewton(model, _Replay([(x, y)]), solver="sgd", inner_steps=1, line_search=None, ema=beta, loss=MSE())
    iterates = [flatten(params_of(model)).clone()]

    class Recorder:
        draws_batches = True

        def step(self):
            out = gn.step()
            iterates.append(flatten(params_of(model)).clone())
            return out

        def eval_parameters(self):
            return gn.eval_parameters()

    history = train(
        model, Recorder(), None, val, TrainSettings(steps=2, eval_every=1, loss_fn=MSE().value, progress=False)
    )
    ema = iterates[0]
    for step, row in enumerate(history.rows):
        if step:  # torch.optim.swa_utils EMA, started at θ_0: ema ← β·ema + (1 − β)·θ_t
            ema = beta * ema + (1 - beta) * iterates[step]
        like = params_of(model)
        at_ema = evaluate(model, val, MSE().value, unflatten(ema, like))
        at_raw = evaluate(model, val, MSE().value, unflatten(iterates[step], like))
        assert row["val_loss"] == pytest.approx(at_ema, rel=1e-12)
        assert row["val_loss_raw"] == pytest.approx(at_raw, rel=1e-12)
    assert history.rows[-1]["val_loss"] != pytest.approx(history.rows[-1]["val_loss_raw"])


def test_a_run_on_an_ema_stops_at_its_target_once_the_ema_and_the_raw_iterate_both_reached_it():
    """Here the EMA gets below the target at step 2, the raw iterate at step 4: the run stops at 4."""
    model = linear_model(1, 1, bias=False)
    x, y = torch.ones(4, 1), torch.zeros(4, 1)
    raw, ema = [2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.2], [2.0, 1.0, 0.4, 0.3, 0.2, 0.1, 0.1]  # the weight, step by step

    class Scripted:
        """Moves the weight along ``raw`` and evaluates on ``ema``."""

        draws_batches, step_count = True, 0

        def step(self):
            self.step_count += 1
            with torch.no_grad():
                model.weight.fill_(raw[self.step_count])
            return {}

        def eval_parameters(self):
            return {"weight": torch.full((1, 1), ema[self.step_count])}

    with torch.no_grad():
        model.weight.fill_(raw[0])
    target = MSE().value(torch.full((4, 1), 0.6), y).item()
    history = train(
        model,
        Scripted(),
        None,
        [(x, y)],
        TrainSettings(steps=6, eval_every=1, loss_fn=MSE().value, target_loss=target, progress=False),
    )
    assert history.status == "reached_target" and history.rows[-1]["step"] == 4
    row = summarize(history, target)
    assert (row["steps_to_target"], row["steps_to_target_raw"]) == (2, 4)


# ------------------------------------------------------------------------------------------ baselines


def test_baseline_grad_clip_is_global_muon_and_soap_clip_per_chain():
    model = oracles.small_transformer(dtype=F64)
    batch = _tokens()
    for name in ("adamw", "soap", "sgd", "muon"):
        opt = make_optimizer(name, model, lr=0.0, grad_clip=1e-3)
        opt.zero_grad()
        CrossEntropy().value(model(batch[0]), batch[1]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        head = ["embed.weight", "head.weight"]
        matrices = [n for n in grads if grads[n].dim() >= 2]
        apart = {"muon": head, "soap": matrices}.get(name)  # the reference's two chains, each clipped alone
        groups = [apart, [n for n in grads if n not in apart]] if apart else [list(grads)]
        for names in groups:
            norm = torch.linalg.vector_norm(torch.stack([grads[n].norm() for n in names]))
            assert norm > 1e-3
            for n in names:
                p = dict(model.named_parameters())[n]
                torch.testing.assert_close(p.grad, grads[n] * 1e-3 / (norm + 1e-6), rtol=1e-12, atol=0)


def test_muon_adamw_lr_none_is_muons_lr():
    opt = make_optimizer("muon", oracles.small_transformer(dtype=F64), lr=0.07, adamw_lr=None)
    assert {group["optimizer"]: group["lr"] for group in opt.param_groups} == {"muon": 0.07, "adamw": 0.07}
    with pytest.raises(ValueError, match="grad_clip=-1"):
        make_optimizer("adamw", oracles.small_transformer(dtype=F64), grad_clip=-1)


# ------------------------------------------------------------------------------------------ evaluation


def test_paper_eval_schedule_after_updates_1_11_21_then_every_update():
    due = [step for step in range(1, 41) if paper_eval_schedule(40)(step)]
    assert due == [1, 11, 21, *range(22, 41)]  # loop index i = step - 1: i % 10 == 0 while i <= 20, then i > 20
    assert [s for s in range(1, 8) if paper_eval_schedule(7, every=2)(s)] == [1, 3, 5, 6, 7]

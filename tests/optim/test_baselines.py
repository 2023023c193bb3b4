"""Baseline optimizers (AdamW, Muon + AdamW, SOAP, SGD), the parameter split and the LR schedules."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from gnlib.models import build_model, mlp
from gnlib.optim import (
    DEFAULTS,
    CompositeOptimizer,
    constant,
    cosine_decay,
    make_optimizer,
    make_schedule,
    split_params,
    warmup_cosine,
    warmup_stable_decay,
)

OPTIMIZERS = ["adamw", "muon", "soap", "sgd"]
HIDDEN = ["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down"]


def _tokens(seed: int = 0, batch: int = 2, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _train(model, opt, batches) -> list[float]:
    losses = []
    for inputs, targets in batches:
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------------------------- AdamW


def test_adamw_matches_the_closed_form_update():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.95, 1e-8, 0.1
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64)
    g2 = torch.tensor([-0.2, 0.1, 1.0], dtype=torch.float64)
    # Step 1: m1 = (1-b1) g1, v1 = (1-b2) g1²; bias-corrected m̂ = g1, v̂ = g1², so
    # p1 = p0 (1 - lr wd) - lr g1 / (|g1| + eps).
    p1 = p0 * (1 - lr * wd) - lr * g1 / (g1.abs() + eps)
    # Step 2: m2 = b1 m1 + (1-b1) g2, v2 = b2 v1 + (1-b2) g2², m̂ = m2/(1-b1²), v̂ = v2/(1-b2²).
    m2 = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v2 = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    p2 = p1 * (1 - lr * wd) - lr * (m2 / (1 - b1**2)) / ((v2 / (1 - b2**2)).sqrt() + eps)

    p = p0.clone().requires_grad_()
    opt = make_optimizer("adamw", {"p": p}, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g, expected in ((g1, p1), (g2, p2)):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_group_has_lr_and_initial_lr_from_the_defaults(name):
    opt = make_optimizer(name, build_model("tiny"))
    assert opt.param_groups
    for group in opt.param_groups:
        assert group["initial_lr"] == group["lr"]
    expected = DEFAULTS[name]["adamw_lr" if name == "muon" else "lr"]
    assert opt.param_groups[-1]["lr"] == expected


# ---------------------------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_muon_gets_exactly_the_hidden_matrices(tie_embeddings):
    model = build_model("tiny", tie_embeddings=tie_embeddings)
    n_layers = model.config.n_layers
    hidden = [f"blocks.{i}.{m}.weight" for i in range(n_layers) for m in HIDDEN]
    rest = ["embed.weight"] + [f"blocks.{i}.{n}_norm.weight" for i in range(n_layers) for n in ("attn", "mlp")]
    rest += ["norm.weight"] + ([] if tie_embeddings else ["head.weight"])

    matrices, others = split_params(model.named_parameters())
    assert sorted(matrices) == sorted(hidden) and sorted(others) == sorted(rest)

    opt = make_optimizer("muon", model)
    assert isinstance(opt, CompositeOptimizer)
    tags = {g["optimizer"]: g for g in opt.param_groups}
    assert set(tags) == {"muon", "adamw"} and len(opt.param_groups) == 2
    assert sorted(tags["muon"]["param_names"]) == sorted(hidden)
    assert sorted(tags["adamw"]["param_names"]) == sorted(rest)
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    assert tags["muon"]["lr"] == 0.02 and tags["muon"]["nesterov"] and tags["muon"]["weight_decay"] == 0.0
    assert tags["muon"]["adjust_lr_fn"] == "original" and tags["muon"]["ns_steps"] == 5


def test_split_of_a_plain_network_uses_adamw_params():
    model = mlp([4, 8, 3])  # 0.weight (8,4), 0.bias, 2.weight (3,8), 2.bias
    assert split_params(model.named_parameters()) == (["0.weight", "2.weight"], ["0.bias", "2.bias"])
    assert split_params(dict(model.named_parameters()), ["2.weight"]) == (
        ["0.weight"],
        ["0.bias", "2.weight", "2.bias"],
    )
    opt = make_optimizer("muon", model, adamw_params=["2.weight"])
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight"], ["0.bias", "2.weight", "2.bias"]]
    with pytest.raises(
        ValueError, match=re.escape("adamw_params=['3.weight'] is invalid; allowed: names of the model's tensors")
    ):
        split_params(model.named_parameters(), ["3.weight"])


# Newton-Schulz band. torch's Muon normalizes G by its Frobenius norm and applies the quintic
# p(x) = a x + b x³ + c x⁵, (a, b, c) = (3.4445, -4.7750, 2.0315), five times; as an odd matrix
# polynomial it maps each singular value σ of G to p⁵(σ / ‖G‖_F). On [0, 1], p peaks at p(0.5545) =
# 1.2024 and on [0.68, 1.21] it dips to p(1.0501) = 0.6818, so [0.6818, 1.2024] is invariant and one
# more step lands in [0.6818, 1.1344]. Scanning p⁵: every σ/‖G‖_F >= 0.0055 ends in [0.6818, 1.1344]
# (every σ/‖G‖_F >= 0.002 in [0.6818, 1.2024]). The iteration runs in bfloat16 (unit roundoff
# 2^-8 ≈ 0.0039); BF16_TOL = 0.04 (about ten roundoffs over five iterations) bounds its error.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_BAND = (0.6818, 1.1344)
BF16_TOL = 0.04


def _quintic_five_times(x: torch.Tensor) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    return x


def test_newton_schulz_band_of_the_quintic():
    x = torch.linspace(0.0055, 1.0, 200_001, dtype=torch.float64)
    y = _quintic_five_times(x)
    assert NS_BAND[0] - 1e-4 <= y.min() and y.max() <= NS_BAND[1] + 1e-4


@pytest.mark.parametrize("ns_dtype, tol", [("bfloat16", BF16_TOL), ("float32", 1e-5)])
@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (128, 32)])
def test_muon_update_is_orthogonalized_within_the_band(shape, ns_dtype, tol):
    """Singular values of the step = the quintic applied 5 times to G's (float64), to bfloat16 or float32 rounding."""
    w = torch.zeros(shape, requires_grad=True)
    opt = make_optimizer("muon", {"w": w}, lr=1.0, ns_dtype=ns_dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w.grad = g.clone()
    opt.step()
    # From zero momentum, Nesterov gives (1-μ²) g; NS is scale-free; the step is lr · sqrt(max(1, rows/cols)) · O.
    update = -w.detach().double() / math.sqrt(max(1.0, shape[0] / shape[1]))
    sigma = torch.linalg.svdvals(update)
    sigma_g = torch.linalg.svdvals(g.double())
    assert sigma_g.min() / g.double().norm() >= 0.0055, "the test matrix must lie in the band's domain"
    expected = _quintic_five_times(sigma_g / g.double().norm()).sort(descending=True).values
    torch.testing.assert_close(sigma, expected, rtol=0, atol=tol)
    assert NS_BAND[0] - tol <= sigma.min() and sigma.max() <= NS_BAND[1] + tol


def test_muon_orthogonalizes_matrices_of_every_shape_alone_when_it_batches_them():
    """float32 Newton-Schulz batches matrices of one oriented shape; each step is still U p⁵(Σ/‖G‖_F) Vᵀ of its own G.

    In float64 (kept: wider than float32) the only error is rounding: tall (8, 4), wide (4, 8) and another
    tall (8, 4) share one batch, the square (6, 6) has its own.
    """
    shapes = {"tall": (8, 4), "wide": (4, 8), "tall_again": (8, 4), "square": (6, 6)}
    weights = {name: torch.zeros(shape, dtype=torch.float64, requires_grad=True) for name, shape in shapes.items()}
    opt = make_optimizer("muon", weights, lr=1.0, ns_dtype="float32")
    generator = torch.Generator().manual_seed(3)
    grads = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    for name, w in weights.items():
        w.grad = grads[name].clone()
    opt.step()
    for name, (rows, cols) in shapes.items():
        u, sigma, vh = torch.linalg.svd(grads[name], full_matrices=False)
        expected = u @ torch.diag(_quintic_five_times(sigma / grads[name].norm())) @ vh
        update = -weights[name].detach() / math.sqrt(max(1.0, rows / cols))
        torch.testing.assert_close(update, expected, rtol=0, atol=1e-12)


def test_muon_composite_equals_separate_muon_and_adamw():
    model, reference = build_model("tiny", seed=1), build_model("tiny", seed=1)
    opt = make_optimizer("muon", model, lr=0.03, adamw_lr=0.01, adamw_betas=(0.8, 0.9), adamw_weight_decay=0.05)
    named = dict(reference.named_parameters())
    matrices, others = split_params(named)
    muon = torch.optim.Muon([named[n] for n in matrices], lr=0.03, weight_decay=0.0, adjust_lr_fn="original")
    adamw = torch.optim.AdamW([named[n] for n in others], lr=0.01, betas=(0.8, 0.9), weight_decay=0.05)
    separate = CompositeOptimizer({"muon": muon, "adamw": adamw})
    for seed in range(3):
        _train(model, opt, [_tokens(seed)])
        _train(reference, separate, [_tokens(seed)])
    for n, p in model.named_parameters():
        assert torch.equal(p, named[n]), n


# ------------------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name):
    batches = [_tokens(seed) for seed in range(6)]
    hp = {"precondition_frequency": 2} if name == "soap" else {}
    model = build_model("tiny", seed=2)
    opt = make_optimizer(name, model, **hp)
    _train(model, opt, batches[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for group in opt.param_groups:
        group["lr"] = 0.5 * group["initial_lr"]
    expected = _train(model, opt, batches[3:])

    resumed = build_model("tiny", seed=99)
    resumed.load_state_dict(saved[0])
    opt2 = make_optimizer(name, resumed, **hp)
    opt2.load_state_dict(saved[1])
    for group in opt2.param_groups:
        group["lr"] = 0.5 * group["initial_lr"]
    assert _train(resumed, opt2, batches[3:]) == expected
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_the_training_loss(name):
    model = build_model("tiny", seed=0)
    losses = _train(model, make_optimizer(name, model), [_tokens(0)] * 30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0, f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_leaf_tensors_that_are_not_module_parameters():
    delta = {"w": torch.zeros(6, 4, requires_grad=True), "b": torch.zeros(4, requires_grad=True)}
    opt = make_optimizer("muon", delta)
    delta["w"].grad, delta["b"].grad = torch.ones(6, 4), torch.ones(4)
    opt.step()
    assert delta["w"].abs().sum() > 0 and delta["b"].abs().sum() > 0
    opt.zero_grad()
    assert delta["w"].grad is None and set(opt.state) == set(delta.values())


# ------------------------------------------------------------------------------------------- errors


def test_unknown_optimizer_names_the_allowed_ones():
    allowed = "one of ['adamw', 'muon', 'soap', 'sgd', 'shampoo', 'psgd']"
    with pytest.raises(ValueError, match=re.escape(f"name='adam' is invalid; allowed: {allowed}")):
        make_optimizer("adam", build_model("tiny"))


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("adamw", dict(lr=-1.0), "lr=-1.0 is invalid; allowed: a finite number >= 0"),
        (
            "adamw",
            dict(betas=(0.9, 1.0)),
            "betas=(0.9, 1.0) is invalid; allowed: a pair (beta1, beta2), each in [0, 1)",
        ),
        (
            "adamw",
            dict(momentum=0.9),
            "unknown option(s) ['momentum']; allowed: ['betas', 'eps', 'grad_clip', 'lr', 'weight_decay']",
        ),
        ("muon", dict(adjust_lr_fn="rms"), "adjust_lr_fn='rms' is invalid; allowed: 'original' or 'match_rms_adamw'"),
        ("muon", dict(momentum=1.0), "momentum=1.0 is invalid; allowed: a number in [0, 1)"),
        ("muon", dict(adamw_betas=(-0.1, 0.9)), "adamw_betas=(-0.1, 0.9) is invalid"),
        ("muon", dict(ns_steps=0), "ns_steps=0 is invalid; allowed: an integer in [1, 99]"),
        ("muon", dict(adamw_params="head.weight"), "adamw_params='head.weight' is invalid; allowed: None or a list"),
        (
            "soap",
            dict(betas=(0.95, 1.5)),
            "betas=(0.95, 1.5) is invalid; allowed: a pair (beta1, beta2), each in [0, 1)",
        ),
        ("soap", dict(precondition_freq=5), "unknown option(s) ['precondition_freq']"),
        ("sgd", dict(nesterov=True, momentum=0.0), "nesterov=True needs momentum > 0"),
        ("sgd", dict(lr=float("nan")), "lr=nan is invalid"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer(name, build_model("tiny"), **kwargs)


# ---------------------------------------------------------------------------------------- schedules


def test_warmup_cosine_endpoints():
    s = warmup_cosine(100, warmup_steps=10, final_fraction=0.1)
    assert s(0) == pytest.approx(1 / 11) and s(9) == pytest.approx(10 / 11) and s(10) == 1.0
    assert s(55) == pytest.approx(0.1 + 0.9 * 0.5) and s(100) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    values = [s(k) for k in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])) and 0.1 < s(99) < 0.11


def test_warmup_stable_decay_endpoints():
    s = warmup_stable_decay(100, warmup_steps=10, decay_fraction=0.2)
    assert s(0) == pytest.approx(1 / 11) and s(10) == 1.0 and s(80) == 1.0
    assert s(90) == pytest.approx(0.5) and s(99) == pytest.approx(1 / 20) and s(100) == 0.0


def test_cosine_decay_for_inner_loops():
    s = cosine_decay(10)
    assert s(0) == 1.0 and s(5) == pytest.approx(0.5) and s(10) == 0.0
    assert s(9) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi))) and s(9) < 0.03
    assert constant()(0) == constant()(10**6) == 1.0


def test_make_schedule_by_name_and_its_errors():
    assert make_schedule("warmup_cosine", 100, warmup_steps=10) == warmup_cosine(100, 10)
    assert make_schedule("constant", 100) == constant()
    assert make_schedule("cosine_decay", 7) == cosine_decay(7)
    allowed = "allowed: one of ['constant', 'cosine_decay', 'warmup_cosine', 'warmup_stable_decay']"
    with pytest.raises(ValueError, match=re.escape(f"schedule: name='linear' is invalid; {allowed}")):
        make_schedule("linear", 10)
    allowed = "allowed: ['warmup_steps', 'final_fraction']"
    with pytest.raises(ValueError, match=re.escape(f"unknown argument(s) ['warmup']; {allowed}")):
        make_schedule("warmup_cosine", 10, warmup=2)
    with pytest.raises(
        ValueError, match=re.escape("warmup_steps=10 is invalid; allowed: an integer in [0, total_steps=")
    ):
        warmup_cosine(10, warmup_steps=10)
    with pytest.raises(ValueError, match="exceed total_steps=10"):
        warmup_stable_decay(10, warmup_steps=9, decay_fraction=0.5)
    with pytest.raises(ValueError, match="step=-1 is invalid; allowed: an integer >= 0"):
        constant()(-1)

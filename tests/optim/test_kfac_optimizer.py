"""The K-FAC optimizer against dense float64 references: its factors, its step, least squares, resume."""

import dataclasses
import io

import pytest
import torch
from torch import nn

from gnlib.experiment.runs import RunSpec, run
from gnlib.losses import MSE, CrossEntropy
from gnlib.models import build_model
from gnlib.optim.kfac import kfac_factors
from gnlib.optim.kfac_optimizer import KFAC

F64 = torch.float64
TINY = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


def fixed_batches(n: int = 16, seed: int = 0, classes: bool = False):
    """One batch drawn again and again: regression targets, or class labels for cross-entropy."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (n,), generator=gen) if classes else torch.randn(n, 2, generator=gen, dtype=F64)
    return lambda: (x, y)


def test_one_step_is_the_explicit_inverse_of_the_damped_kronecker_factors():
    model, batches, lr, damping = mlp(), fixed_batches(), 0.5, 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = MSE()
    factors = kfac_factors(model, before, batches(), loss, fisher="exact")
    grads = torch.autograd.grad(loss.value(model(batches()[0]), batches()[1]), list(model.parameters()))
    grads = dict(zip(before, grads))
    KFAC(model, batches, lr=lr, damping=damping, fisher="exact", loss=loss).step()
    for weight, bias in (("0.weight", "0.bias"), ("2.weight", "2.bias")):
        a, b = factors[weight].input, factors[weight].output
        dense = torch.kron(b, a) + damping * torch.eye(a.shape[0] * b.shape[0], dtype=F64)  # row-major vec(W | b)
        g = torch.cat([grads[weight], grads[bias].unsqueeze(1)], dim=1).reshape(-1)
        expected = -lr * torch.linalg.solve(dense, g).reshape(b.shape[0], a.shape[0])
        moved = dict(model.named_parameters())
        torch.testing.assert_close(moved[weight] - before[weight], expected[:, :-1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(moved[bias] - before[bias], expected[:, -1], rtol=1e-10, atol=1e-12)


def test_factors_are_kfac_factors_of_the_first_micro_batch_then_an_ema():
    model = mlp()
    draws = [fixed_batches(seed=s, classes=True)() for s in range(4)]
    stream = iter(draws)
    opt = KFAC(model, lambda: next(stream), lr=0.1, micro_batches=2, factor_decay=0.75, mc_samples=3, seed=5)
    first = kfac_factors(model, dict(model.named_parameters()), draws[0], CrossEntropy(), mc_samples=3, seed=5)
    opt.step()
    for name, f in first.items():
        torch.testing.assert_close(opt.factors[name].input, f.input)
        torch.testing.assert_close(opt.factors[name].output, f.output)
    second = kfac_factors(model, dict(model.named_parameters()), draws[2], CrossEntropy(), mc_samples=3, seed=6)
    row = opt.step()
    for name in first:
        torch.testing.assert_close(opt.factors[name].input, 0.75 * first[name].input + 0.25 * second[name].input)
        torch.testing.assert_close(opt.factors[name].output, 0.75 * first[name].output + 0.25 * second[name].output)
    assert row["tokens"] == 2 * draws[0][0].numel() and row["grad_equivalents"] == 2 + 3


def test_least_squares_is_solved_in_one_step():
    """One linear layer under MSE: B ⊗ A is the exact Gauss-Newton matrix, so an undamped step is Newton's."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=gen, dtype=F64)
    y = x @ torch.randn(3, 2, generator=gen, dtype=F64) + 0.5
    KFAC(model, lambda: (x, y), lr=1.0, damping=0.0, fisher="exact", loss=MSE()).step()
    torch.testing.assert_close(model(x), y, rtol=1e-9, atol=1e-9)


def test_a_transformer_preconditions_its_linear_layers_and_gives_the_rest_to_adamw():
    model = build_model("tiny", seed=0, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    gen = torch.Generator().manual_seed(0)
    batches = lambda: (torch.randint(0, 256, (2, 8), generator=gen),) * 2  # noqa: E731
    opt = KFAC(model, batches, lr=0.05, max_factor_dim=64)
    assert "head.weight" not in opt.layers  # its output side is the 256-token vocabulary
    assert set(opt.adamw_names) == {"embed.weight", "head.weight"} | {
        n for n, p in model.named_parameters() if p.dim() == 1
    }
    before = [p.detach().clone() for p in model.parameters()]
    row = opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before)) and row["loss"] > 0


def test_a_restored_optimizer_continues_identically():
    def run(steps: int, restore_after: int | None = None) -> list[torch.Tensor]:
        model, stream = mlp(), fixed_batches(classes=True)
        opt = KFAC(model, stream, lr=0.2, inverse_every=2, factor_decay=0.5, seed=1)
        for step in range(steps):
            if step == restore_after:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                model = mlp(seed=9)
                model.load_state_dict(saved["model"])
                opt = KFAC(model, stream, lr=0.2, inverse_every=2, factor_decay=0.5, seed=1)
                opt.load_state_dict(saved["opt"])
            opt.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(5), run(5, restore_after=3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"damping": -1.0}, "optimizer 'kfac': damping=-1.0 is invalid; allowed: a finite number >= 0"),
        ({"factor_decay": 1.0}, "factor_decay=1.0 is invalid; allowed: a number in"),
        ({"fisher": "empirical"}, "fisher='empirical' is invalid; allowed: one of"),
        ({"inverse_every": 0}, "inverse_every=0 is invalid; allowed: an integer >= 1"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        KFAC(mlp(), fixed_batches(classes=True), **options)


def test_a_run_sets_kfacs_micro_batches_by_its_accumulation_and_refuses_them_as_an_option():
    spec = RunSpec(optimizer="kfac", lr=0.05, steps=2, batch_size=2, seq_len=8, accumulation=3, model_overrides=TINY)
    history = run(spec, progress=False)
    assert history.rows[-1]["tokens"] == 2 * 3 * 2 * 8 and spec.tokens_per_step == 3 * 2 * 8
    bad = dataclasses.replace(spec, hyperparameters={"micro_batches": 3})
    with pytest.raises(ValueError, match="optimizer 'kfac': micro_batches=3 is invalid; allowed: left unset"):
        bad.validate()

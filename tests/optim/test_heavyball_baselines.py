"""Shampoo and PSGD from heavyball: built by name, the Muon split, their state restored bit for bit."""

import io

import pytest
import torch

from gnlib.models import build_model
from gnlib.optim import make_optimizer
from gnlib.optim.registry import validate_options

MODEL = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def steps(model, optimizer, first: int, last: int) -> None:
    for step in range(first, last):
        inputs, targets = batch(step)
        logits = model(inputs)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", ["shampoo", "psgd"])
def test_hidden_matrices_get_heavyball_and_the_rest_adamw(name):
    model = build_model("tiny", seed=0, dtype=torch.float64, **MODEL)
    optimizer = make_optimizer(name, model, lr=1e-3)
    named = dict(model.named_parameters())
    by_group = {
        g["optimizer"]: {n for n, p in named.items() for q in g["params"] if p is q} for g in optimizer.param_groups
    }
    matrices = {n for n, p in named.items() if p.dim() == 2} - {"embed.weight", "head.weight"}
    assert by_group[name] == matrices and by_group["adamw"] == set(named) - matrices
    before = {n: p.detach().clone() for n, p in named.items()}
    steps(model, optimizer, 0, 2)  # float64 parameters: heavyball's state follows their dtype
    assert all(not torch.equal(before[n], p) for n, p in named.items())


@pytest.mark.parametrize("name", ["shampoo", "psgd"])
def test_a_restored_optimizer_continues_bit_for_bit(name):
    options = (
        dict(lr=1e-3, precondition_frequency=2)
        if name == "shampoo"
        else dict(lr=1e-3, preconditioner_update_probability=0.5)
    )

    def run(restore_at: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("tiny", seed=0, **MODEL)
        optimizer = make_optimizer(name, model, **options)
        if restore_at is None:
            steps(model, optimizer, 0, 5)
        else:
            steps(model, optimizer, 0, restore_at)
            buffer = io.BytesIO()
            torch.save(
                {"model": model.state_dict(), "opt": optimizer.state_dict(), "rng": torch.get_rng_state()}, buffer
            )
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)  # as the train loop's checkpoint reads it
            model = build_model("tiny", seed=1, **MODEL)
            model.load_state_dict(saved["model"])
            optimizer = make_optimizer(name, model, **options)
            optimizer.load_state_dict(saved["opt"])
            torch.set_rng_state(saved["rng"])
            steps(model, optimizer, restore_at, 5)
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(None), run(3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("shampoo", {"shampoo_beta": 1.0}, "optimizer 'shampoo': shampoo_beta=1.0 is invalid; allowed: a number in"),
        ("psgd", {"precond_lr": 0.0}, "optimizer 'psgd': precond_lr=0.0 is invalid; allowed: a finite number > 0"),
        ("psgd", {"preconditioner_update_probability": 1.5}, r"=1.5 is invalid; allowed: a number in \(0, 1\]"),
        ("psgd", {"momentum": 0.9}, r"optimizer 'psgd' got unknown option\(s\) \['momentum'\]"),
    ],
)
def test_bad_options_are_named_before_anything_is_built(name, options, match):
    with pytest.raises(ValueError, match=match):
        validate_options(name, 1e-3, options)

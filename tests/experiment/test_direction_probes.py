"""Directions read off a model or an optimizer: GN directions per partition, Adam's second moment."""

import numpy as np
import pytest
import torch

from gnlib.data import load_corpus
from gnlib.models import build_model
from gnlib.optim.direction_comparison import cosine
from gnlib.optim.directions import adam_direction, adam_second_moment, gn_directions

MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)


def test_gn_directions_share_anchor_and_batches():
    model = build_model("tiny", seed=0, **MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = load_corpus().fixed_batches("train", 4, 16, 3, seed=5)
    names = [n for n, _ in model.named_parameters()]
    d = gn_directions(model, batches, {"full": None, "one_block": {"all": names}, "per_layer": "per_layer"}, 0.01)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # model untouched
    for n in names:  # a partition with one block is full GN: same batches, same anchor, same numbers
        torch.testing.assert_close(d["one_block"][n], d["full"][n], rtol=0, atol=0)
    c = cosine(d["per_layer"], d["full"])
    assert 0 < c < 1 - 1e-6 and np.isfinite(c)


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_second_moment_by_hand(optimizer_class):
    model = torch.nn.Linear(3, 2)
    beta2, lr, eps = 0.95, 0.1, 1e-8
    optimizer = optimizer_class(model.parameters(), lr=lr, betas=(0.0, beta2), eps=eps, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    gradients = [{n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()} for _ in range(3)]
    with pytest.raises(ValueError, match="'weight'.*at least one step"):
        adam_second_moment(model, optimizer)
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for t, gradient in enumerate(gradients, start=1):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = gradient[n].clone()
            v[n] = beta2 * v[n] + (1 - beta2) * gradient[n] ** 2  # the EMA of squared gradients, by hand
        optimizer.step()
    moments = adam_second_moment(model, optimizer)
    assert list(moments) == ["weight", "bias"]
    for n in moments:
        torch.testing.assert_close(moments[n], v[n] / (1 - beta2**3), rtol=1e-6, atol=0)
    # with beta1 = 0, Adam's last update is lr times the momentum-free direction -g / (sqrt(v_hat) + eps)
    step = adam_direction(moments, gradients[-1], eps)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], lr * step[n], rtol=1e-5, atol=1e-7)

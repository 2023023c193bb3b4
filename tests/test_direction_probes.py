"""Direction probes: GN directions of several partitions from one anchor on the same inner batches."""

import numpy as np
import torch

from gnlib.data import load_corpus
from gnlib.directions import cosine, gn_directions
from gnlib.models import build_model

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


"""Probes that train: the directions of layerwise partitions against full GN's along a full-GN run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from gnlib.experiment.runs import GN_INNER_STEPS, RunSpec, build_run
from gnlib.experiment.train import evaluate
from gnlib.losses import CrossEntropy
from gnlib.optim.direction_comparison import cosine
from gnlib.optim.directions import gn_directions
from gnlib.params import flatten
from gnlib.runtime import check_choice, resolve_device


def direction_cosines(
    spec: RunSpec, partitions: Mapping[str, Any], at_steps: Sequence[int], *, probe_seed: int = 1234
) -> pd.DataFrame:
    """Cosine between each partition's GN direction and full GN's, at checkpoints of a full-GN run.

    Trains ``spec`` (a full-GN spec: optimizer ``"gn"``, ``inner_steps`` N) for ``max(at_steps)`` outer
    steps; at each step in ``at_steps`` (0 = the start), draws N probe batches (seeded by ``probe_seed`` and
    the step) and computes every direction with :func:`gn_directions` from that anchor on those batches.

    Returns:
        One row per checkpoint × partition: ``step``, ``partition``, ``cosine`` (with full GN's direction),
        ``norm_ratio`` (‖d_partition‖ / ‖d_full‖), ``val_loss`` at the anchor.
    """
    spec.validate()
    check_choice("optimizer", spec.optimizer, ["gn"])
    if not at_steps or min(at_steps) < 0:
        raise ValueError(f"at_steps must be non-negative steps, got {list(at_steps)!r}")
    data, model, _, val, optimizer, _ = build_run(spec)
    if data.corpus is None:
        raise ValueError(f"corpus={spec.corpus!r} is streamed; direction probes need an in-memory corpus")
    corpus = data.corpus
    inner = spec.hyperparameters.get("inner_steps", GN_INNER_STEPS)
    fixed = ("inner_steps", "blocks", "line_search", "line_search_batches", "warm_start")
    options = {k: v for k, v in spec.hyperparameters.items() if k not in fixed}
    labels = {"full": None, **partitions}
    rows, step = [], 0
    for target_step in sorted(set(at_steps)):
        while step < target_step:
            optimizer.step()
            step += 1
        probe = corpus.sampler(
            "train", spec.batch_size, spec.seq_len, seed=probe_seed + step, device=resolve_device(spec.device)
        )
        directions = gn_directions(model, [probe() for _ in range(inner)], labels, spec.lr, **options)
        full = directions["full"]
        full_norm = float(flatten(full).norm())
        val_loss = evaluate(model, val, CrossEntropy().value)
        for label in partitions:
            d = directions[label]
            norm = float(flatten(d).norm())
            rows.append(
                {
                    "step": step,
                    "partition": label,
                    "cosine": cosine(d, full),
                    "norm_ratio": norm / full_norm if full_norm else float("nan"),
                    "val_loss": val_loss,
                }
            )
    return pd.DataFrame(rows)

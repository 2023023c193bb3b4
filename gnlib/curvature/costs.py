r"""What one pass over one batch costs, in gradient-step equivalents: the one source of pass costs.

Gauss-Newton counts passes over one batch (forward; tangent, what carrying Δ through a forward adds;
backward); a gradient step (one forward, one backward) costs 1, so a GN step pays
c_F · n_forward + c_T · n_tangent + c_B · n_backward with c_F + c_B = 1. Two models give the weights
(:data:`COST_MODELS`): ``"measured"`` (timed on the run's own model and micro-batch by
:func:`measure_pass_costs`, cached per :func:`cache_key`) and ``"flops"`` (:data:`FLOP_PASS_COSTS`: 1/3,
2/3, 2/3); :func:`layerwise_pass_counts` gives layerwise GN's per-block shares and :func:`count_flops` counts
matrix-product FLOPs. docs/costs.md, section "Cost in gradient-step equivalents", derives and tabulates both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from gnlib.curvature import layerwise, products
from gnlib.distributed import all_reduce_mean, is_distributed
from gnlib.losses import CrossEntropy, Loss
from gnlib.models import Slot, SlotTangents
from gnlib.runtime import atomic_write_json, check_choice, invalid, is_finite_number, is_integer, output_path

#: The passes a Gauss-Newton step is counted in.
PASSES = ("forward", "tangent", "backward")
#: How pass costs are obtained: timed on the run's configuration, or the FLOP model.
COST_MODELS = ("measured", "flops")
#: The FLOP model: one pass over one batch in gradient-step equivalents (gradient step = 3F = 1).
FLOP_PASS_COSTS: dict[str, float] = {"forward": 1 / 3, "tangent": 2 / 3, "backward": 2 / 3}
#: Timed rounds after the warm-up round, at least; more while a gradient step's total is under MIN_SECONDS.
REPEATS = 5
MIN_SECONDS = 0.25
MAX_ROUNDS = 100
#: Floor of a measured weight (timing noise never makes a pass free).
MIN_COST = 0.01
#: Where runs that write outputs keep measured pass costs (relative paths resolve like notebook outputs).
CACHE_DIR = "outputs/pass_costs"

_MEASURED: dict[str, dict[str, Any]] = {}


def check_pass_costs(value: Any, parameter: str = "pass_costs") -> dict[str, float]:
    """``value`` as a dict of pass weights, or ``ValueError`` naming ``parameter`` and the allowed values.

    Args:
        value: a mapping with exactly the keys :data:`PASSES` and finite values >= 0.
        parameter: the name shown in the error.

    Returns:
        ``{"forward": c_F, "tangent": c_T, "backward": c_B}`` as floats.
    """
    ok = (
        isinstance(value, Mapping)
        and set(value) == set(PASSES)
        and all(is_finite_number(value[k]) and value[k] >= 0 for k in PASSES)
    )
    if not ok:
        raise invalid(
            "",
            parameter,
            value,
            f"a dict with keys {list(PASSES)} and finite values >= 0, in gradient-step "
            "equivalents (e.g. gnlib.curvature.costs.FLOP_PASS_COSTS)",
        )
    return {k: float(value[k]) for k in PASSES}


def price(counts: Mapping[str, int | float], costs: Mapping[str, float]) -> float:
    """Gradient-step equivalents of ``counts`` passes (keys :data:`PASSES`) at weights ``costs``."""
    return float(sum(costs[k] * counts[k] for k in PASSES))


def _inplace_addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """FLOPs of ``c.addmm_(a, b)`` for a (m, k), b (k, n): 2mkn, as the counter charges ``addmm``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(fn: Callable[[], object]) -> int:
    """Matrix-product FLOPs of one call ``fn()``, as ``torch.utils.flop_counter`` counts them.

    The counter sees every ``mm``, ``addmm``, ``bmm``, ... the call dispatches, forward and backward; the
    in-place ``addmm_`` (which fuses a linear layer's two tangent products) is added to what it knows.
    Elementwise work is not counted.
    """
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops}) as counter:
        fn()
    return counter.get_total_flops()


def layerwise_pass_counts(
    model: nn.Module, blocks: Sequence[Collection[str]], inputs: Tensor, slots: int | None = None
) -> tuple[float, float, float]:
    """(forwards, tangents, backwards) of one layerwise inner step (:func:`gnlib.curvature.layerwise_inner_steps`).

    For a model with its own forward-mode rules (``computes_jvp``), the blocks' tangents ride in one
    forward per ``slots`` blocks, block b's starting at its block, and block b's backward stops at its
    block: the tangents count as the matrix-product FLOPs those forwards add to the primal ones, and the
    backwards as the sum of the blocks' own, each in whole passes (a forward carrying every parameter's
    tangent, a gradient in every parameter). All are counted by :func:`count_flops` on the first sequence
    of ``inputs`` (every count scales with the batch). Any other model:
    :func:`gnlib.curvature.layerwise_passes`, whole passes.

    Args:
        model: the model.
        blocks: the parameter names of each block (disjoint).
        inputs: a batch of inputs (B, T); only its first sequence runs.
        slots: blocks per forward, as in :func:`gnlib.curvature.layerwise_inner_steps` (None: all).

    Returns:
        Pass counts in whole passes (floats for tangents and backwards).
    """
    forwards, tangents, backwards = layerwise.layerwise_passes(model, len(blocks), slots)
    if len(blocks) == 1 or not getattr(model, "computes_jvp", False):
        return forwards, tangents, backwards
    params = dict(model.named_parameters())
    x = inputs[:1]
    size = len(blocks) if slots is None else slots
    groups = [blocks[start : start + size] for start in range(0, len(blocks), size)]

    def forward(dots: Mapping[str, Tensor | Slot]) -> int:
        def run() -> None:
            out = functional_call(model, params, (x,), {"dots": dots} if dots else {})
            if isinstance(out, tuple) and isinstance(out[1], SlotTangents):
                list(out[1])  # stacked logits tangents are made slot by slot, on access

        return count_flops(run)

    def backward(names: Collection[str]) -> int:
        wrt = [params[name] for name in names]
        return count_flops(lambda: torch.autograd.grad(model(x).sum(), wrt, allow_unused=True))

    with torch.no_grad():
        primal = forward({})
        whole_tangent = forward({name: torch.zeros_like(p) for name, p in params.items()}) - primal
        stacked = [
            forward(
                {
                    name: Slot(index, torch.zeros_like(params[name]))
                    for index, names in enumerate(group)
                    for name in names
                }
            )
            - primal
            for group in groups
        ]
    whole_backward = backward(list(params)) - primal
    per_block = [backward(names) - primal for names in blocks]
    return forwards, sum(stacked) / whole_tangent, sum(per_block) / whole_backward


def cache_key(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, Any]:
    """What a measurement depends on: model config, batch shape, device, dtype, threads, torch, host, tangents.

    ``tangents`` says how a forward carries them: the model's own rules or ``torch.autograd.forward_ad``.
    """
    first = next(model.parameters())
    device = first.device
    config = getattr(model, "config", None)
    return {
        "model": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": int(batch_size),
        "seq_len": int(seq_len),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": str(first.dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "host": platform.node(),
        "tangents": "model rules" if getattr(model, "computes_jvp", False) else "forward_ad",
    }


def key_hash(key: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of a :func:`cache_key` as sorted JSON (the cache file's name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    fns: Mapping[str, Callable[[], object]], repeats: int, device: torch.device, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Seconds of each ``fns[name]()`` per round, round-robin, after one untimed warm-up round.

    At least ``repeats`` rounds, more while the first function's timed total is under ``min_seconds``
    (fast passes are timed over enough rounds to steady their median), at most :data:`MAX_ROUNDS`.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    first = next(iter(fns))
    round_ = 0
    while round_ <= repeats or (sum(times[first]) < min_seconds and round_ <= MAX_ROUNDS):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
        round_ += 1
    return times


def _read_cached(path: Path, digest: str) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
        check_pass_costs({k: record[k] for k in PASSES})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if record.get("key_hash") == digest else None


def measure_pass_costs(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    loss: Loss | None = None,
    repeats: int = REPEATS,
    min_seconds: float = MIN_SECONDS,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Time the passes of a gradient step and of a Gauss-Newton inner step on ``model`` (module docstring).

    Args:
        model: a token model (its ``config.vocab_size`` sets the random tokens), on its run's device and dtype.
        batch_size: sequences per micro-batch (per process under ``torchrun``).
        seq_len: tokens per sequence.
        loss: the training loss (default cross-entropy).
        repeats: timed rounds after the warm-up round, at least (>= 1).
        min_seconds: time more rounds (up to :data:`MAX_ROUNDS`) until the gradient steps total this.
        cache_dir: also keep the result in ``cache_dir/<key hash>.json`` and reuse it from there.
        use_cache: reuse a cached measurement of the same :func:`cache_key` (False: always time anew).

    Returns:
        ``{"model": "measured", "forward", "tangent", "backward"`` (the weights),
        ``"ms"`` (median ms of ``grad``, ``forward``, ``inner_step``), ``"rounds"`` (timed), ``"key"``,
        ``"key_hash"``, ``"source"`` (``"timed"``, ``"memory"`` or the cache file)``}``. Under
        ``torchrun`` the weights are averaged over the processes, so every process prices alike.

    Raises:
        ValueError: ``model`` has no ``config.vocab_size``, or a size is not a positive integer.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not is_integer(vocab):
        raise invalid("", "model", type(model).__name__, "a token model with config.vocab_size")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("repeats", repeats)):
        if not is_integer(value) or value < 1:
            raise invalid("", name, value, "an integer >= 1")
    key = cache_key(model, batch_size, seq_len)
    digest = key_hash(key)
    path = None if cache_dir is None else output_path(cache_dir) / f"{digest}.json"
    cached = _MEASURED.get(digest) if use_cache else None
    source = "memory"
    if use_cache and cached is None and path is not None and path.is_file():
        cached, source = _read_cached(path, digest), str(path)
    if is_distributed() and all_reduce_mean(float(cached is not None)) < 1:
        cached = None  # every process times (and averages) unless all of them found the same cache
    if cached is not None:
        _MEASURED[digest] = cached
        return {**cached, "source": source}

    loss = CrossEntropy() if loss is None else loss
    device = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)  # its own stream: the run's random state is not touched
    tokens = torch.randint(vocab, (batch_size, seq_len + 1), generator=generator).to(device)
    batch = (tokens[:, :-1], tokens[:, 1:])
    delta = {n: (torch.randn(p.shape, generator=generator) * 1e-3).to(device, p.dtype) for n, p in params.items()}

    def forward() -> object:
        with torch.no_grad():
            return loss.value(products.logits(model, params, batch[0]), batch[1])

    fns = {
        "grad": lambda: products.gradient(model, params, batch, loss),
        "forward": forward,
        "inner_step": lambda: products.gn_inner_step(model, params, delta, batch, loss),
    }
    times = time_rounds(fns, repeats, device, min_seconds)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    forward_cost = ms["forward"] / ms["grad"]
    costs = {
        "forward": forward_cost,
        "tangent": (ms["inner_step"] - ms["grad"]) / ms["grad"],
        "backward": 1.0 - forward_cost,
    }
    costs = {k: max(MIN_COST, float(v)) for k, v in all_reduce_mean(costs).items()}
    record = {"model": "measured", **costs, "ms": ms, "rounds": len(times["grad"]), "key": key, "key_hash": digest}
    _MEASURED[digest] = record
    if path is not None:
        atomic_write_json(path, record)
    return {**record, "source": "timed"}


def flop_pass_costs() -> dict[str, Any]:
    """The FLOP model as a record like :func:`measure_pass_costs`'s: ``{"model": "flops", ...weights}``."""
    return {"model": "flops", **FLOP_PASS_COSTS}


def resolve_pass_costs(
    cost_model: str, model: nn.Module, batch_size: int, seq_len: int, *, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """The pass costs of a run under ``cost_model`` (one of :data:`COST_MODELS`), as a record.

    ``"measured"`` times them (:func:`measure_pass_costs`, cached), ``"flops"`` is :data:`FLOP_PASS_COSTS`.
    """
    check_choice("costs", cost_model, COST_MODELS)
    if cost_model == "flops":
        return flop_pass_costs()
    return measure_pass_costs(model, batch_size, seq_len, cache_dir=cache_dir)


def weights(record: Mapping[str, Any]) -> dict[str, float]:
    """The three pass weights of a record (``GaussNewton``'s ``pass_costs``)."""
    return {k: float(record[k]) for k in PASSES}

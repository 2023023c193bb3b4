"""Throughput and memory of the study's model at the study's batch: ``python -m gnlib.tools.throughput``.

On random tokens of a given vocabulary (nothing is downloaded), :func:`run_throughput` times ``steps`` AdamW
steps and one GN outer step of ``steps`` inner steps without line search, each after an untimed warm-up,
and reports each one's tokens per second and peak memory; ``--autocast bfloat16`` runs both under
``torch.autocast``. What each row measures, and the commands of the study's GPU setting: docs/costs.md,
section "What the throughput tool measures".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from gnlib.curvature.costs import synchronize
from gnlib.losses import CrossEntropy
from gnlib.models import PRESETS, build_model, count_parameters
from gnlib.optim import make_optimizer
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.runtime import check_choice, is_integer, resolve_device
from gnlib.tools.bench import peak_memory

#: ``autocast`` values: the dtype the matrix products run in under ``torch.autocast``.
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def _random_batches(vocab_size: int, batch: int, seq_len: int, device: torch.device, seed: int):
    """A batch source of uniform random tokens: ``() -> (inputs, targets)``, each (batch, seq_len)."""
    generator = torch.Generator().manual_seed(seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(vocab_size, (batch, seq_len + 1), generator=generator).to(device)
        return tokens[:, :-1], tokens[:, 1:]

    return draw


def _measure(fn, device: torch.device) -> tuple[float, int]:
    """(seconds of one call of ``fn`` after a warm-up call, peak bytes: CUDA max allocated, or CPU profiler)."""
    fn()  # warm-up: kernels, optimizer state, allocator
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_memory(fn, device)
    return seconds, peak


def run_throughput(
    preset: str = "paper45m",
    vocab_size: int = 32000,
    device: str = "cpu",
    batch: int = 32,
    seq_len: int = 1024,
    steps: int = 3,
    lr: float = 0.01,
    seed: int = 0,
    autocast: str | None = None,
    **model_overrides,
) -> dict:
    """Measure gradient steps and GN inner steps of ``preset`` at ``batch`` × ``seq_len`` (docs/costs.md).

    Args:
        preset: a model preset (:data:`gnlib.models.PRESETS`).
        vocab_size: vocabulary of the model and of the random tokens.
        device: ``"cpu"``, ``"cuda"``, ...
        batch: sequences per batch (B).
        seq_len: tokens per sequence (T), at most the preset's ``max_seq_len``.
        steps: gradient steps, and GN inner steps, per measurement.
        lr: AdamW's LR and the GN inner LR.
        seed: model and token seed.
        autocast: None (float32) or a key of :data:`AUTOCAST_DTYPES` to run both under ``torch.autocast``.
        **model_overrides: config fields to replace (a tiny shape for a quick run).

    Returns:
        ``preset``, ``device``, ``params``, ``vocab_size``, ``batch``, ``seq_len``, ``steps``, ``autocast``,
        ``memory_measure`` and ``rows``: per measurement ``name``, ``seconds``, ``tokens``,
        ``tokens_per_s``, ``peak_mem_bytes``.
    """
    check_choice("preset", preset, PRESETS)
    if autocast is not None:
        check_choice("autocast", autocast, AUTOCAST_DTYPES)
    for name, value in (("vocab_size", vocab_size), ("batch", batch), ("seq_len", seq_len), ("steps", steps)):
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    dev = resolve_device(device)
    model = build_model(preset, seed=seed, device=dev, vocab_size=vocab_size, **model_overrides)
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds preset {preset!r}'s max_seq_len={model.config.max_seq_len}")
    batches = _random_batches(vocab_size, batch, seq_len, dev, seed)
    loss = CrossEntropy()
    adamw = make_optimizer("adamw", model, lr=lr)

    def gradient_steps() -> None:
        for _ in range(steps):
            inputs, targets = batches()
            adamw.zero_grad(set_to_none=True)
            loss.value(model(inputs), targets).backward()
            adamw.step()

    gn = GaussNewton(model, batches, inner_steps=steps, inner_lr=lr, line_search=None, line_search_batches=1)

    def autocasting(fn):
        def call() -> None:
            context = (
                contextlib.nullcontext() if autocast is None else torch.autocast(dev.type, AUTOCAST_DTYPES[autocast])
            )
            with context:
                fn()

        return call

    rows = []
    for name, fn in (("gradient_step", gradient_steps), ("gn_inner_steps", gn.step)):
        seconds, peak = _measure(autocasting(fn), dev)
        tokens = steps * batch * seq_len
        rows.append(
            {
                "name": name,
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "peak_mem_bytes": peak,
            }
        )
    return {
        "preset": preset,
        "device": str(dev),
        "params": count_parameters(model),
        "vocab_size": vocab_size,
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "autocast": autocast,
        "rows": rows,
        "memory_measure": "cuda max_memory_allocated" if dev.type == "cuda" else "torch.profiler CPU allocations",
    }


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run_throughput` result."""
    lines = [
        f"preset={result['preset']} device={result['device']} params={result['params']:,} "
        f"vocab={result['vocab_size']} batch={result['batch']}x{result['seq_len']} steps={result['steps']} "
        f"autocast={result['autocast'] or 'off (float32)'}",
        f"{'measurement':<16} {'tokens/s':>12} {'seconds':>9} {'peak MiB':>10}  ({result['memory_measure']})",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['name']:<16} {row['tokens_per_s']:>12,.0f} {row['seconds']:>9.3f} "
            f"{row['peak_mem_bytes'] / 2**20:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (exit status 0); see ``python -m gnlib.tools.throughput --help``."""
    parser = argparse.ArgumentParser(prog="python -m gnlib.tools.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper45m", help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (random tokens below it)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="gradient steps and GN inner steps per measurement")
    parser.add_argument(
        "--autocast", default=None, help=f"run under torch.autocast in this dtype: {', '.join(AUTOCAST_DTYPES)}"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    result = run_throughput(
        args.preset, args.vocab, args.device, args.batch, args.seq_len, args.steps, autocast=args.autocast
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

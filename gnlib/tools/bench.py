"""Cost of the curvature products relative to a plain gradient step: ``python -m gnlib.tools.bench``.

On one model and one batch every measurement runs once as warmup, then all run round-robin ``repeats``
times; each median time is divided by the gradient step's. Measured: the gradient step, the GN inner step,
cached and naive GGN·v, H·v, the linearization, layerwise GN's inner step, the line search and whole
outer steps (full, layerwise), optionally compiled steps; beside each, its ratio of counted matmul FLOPs,
its minor page faults and the peak memory, and the pass costs a run would use. docs/costs.md, section
"What the bench measures", says what each is and how it is counted.

Example: ``python -m gnlib.tools.bench --preset small --json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Collection

import torch
from torch.func import functional_call

from gnlib import curvature
from gnlib.curvature.blocks import per_layer
from gnlib.curvature.costs import (
    FLOP_PASS_COSTS,
    PASSES,
    count_flops,
    layerwise_pass_counts,
    measure_pass_costs,
    price,
    synchronize,
)
from gnlib.losses import CrossEntropy
from gnlib.models import PRESETS, build_model, count_parameters
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.optim.gn_options import GaussNewtonOptions
from gnlib.optim.line_search import PassCount, line_search
from gnlib.params import params_of
from gnlib.runtime import check_choice, invalid, resolve_device

MEASUREMENTS = (
    "grad",
    "gn_inner_step",
    "layerwise_inner_step",
    "ggn_vp_cached",
    "hvp",
    "ggn_vp_torch_func",
    "linearize",
    "line_search",
    "outer_step_full",
    "outer_step_layerwise",
)
COMPILED = ("grad_compiled", "gn_inner_step_compiled")
#: Measurements timed in the first ``outer_repeats`` rounds only.
OUTER = ("outer_step_full", "outer_step_layerwise")
PEAK_MEASUREMENTS = ("grad", "gn_inner_step", "layerwise_inner_step")


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to the null device meanwhile (the profiler logs there from C++, not via Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def minor_page_faults() -> int:
    """Minor page faults of this process so far: pages the kernel mapped (and zeroed) on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _inner_step_ratios(ms: dict[str, float], flops: dict[str, int], peak: dict[str, int]) -> dict[str, float]:
    """``layerwise_over_full`` (time), ``layerwise_over_full_flops`` and ``peak_mem_ratio``, where measured.

    The first two divide ``layerwise_inner_step`` by ``gn_inner_step``, the last divides the peak memory of
    ``gn_inner_step`` by that of ``grad``; each is left out when a measurement it divides was not run.
    """
    ratios = {}
    if "layerwise_inner_step" in ms and "gn_inner_step" in ms:
        ratios["layerwise_over_full"] = ms["layerwise_inner_step"] / ms["gn_inner_step"]
        ratios["layerwise_over_full_flops"] = flops["layerwise_inner_step"] / flops["gn_inner_step"]
    if "gn_inner_step" in peak:
        ratios["peak_mem_ratio"] = peak["gn_inner_step"] / peak["grad"]
    return ratios


def run_benchmark(
    preset: str = "tiny",
    device: str = "cpu",
    batch: int = 16,
    seq_len: int | None = None,
    repeats: int = 10,
    seed: int = 0,
    threads: int | None = None,
    outer_repeats: int = 2,
    compile: bool = False,
    measurements: Collection[str] | None = None,
    **model_overrides,
) -> dict:
    """Time every measurement of the module docstring and return the summary (the ``--json`` object).

    Args:
        preset: model preset of :mod:`gnlib.models`.
        device: ``"cpu"`` or ``"cuda"``.
        batch: sequences per batch.
        seq_len: tokens per sequence (default: the preset's ``max_seq_len``).
        repeats: timed rounds after the warmup round.
        seed: seed of the model and the batch.
        threads: ``torch.set_num_threads`` for the run (default: leave torch's setting).
        outer_repeats: timed rounds of the outer steps (0 leaves them out; at most ``repeats`` are run).
        compile: also time the gradient step and the inner step under ``torch.compile``.
        measurements: names of :data:`MEASUREMENTS` to run besides ``grad`` (default: all of them); the
            others, and every figure derived from them, are left out of the result.
        **model_overrides: config fields to replace, e.g. ``n_layers=1`` for a quick run.

    Returns:
        Dict with ``preset``, ``device``, ``params``, ``vocab_size``, ``batch``, ``seq_len``, ``repeats``, ``threads``,
        ``load_average`` (1-minute load of the machine when the run ended: timings on a busy machine are
        noisy), ``grad_ms``, ``ms`` (median ms per measurement), ``ratio`` (median / median of ``grad``,
        every measurement but ``grad``), ``cpu_ms`` and ``cpu_ratio`` (the same with the process's CPU
        time, steadier than wall time when other processes compete for the cores; with several threads
        it also counts their waiting), ``minor_faults`` (median minor page faults per call, see the
        module docstring), ``layerwise_over_full``, ``layerwise_blocks`` (blocks of the layerwise
        partition), ``peak_mem_bytes`` (``grad``, ``gn_inner_step``, ``layerwise_inner_step``),
        ``peak_mem_ratio``, ``memory_measure`` (what the peak means on this device), ``pass_costs``
        (``measured`` and ``flops``: forward, tangent, backward in gradient steps), ``passes`` (the pass
        counts of the inner steps, line search and outer steps) and ``priced`` (their cost under each
        model, to compare with ``ratio``). With ``compile``: ``compile_seconds`` (first call of each
        compiled measurement) and ``compiled_inner_over_grad``.
    """
    dev = resolve_device(device)
    chosen = _chosen(preset, batch, repeats, threads, outer_repeats, measurements)
    outer_repeats = min(outer_repeats, repeats)
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(preset, seed=seed, device=dev, **model_overrides)
    seq_len = model.config.max_seq_len if seq_len is None else seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise invalid("", "seq_len", seq_len, f"an integer in [1, {model.config.max_seq_len}] for preset {preset!r}")
    setup = _Setup(model, batch, seq_len, seed, dev)
    fns = setup.measurements(chosen, outer_repeats, compile)
    wall, cpu, faults, compile_seconds = _time(fns, dev, repeats, outer_repeats)
    ms = {name: 1e3 * statistics.median(t) for name, t in wall.items()}
    cpu_ms = {name: 1e3 * statistics.median(t) for name, t in cpu.items()}
    peak = {name: peak_memory(fns[name], dev) for name in PEAK_MEASUREMENTS if name in fns}
    flops = {name: count_flops(fn) for name, fn in fns.items() if name not in COMPILED}
    counts = {name: n for name, n in setup.pass_counts().items() if name in fns}
    measured = measure_pass_costs(model, batch, seq_len, repeats=repeats, use_cache=False)
    pass_costs = {"measured": {k: measured[k] for k in PASSES}, "flops": dict(FLOP_PASS_COSTS)}
    priced = {
        name: {model_: price(dict(zip(PASSES, n)), weights) for model_, weights in pass_costs.items()}
        for name, n in counts.items()
    }
    compiled = {}
    if compile:
        compiled = {
            "compile_seconds": compile_seconds,
            "compiled_inner_over_grad": ms["gn_inner_step_compiled"] / ms["grad_compiled"],
        }
    return {
        "preset": preset,
        "device": str(dev),
        "params": count_parameters(model),
        "vocab_size": model.config.vocab_size,
        "batch": batch,
        "seq_len": seq_len,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "grad_ms": ms["grad"],
        "ms": ms,
        "ratio": {name: ms[name] / ms["grad"] for name in fns if name != "grad"},
        "cpu_ms": cpu_ms,
        "cpu_ratio": {name: cpu_ms[name] / cpu_ms["grad"] for name in fns if name != "grad"},
        "minor_faults": {name: round(statistics.median(n)) for name, n in faults.items()},
        "flops": flops,
        "flop_ratio": {name: flops[name] / flops["grad"] for name in flops if name != "grad"},
        "layerwise_blocks": len(setup.partition),
        "peak_mem_bytes": peak,
        **_inner_step_ratios(ms, flops, peak),
        "memory_measure": "cuda max_memory_allocated" if dev.type == "cuda" else "torch.profiler CPU allocations",
        "pass_costs": pass_costs,
        "passes": {name: dict(zip(PASSES, n)) for name, n in counts.items()},
        "priced": priced,
        **compiled,
    }


def _chosen(
    preset: str, batch: int, repeats: int, threads: int | None, outer_repeats: int, measurements: Collection[str] | None
) -> set[str]:
    """The measurements to run (``grad`` always), after checking every argument; a ValueError names the bad one."""
    check_choice("preset", preset, PRESETS)
    if repeats < 1 or batch < 1 or (threads is not None and threads < 1):
        raise ValueError(f"repeats={repeats}, batch={batch} and threads={threads} must be positive")
    if outer_repeats < 0:
        raise invalid("", "outer_repeats", outer_repeats, "an integer >= 0")
    chosen = set(MEASUREMENTS if measurements is None else measurements) | {"grad"}
    for name in chosen:
        check_choice("measurements", name, MEASUREMENTS)
    return chosen


class _Setup:
    """One model, one random (B, T) batch, a direction v (1e-3 · N(0, 1)), and the measurements over them."""

    def __init__(self, model: torch.nn.Module, batch: int, seq_len: int, seed: int, dev: torch.device) -> None:
        """Draw the batch and v from ``seed``; record the study's per-layer partition."""
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(model.config.vocab_size, (batch, seq_len + 1), generator=generator).to(dev)
        self.model, self.data, self.loss = model, (tokens[:, :-1], tokens[:, 1:]), CrossEntropy()
        self.params = params_of(model)
        self.v = {n: torch.randn(p.shape, generator=generator).to(dev, p.dtype) * 1e-3 for n, p in self.params.items()}
        self.partition = per_layer(model)
        self.search_costs: list[PassCount] = []
        self.outer: dict[str, dict] = {}  # name -> diagnostics of its last outer step
        self.counts: dict[str, tuple] = {"gn_inner_step": (1, 1, 1)}

    def measurements(self, chosen: set[str], outer_repeats: int, compile: bool) -> dict[str, Callable[[], object]]:
        """Name -> zero-argument callable for every measurement to time, in :data:`MEASUREMENTS` order."""
        model, data, loss, params, v = self.model, self.data, self.loss, self.params, self.v
        lin = curvature.linearize(model, params, data, loss)
        weights = list(model.parameters())
        blocks = [{name: v[name] for name in names} for names in self.partition.values()]
        fns: dict[str, Callable[[], object]] = {
            "grad": lambda: torch.autograd.grad(loss.value(model(data[0]), data[1]), weights),
            "gn_inner_step": lambda: curvature.gn_inner_step(model, params, v, data, loss),
            "ggn_vp_cached": lambda: lin.ggn_vp(v),
            "hvp": lambda: curvature.hvp(model, params, data, v, loss),
            "ggn_vp_torch_func": self._ggn_vp_torch_func,
            "linearize": lambda: curvature.linearize(model, params, data, loss),
            "layerwise_inner_step": lambda: curvature.layerwise_inner_steps(model, params, blocks, data, loss),
            "line_search": self._line_search,
        }
        if "layerwise_inner_step" in chosen:
            self.counts["layerwise_inner_step"] = layerwise_pass_counts(model, list(self.partition.values()), data[0])
        if outer_repeats and "outer_step_full" in chosen:
            fns["outer_step_full"] = self._recorded("outer_step_full", GaussNewton(copy.deepcopy(model), lambda: data))
        if outer_repeats and "outer_step_layerwise" in chosen:
            layerwise = GaussNewton(copy.deepcopy(model), lambda: data, blocks="per_layer")
            fns["outer_step_layerwise"] = self._recorded("outer_step_layerwise", layerwise)
        if compile:
            compiled_model, compiled_inner = torch.compile(model), torch.compile(curvature.gn_inner_step)
            fns["grad_compiled"] = lambda: torch.autograd.grad(loss.value(compiled_model(data[0]), data[1]), weights)
            fns["gn_inner_step_compiled"] = lambda: compiled_inner(model, params, v, data, loss)
        return {name: fns[name] for name in MEASUREMENTS + COMPILED if name in fns and name in chosen | set(COMPILED)}

    def pass_counts(self) -> dict[str, tuple]:
        """(forwards, tangents, backwards) of the inner steps, the last line search and the last outer steps."""
        counts = dict(self.counts)
        if self.search_costs:
            last = self.search_costs[-1]
            counts["line_search"] = (last.forward, last.tangent, last.backward)
        counts.update({name: tuple(d[f"{k}_passes"] for k in PASSES) for name, d in self.outer.items()})
        return counts

    def _ggn_vp_torch_func(self) -> object:
        def f(p: dict) -> torch.Tensor:
            return functional_call(self.model, p, (self.data[0],))

        z, jv = torch.func.jvp(f, (self.params,), (self.v,))
        _, vjp_fn = torch.func.vjp(f, self.params)
        return vjp_fn(self.loss.hvp(z, self.data[1], jv))

    def _line_search(self) -> object:
        """The line search a default GaussNewton step runs, along v."""
        defaults = GaussNewtonOptions()
        self.search_costs.append(PassCount())
        batches = [self.data] * defaults.line_search_batches
        return line_search(
            self.model, self.loss, self.params, self.v, batches, grid=defaults.line_search, cost=self.search_costs[-1]
        )

    def _recorded(self, name: str, optimizer: GaussNewton) -> Callable[[], None]:
        return lambda: self.outer.update({name: optimizer.step()})


def _time(
    fns: dict[str, Callable[[], object]], dev: torch.device, repeats: int, outer_repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[int]], dict[str, float]]:
    """Wall seconds, CPU seconds and minor page faults per call of every measurement after a warmup round.

    Round 0 is the warmup (and compiles: its seconds are the compile time of the compiled measurements);
    the outer steps run in the first ``outer_repeats`` timed rounds only.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    compile_seconds: dict[str, float] = {}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if name in OUTER and round_ > outer_repeats:
                continue
            synchronize(dev)
            start, start_cpu, start_faults = time.perf_counter(), time.process_time(), minor_page_faults()
            fn()
            synchronize(dev)
            if round_:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                faults[name].append(minor_page_faults() - start_faults)
            elif name in COMPILED:
                compile_seconds[name] = time.perf_counter() - start
    return wall, cpu, faults, compile_seconds


def format_table(result: dict) -> str:
    """Human-readable table of a :func:`run_benchmark` result."""
    lines = [
        f"preset={result['preset']} vocab={result['vocab_size']} device={result['device']} params={result['params']:,} "
        f"batch={result['batch']}x{result['seq_len']} repeats={result['repeats']} threads={result['threads']} "
        f"load={result['load_average']:.1f}",
        f"{'measurement':<24} {'median ms':>10} {'x grad':>8} {'cpu x grad':>11} {'flops x grad':>13} "
        f"{'page faults':>12}",
    ]
    for name, ms in result["ms"].items():
        cpu_ratio = result["cpu_ms"][name] / result["cpu_ms"]["grad"]
        flops = f"{result['flops'][name] / result['flops']['grad']:.2f}" if name in result["flops"] else "-"
        lines.append(
            f"{name:<24} {ms:>10.2f} {ms / result['grad_ms']:>8.2f} {cpu_ratio:>11.2f} {flops:>13} "
            f"{result['minor_faults'][name]:>12,}"
        )
    peak = result["peak_mem_bytes"]
    if "layerwise_over_full" in result:
        lines.append(
            f"layerwise_inner_step / gn_inner_step = {result['layerwise_over_full']:.2f} "
            f"({result['layerwise_blocks']} blocks; FLOPs {result['layerwise_over_full_flops']:.2f})"
        )
    lines.append(
        f"peak memory ({result['memory_measure']}): "
        + ", ".join(f"{name} {peak[name] / 2**20:.1f} MiB" for name in peak)
        + (f"; gn_inner_step / grad {result['peak_mem_ratio']:.2f}" if "peak_mem_ratio" in result else "")
    )
    if "compile_seconds" in result:
        lines.append(
            f"compiled: gn_inner_step_compiled / grad_compiled = {result['compiled_inner_over_grad']:.2f}; "
            "compile time "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["compile_seconds"].items())
        )
    costs = result["pass_costs"]
    lines.append(f"{'pass costs (x grad)':<20} {'measured':>10} {'flops':>8}")
    for name in costs["measured"]:
        lines.append(f"{name:<20} {costs['measured'][name]:>10.2f} {costs['flops'][name]:>8.2f}")
    lines.append(f"{'priced (x grad)':<20} {'measured':>10} {'flops':>8} {'timed':>11}")
    for name, priced in result["priced"].items():
        lines.append(f"{name:<20} {priced['measured']:>10.2f} {priced['flops']:>8.2f} {result['ratio'][name]:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (exit status 0); see ``python -m gnlib.tools.bench --help``."""
    parser = argparse.ArgumentParser(prog="python -m gnlib.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds after one warmup round")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--outer-repeats", type=int, default=2, help="timed rounds of the outer steps (0: skip)")
    parser.add_argument("--compile", action="store_true", help="also time the steps under torch.compile")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    result = run_benchmark(
        args.preset,
        args.device,
        args.batch,
        args.seq_len,
        args.repeats,
        args.seed,
        args.threads,
        args.outer_repeats,
        args.compile,
        **({} if args.vocab is None else {"vocab_size": args.vocab}),
    )
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()

"""The study's scale on a GPU in one command: ``python -m gnlib.tools.gpu_check OUT_DIR --device cuda``.

Four parts, each under its own time cap (:data:`SIZES`; ``--cap PART=SECONDS`` changes one), so that a
slow or failing part cannot take the others' time; the results are written to ``OUT_DIR/gpu_check.json``
after every part and summarized in ``OUT_DIR/gpu_check.md`` with the goals met or missed:

1. ``throughput``: at the study's shape (``paper45m``, vocabulary 32,000, B × T = 32 × 1024 tokens), in
   float32 and under ``torch.autocast`` in bfloat16 (parameters, optimizer state and Δ stay float32):
   tokens/s and peak memory of AdamW gradient steps and GN inner steps
   (:func:`gnlib.tools.throughput.run_throughput`); the bench's (:func:`gnlib.tools.bench.run_benchmark`) GN inner
   step, ``ggn_vp_cached``, line search and outer step against a gradient step, in time and peak memory;
   and the gradient step's model FLOPs utilization, MFU = F / t / P, with F the matrix-product FLOPs
   counted in one gradient step (:func:`gnlib.curvature.costs.count_flops`), t its median time and P the chip's
   dense peak for the precision the products ran in (:data:`PEAK_TFLOPS`; float32 products count against
   the float32 peak unless ``torch.get_float32_matmul_precision()`` allows TF32).
2. ``large``: ``paper150m``, tokens/s and peak memory of one gradient step and one inner step in both
   precisions at B = 32, or, where that runs out of memory, the largest batch that fits and the smallest
   that does not (with the allocator's message), found by halving and then bisecting.
3. ``study``: a short study at the study's scale on the embedded corpus (no download): tokens as bytes
   (or ``bpe:<n>``) fed to the 32,000-id model, in random windows of T tokens; a shared AdamW warm-up
   (:func:`gnlib.experiment.study.warmup_checkpoint`), then GN and Muon (the best baseline of the CPU study) at one
   large batch, m micro-batches of B × T per outer step (GN: m inner steps; Muon: m accumulated
   micro-batches), each training for an equal share of the part's time and stopped after the step under
   way then (:func:`time_cap`), evaluated after every step. Validation loss against steps and against
   seconds (evaluations included): JSON, table and ``study_loss_vs_steps.png``, ``study_loss_vs_seconds.png``.
4. ``host_reads``: reads of tensor values by the host during one GN outer step with its default line
   search (:class:`gnlib.host_reads.HostReads`; the claim is four), and on CUDA the synchronizations the
   device itself reports (``torch.cuda.set_sync_debug_mode``): host reads, and blocking copies between
   host and device, which also wait for the queued work.

``--size tiny`` runs every part on the CPU with tiny models in seconds (the test suite does); the
default, ``--size study``, takes at most about 7 minutes on an H200 (caps: :data:`SIZES`). Asking for
``--device cuda`` where torch sees no CUDA device exits with status 2 and a one-line message.

Example (from a checkout, with torch and the packages of ``requirements.txt``)::

    PYTHONPATH=. python3 -m gnlib.tools.gpu_check outputs/gpu_check --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import itertools
import json
import math
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from gnlib.checks import check_writable
from gnlib.experiment.history import History
from gnlib.experiment.runs import RunSpec, run, summarize
from gnlib.experiment.study import study_spec, warmup_checkpoint
from gnlib.host_reads import HostReads
from gnlib.models import build_model
from gnlib.notebook.plots import loss_curves, to_png
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.runtime import atomic_write_bytes, atomic_write_json, atomic_write_text, check_choice, resolve_device
from gnlib.tools.bench import run_benchmark
from gnlib.tools.throughput import AUTOCAST_DTYPES, run_throughput

#: The parts, in the order they run.
PARTS = ("throughput", "large", "study", "host_reads")
#: Precisions of parts 1 and 2: float32, and the matrix products under ``torch.autocast`` in bfloat16.
DTYPES = ("float32", "bfloat16")
#: The bench's measurements the check reads (besides the gradient step).
BENCH_MEASUREMENTS = ("gn_inner_step", "ggn_vp_cached", "line_search", "outer_step_full")
#: Dense (no sparsity) peak TFLOP/s of matrix products by chip and precision, from NVIDIA's datasheets
#: (SXM parts); a chip is recognized by the name in ``torch.cuda.get_device_name``.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "H100": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0},
}
#: Goals of the check: GN's inner step against a gradient step, in time and in peak memory.
MAX_INNER_TIME_RATIO = 1.8
MAX_INNER_MEMORY_RATIO = 2.0
#: Host reads of one GN outer step, whatever its inner steps and line-search points (gnlib.optim.gauss_newton).
HOST_READS_PER_OUTER_STEP = 4
#: The study part's shares of its cap: the warm-up at most, all runs together, and the grace a run has
#: to end its step under way, evaluate and write its History once asked to stop (at least MIN_GRACE_S).
WARMUP_SHARE, RUNS_SHARE, GRACE_SHARE, MIN_GRACE_S = 0.5, 0.75, 0.12, 5.0
#: Outer steps a study run is given: more than fit in its time, which ends it.
STUDY_MAX_STEPS = 100_000
JSON_NAME, REPORT_NAME = "gpu_check.json", "gpu_check.md"


@dataclasses.dataclass(frozen=True)
class CheckSize:
    """The shapes, lengths and time caps of one run of the check.

    Attributes:
        preset: model of parts 1, 3 and 4.
        large_preset: model of part 2.
        vocab_size: vocabulary of every model.
        batch: sequences per micro-batch (B).
        seq_len: tokens per sequence (T).
        repeats: timed rounds of the bench after its warm-up round (its outer step is timed in one).
        throughput_steps: gradient steps, and GN inner steps, per throughput measurement.
        micro_batches: m, micro-batches per outer step of the study and GN inner steps of part 4.
        warmup_steps: AdamW steps of the study's shared warm-up (one micro-batch each).
        val_batches: validation batches (B × T each) of the study.
        corpus_bytes: text read from the embedded corpus (2**26 is all of it).
        caps: seconds each part may run; a part still running then is stopped and reported ``timed_out``.
    """

    preset: str
    large_preset: str
    vocab_size: int
    batch: int
    seq_len: int
    repeats: int
    throughput_steps: int
    micro_batches: int
    warmup_steps: int
    val_batches: int
    corpus_bytes: int | None
    caps: Mapping[str, float]


#: ``study``: the study's shapes on a GPU (at most 410 s of caps on an H200); ``tiny``: the code path on a CPU.
SIZES: dict[str, CheckSize] = {
    "study": CheckSize(
        preset="paper45m",
        large_preset="paper150m",
        vocab_size=32000,
        batch=32,
        seq_len=1024,
        repeats=2,
        throughput_steps=3,
        micro_batches=8,
        warmup_steps=50,
        val_batches=2,
        corpus_bytes=2**26,
        caps={"throughput": 110, "large": 60, "study": 200, "host_reads": 40},
    ),
    "tiny": CheckSize(
        preset="tiny",
        large_preset="small",
        vocab_size=256,
        batch=2,
        seq_len=32,
        repeats=1,
        throughput_steps=1,
        micro_batches=2,
        warmup_steps=2,
        val_batches=1,
        corpus_bytes=2**20,
        caps={"throughput": 60, "large": 30, "study": 12, "host_reads": 30},
    ),
}


class PartTimeout(BaseException):
    """A part ran past its cap (a ``BaseException``: library code that catches ``Exception`` lets it pass)."""


@contextlib.contextmanager
def time_cap(seconds: float, grace: float | None = None) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the block once ``seconds`` have passed (``SIGALRM``: main thread only).

    With ``grace``, a training run under way (:func:`gnlib.experiment.train.train` handles ``SIGINT`` while it runs) is
    first asked to stop by ``SIGINT``: it finishes its step, writes its checkpoint and raises
    :class:`gnlib.experiment.train.RunInterrupted`; :class:`PartTimeout` comes only if the block still runs ``grace``
    seconds later.
    """
    asked = False

    def stop(signum: int, frame: object) -> None:
        nonlocal asked
        plain = signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL)
        if grace is not None and not asked and not plain:
            asked = True
            signal.setitimer(signal.ITIMER_REAL, grace)
            signal.raise_signal(signal.SIGINT)
            return
        raise PartTimeout(f"stopped at its cap of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(fn: Callable[[], dict[str, Any]], cap: float, device: torch.device, *, capped: bool) -> dict[str, Any]:
    """``fn()``'s figures with ``status`` (``ok``, ``timed_out``, ``failed``), ``seconds`` and ``cap_s``.

    Under :func:`time_cap` of ``cap`` unless ``capped`` (``fn`` keeps to ``cap`` itself). A failed part
    records ``error`` and the last lines of its ``traceback``; memory is released after each part.
    """
    start = time.perf_counter()
    try:
        with contextlib.nullcontext() if capped else time_cap(cap):
            record = {"status": "ok", **fn()}
    except PartTimeout as err:
        record = {"status": "timed_out", "error": str(err)}
    except Exception as err:  # one failing part leaves the others their run
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(-8)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**record, "seconds": time.perf_counter() - start, "cap_s": cap}


def autocasting(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype`` on ``device`` (a key of :data:`AUTOCAST_DTYPES`), or nothing for float32."""
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device.type, AUTOCAST_DTYPES[dtype])


def peak_tflops(device: torch.device, dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """The chip's dense peak TFLOP/s for matrix products in ``dtype``, and where the number comes from.

    ``override`` (``--peak-tflops``) wins; otherwise a CUDA device named in :data:`PEAK_TFLOPS`, with float32
    read as TF32 when ``torch.get_float32_matmul_precision()`` is not ``"highest"``; otherwise (None, why).
    """
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for this device: pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    precision = "tf32" if dtype == "float32" and torch.get_float32_matmul_precision() != "highest" else dtype
    chip = next((chip for chip in PEAK_TFLOPS if chip in name), None)
    if chip is None:
        return None, f"no peak known for {name!r}: pass --peak-tflops"
    return PEAK_TFLOPS[chip][precision], f"{chip} {precision} dense peak (datasheet)"


def throughput_figures(size: CheckSize, device: torch.device, dtype: str, override: float | None) -> dict[str, Any]:
    """Part 1 in one precision: throughput rows, the bench's ratios and peaks, and the gradient step's MFU."""
    autocast = None if dtype == "float32" else dtype
    shape = {"batch": size.batch, "seq_len": size.seq_len}
    throughput = run_throughput(
        size.preset, size.vocab_size, str(device), steps=size.throughput_steps, autocast=autocast, **shape
    )
    with autocasting(device, dtype):
        bench = run_benchmark(
            size.preset,
            str(device),
            repeats=size.repeats,
            outer_repeats=1,
            measurements=BENCH_MEASUREMENTS,
            vocab_size=size.vocab_size,
            **shape,
        )
    peak, source = peak_tflops(device, dtype, override)
    achieved = bench["flops"]["grad"] / (bench["grad_ms"] / 1e3) / 1e12
    mfu = {"grad_flops": bench["flops"]["grad"], "achieved_tflops": achieved, "peak_tflops": peak}
    mfu.update(peak_source=source, mfu=None if peak is None else achieved / peak)
    return {"throughput": {row["name"]: row for row in throughput["rows"]}, "bench": bench, "mfu": mfu}


def throughput_part(size: CheckSize, device: torch.device, override: float | None) -> dict[str, Any]:
    """Part 1: :func:`throughput_figures` in each of :data:`DTYPES`, at ``size.preset``'s shape."""
    shape = {"preset": size.preset, "vocab_size": size.vocab_size, "batch": size.batch, "seq_len": size.seq_len}
    return {**shape, **{dtype: throughput_figures(size, device, dtype, override) for dtype in DTYPES}}


def largest_fitting(measure: Callable[[int], dict[str, Any]], batch: int) -> dict[str, Any]:
    """``measure(batch)``, or where it runs out of memory, the largest batch below it that fits.

    Halves the batch until one fits, then bisects between the largest that fits and the smallest that does
    not, so the out-of-memory point is exact to one sequence.

    Returns:
        ``batch`` (the largest that fits; None if not even 1 does), ``figures`` (``measure`` there) and
        ``out_of_memory``: the batches that did not fit, each with the first line of the allocator's message.
    """
    fits, fails, failures = 0, None, []
    figures: dict[str, Any] | None = None
    trial = batch
    while True:
        try:
            figures, fits = measure(trial), trial
        except torch.cuda.OutOfMemoryError as err:
            fails = trial
            failures.append({"batch": trial, "error": str(err).splitlines()[0]})
            if torch.cuda.is_initialized():  # release what the failed step left
                gc.collect()
                torch.cuda.empty_cache()
        if fails is None or fails - fits <= 1:
            return {"batch": fits or None, "figures": figures, "out_of_memory": failures}
        trial = fails // 2 if fits == 0 else (fits + fails) // 2


def large_part(size: CheckSize, device: torch.device) -> dict[str, Any]:
    """Part 2: one gradient step and one GN inner step of ``size.large_preset`` in each precision."""

    def measure(dtype: str) -> Callable[[int], dict[str, Any]]:
        def rows(batch: int) -> dict[str, Any]:
            autocast = None if dtype == "float32" else dtype
            result = run_throughput(
                size.large_preset, size.vocab_size, str(device), batch, size.seq_len, 1, autocast=autocast
            )
            return {"params": result["params"], **{row["name"]: row for row in result["rows"]}}

        return rows

    figures = {dtype: largest_fitting(measure(dtype), size.batch) for dtype in DTYPES}
    return {"preset": size.large_preset, "seq_len": size.seq_len, "asked_batch": size.batch, **figures}


def study_base(size: CheckSize, device: torch.device, tokenizer: str, lrs: Mapping[str, float]) -> RunSpec:
    """The spec the short study's warm-up and runs share, checked with each optimizer of ``lrs``."""
    base = RunSpec(
        preset=size.preset,
        corpus="default",
        tokenizer=tokenizer,
        corpus_bytes=size.corpus_bytes,
        batch_size=size.batch,
        seq_len=size.seq_len,
        steps=STUDY_MAX_STEPS,
        eval_every=1,
        val_batches=size.val_batches,
        device=str(device),
        costs="flops",
        model_overrides={"vocab_size": size.vocab_size},
    )
    base.validate()
    for optimizer, lr in lrs.items():
        study_spec(base, optimizer, size.micro_batches, lr, 0).validate()
    return base


def timed_run(spec: RunSpec, run_dir: Path, seconds: float, grace: float) -> tuple[History | None, str]:
    """``spec`` trained for ``seconds`` (then stopped after its step), and how it ended.

    Returns:
        Its History as written to ``run_dir`` when it stopped (None if it had not started), and ``"time"``
        (stopped at ``seconds``), ``"cap"`` (not even its step under way ended within ``grace``) or its
        History's status.
    """
    try:
        with time_cap(seconds, grace=grace):
            history = run(spec, run_dir, progress=False)
        return history, history.status
    except KeyboardInterrupt:  # gnlib.experiment.train.RunInterrupted: stopped after a step, History saved
        return History.load(run_dir), "time"
    except PartTimeout:
        return (History.load(run_dir) if (run_dir / "history.jsonl").is_file() else None), "cap"


def study_part(size: CheckSize, base: RunSpec, lrs: Mapping[str, float], cap: float, out_dir: Path) -> dict[str, Any]:
    """Part 3: shared AdamW warm-up, then each optimizer of ``lrs`` for an equal share of the remaining time.

    Keeps to ``cap``: the warm-up may take :data:`WARMUP_SHARE` of it, all runs :data:`RUNS_SHARE` of it
    from the start, each run then :data:`GRACE_SHARE` of it more (at least :data:`MIN_GRACE_S`) to end its
    step and save its History.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_study_") as work:
        with time_cap(WARMUP_SHARE * cap):
            checkpoint = warmup_checkpoint(base, size.warmup_steps, root=Path(work) / "warmup")
        specs = {name: study_spec(base, name, size.micro_batches, lr, 0) for name, lr in lrs.items()}
        seconds = max(start + RUNS_SHARE * cap - time.perf_counter(), 0.01) / len(specs)
        ended = {}
        for name, spec in specs.items():
            spec = dataclasses.replace(spec, init_checkpoint=str(checkpoint))
            ended[name] = timed_run(spec, Path(work) / name, seconds, max(GRACE_SHARE * cap, MIN_GRACE_S))
    histories = {name: history for name, (history, _) in ended.items() if history is not None}
    curves = pd.concat(
        [history.evaluations().assign(optimizer=name) for name, history in histories.items()], ignore_index=True
    )
    runs = {
        name: {**summarize(history), "lr": lrs[name], "ended_by": ended[name][1]} for name, history in histories.items()
    }
    return {
        "preset": size.preset,
        "tokenizer": base.tokenizer,
        "tokens_per_step": specs[next(iter(specs))].tokens_per_step,
        "warmup_steps": size.warmup_steps,
        "seconds_per_run": seconds,
        "runs": runs,
        "not_run": [name for name, (history, _) in ended.items() if history is None],
        "curves": curves.to_dict(orient="list"),
        "figures": study_figures(curves, size, out_dir),
    }


def study_figures(curves: pd.DataFrame, size: CheckSize, out_dir: Path) -> list[str]:
    """Validation loss against steps and against seconds, one line per optimizer, as PNG files in ``out_dir``."""
    shape = f"{size.preset}, {size.micro_batches} × {size.batch} × {size.seq_len} tokens per step"
    names = []
    for x, label in (("step", "steps"), ("wall_time", "seconds")):
        figure = loss_curves(curves, x=x, y="val_loss", hue="optimizer", title=f"{shape}: loss vs {label}")
        figure.axes[0].set_xlabel("outer steps" if x == "step" else "seconds of training")
        names.append(f"study_loss_vs_{label}.png")
        atomic_write_bytes(out_dir / names[-1], to_png(figure))
    return names


def cuda_syncs(fn: Callable[[], object]) -> int:
    """Synchronizations CUDA reports while ``fn()`` runs (``torch.cuda.set_sync_debug_mode("warn")``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def host_reads_part(size: CheckSize, device: torch.device) -> dict[str, Any]:
    """Part 4: host reads (and on CUDA, reported synchronizations) of one GN outer step after a first one.

    The batches are drawn onto the device beforehand, so that the step's own reads alone are counted.
    """
    model = build_model(size.preset, seed=0, device=device, vocab_size=size.vocab_size)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(size.vocab_size, (4, size.batch, size.seq_len + 1), generator=generator).to(device)
    batches = itertools.cycle([(t[:, :-1], t[:, 1:]) for t in tokens])
    gn = GaussNewton(model, lambda: next(batches), inner_steps=size.micro_batches)
    gn.step()  # the inner optimizers' state is created
    with HostReads() as reads:
        gn.step()
    return {
        "preset": size.preset,
        "inner_steps": gn.inner_steps,
        "line_search_points": len(gn.line_search),
        "line_search_batches": gn.line_search_batches,
        "host_reads": reads.count,
        "cuda_syncs": cuda_syncs(gn.step) if device.type == "cuda" else None,
    }


def environment(device: torch.device) -> dict[str, Any]:
    """The machine, versions and date of the check."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _goal(goal: str, value: float | None, limit: float | None, met: bool | None) -> dict[str, Any]:
    """One row of :func:`goals`."""
    return {"goal": goal, "value": value, "limit": limit, "met": met}


def goals(parts: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The check's goals against its figures: ``goal``, ``value``, ``limit``, ``met`` (None: not measured).

    GN inner step ≤ :data:`MAX_INNER_TIME_RATIO` × a gradient step's time and ≤ :data:`MAX_INNER_MEMORY_RATIO`
    × its peak memory (bench, each precision); the gradient step's MFU (stated, no limit); host reads per GN
    outer step = :data:`HOST_READS_PER_OUTER_STEP`, and on CUDA the synchronizations the device reports.
    """
    rows = []
    throughput = parts.get("throughput", {})
    for dtype in DTYPES:
        bench = throughput.get(dtype, {}).get("bench", {})
        time_ratio, memory_ratio = bench.get("ratio", {}).get("gn_inner_step"), bench.get("peak_mem_ratio")
        for name, value, limit in (
            ("time", time_ratio, MAX_INNER_TIME_RATIO),
            ("peak memory", memory_ratio, MAX_INNER_MEMORY_RATIO),
        ):
            met = None if value is None else value <= limit
            rows.append(_goal(f"GN inner step / gradient step, {name} ({dtype})", value, limit, met))
        mfu = throughput.get(dtype, {}).get("mfu", {}).get("mfu")
        rows.append(_goal(f"gradient-step MFU ({dtype})", mfu, None, None))
    reads = parts.get("host_reads", {})
    for key, label in (("host_reads", "host reads"), ("cuda_syncs", "CUDA synchronizations")):
        value = reads.get(key)
        met = None if value is None else value == HOST_READS_PER_OUTER_STEP
        rows.append(_goal(f"{label} per GN outer step", value, HOST_READS_PER_OUTER_STEP, met))
    return rows


def _fmt(value: Any, spec: str = ".3g") -> str:
    """``value`` formatted by ``spec``; ``-`` for None."""
    return "-" if value is None else format(value, spec)


def _mib(nbytes: int | None) -> str:
    """Bytes in MiB, one decimal."""
    return _fmt(None if nbytes is None else nbytes / 2**20, ",.1f")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _throughput_lines(part: Mapping[str, Any]) -> list[str]:
    """Part 1's tables: steps per second and memory, then the bench's ratios and the MFU."""
    shape = f"{part['preset']}, vocabulary {part['vocab_size']:,}, {part['batch']} × {part['seq_len']} tokens"
    rows, ratios = [], []
    for dtype in DTYPES:
        figures = part[dtype]
        for name, row in figures["throughput"].items():
            rows.append([dtype, name, f"{row['tokens_per_s']:,.0f}", _mib(row["peak_mem_bytes"])])
        bench, mfu = figures["bench"], figures["mfu"]
        ratio = bench["ratio"]
        ratios.append(
            [dtype, f"{bench['grad_ms']:.1f}", *(_fmt(ratio.get(name), ".2f") for name in BENCH_MEASUREMENTS)]
            + [_fmt(bench.get("peak_mem_ratio"), ".2f"), f"{mfu['achieved_tflops']:.3g}", _fmt(mfu["mfu"], ".1%")]
            + [mfu["peak_source"]]
        )
    header = ["precision", "gradient step ms", *(f"{name} / grad" for name in BENCH_MEASUREMENTS)]
    header += ["peak memory inner / grad", "grad TFLOP/s", "MFU", "peak used"]
    return (
        [f"## 1. Throughput and memory ({shape})", ""]
        + _table(["precision", "measurement", "tokens/s", "peak MiB"], rows)
        + ["", "Bench (median times against the gradient step):", ""]
        + _table(header, ratios)
    )


def _large_lines(part: Mapping[str, Any]) -> list[str]:
    """Part 2's table: per precision the batch that fits, its steps' tokens/s and memory, the OOM point."""
    rows = []
    for dtype in DTYPES:
        fit = part[dtype]
        oom = "; ".join(f"batch {f['batch']}: {f['error']}" for f in fit["out_of_memory"]) or "none"
        steps = fit["figures"] or {}
        cells = [
            f"{steps[name]['tokens_per_s']:,.0f} ({_mib(steps[name]['peak_mem_bytes'])} MiB)" if name in steps else "-"
            for name in ("gradient_step", "gn_inner_steps")
        ]
        rows.append([dtype, _fmt(fit["batch"], "d"), *cells, oom])
    title = f"## 2. {part['preset']} at {part['asked_batch']} × {part['seq_len']} tokens"
    header = ["precision", "batch that fits", "gradient step tokens/s (peak)", "GN inner step tokens/s (peak)"]
    return [title, ""] + _table([*header, "out of memory"], rows)


def _study_lines(part: Mapping[str, Any]) -> list[str]:
    """Part 3's table of runs and its figures."""
    rows = [
        [name, _fmt(r["lr"], "g"), str(r["steps"]), f"{r['tokens']:,}", f"{r['wall_time_s']:.0f}"]
        + [_fmt(r["final_val_loss"], ".4f"), r["ended_by"]]
        for name, r in part["runs"].items()
    ]
    rows += [[name, "-", "0", "0", "0", "-", "not started in its time"] for name in part["not_run"]]
    header = ["optimizer", "lr", "outer steps", "tokens", "seconds", "final val loss", "ended by"]
    return (
        [f"## 3. Short study ({part['preset']}, {part['tokenizer']} tokens, {part['tokens_per_step']:,} per step)"]
        + [
            "",
            f"After a shared {part['warmup_steps']}-step AdamW warm-up, each run trains for about "
            f"{part['seconds_per_run']:.0f} s and is evaluated after every step (the seconds include evaluations).",
            "",
        ]
        + _table(header, rows)
        + [""]
        + [f"![{name}]({name})" for name in part["figures"]]
    )


def _host_reads_lines(part: Mapping[str, Any]) -> list[str]:
    """Part 4's figures in a sentence."""
    syncs = "" if part["cuda_syncs"] is None else f"; CUDA reported {part['cuda_syncs']} synchronizations"
    return [
        "## 4. Host reads per GN outer step",
        "",
        f"{part['host_reads']} host reads in one outer step of {part['inner_steps']} inner steps and a line search "
        f"of {part['line_search_points']} points on {part['line_search_batches']} batches{syncs}.",
    ]


PART_LINES: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "throughput": _throughput_lines,
    "large": _large_lines,
    "study": _study_lines,
    "host_reads": _host_reads_lines,
}


def format_report(result: Mapping[str, Any]) -> str:
    """The Markdown report of a :func:`run_check` result: machine, goals, parts' status, then each part's figures."""
    env = result["environment"]
    lines = [
        "# GPU check",
        "",
        f"{env['device_name']} ({env['device']}), torch {env['torch']}, CUDA {env['cuda']}, {env['date']}; "
        f"size {result['size']!r}.",
        "",
    ]
    goal_rows = [
        [g["goal"], _fmt(g["value"], ".3g"), _fmt(g["limit"], "g"), {True: "yes", False: "no", None: "-"}[g["met"]]]
        for g in result["goals"]
    ]
    lines += _table(["goal", "value", "limit", "met"], goal_rows) + [""]
    status = [[name, p["status"], f"{p['seconds']:.0f}", f"{p['cap_s']:g}"] for name, p in result["parts"].items()]
    lines += _table(["part", "status", "seconds", "cap (s)"], status)
    for name, part in result["parts"].items():
        lines.append("")
        lines += PART_LINES[name](part) if part["status"] == "ok" else [f"## {name}: {part['status']}", part["error"]]
    return "\n".join(lines) + "\n"


def run_check(
    out_dir: str | Path,
    device: str = "cuda",
    size: str = "study",
    *,
    tokenizer: str = "bytes",
    parts: Sequence[str] = PARTS,
    caps: Mapping[str, float] | None = None,
    peak: float | None = None,
    lrs: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Run the parts, writing ``gpu_check.json`` after each and ``gpu_check.md`` at the end (module docstring).

    Args:
        out_dir: folder for the JSON, the Markdown report and the study's figures (made if missing).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        size: a key of :data:`SIZES`.
        tokenizer: the study's tokens: ``"bytes"`` or ``"bpe:<n>"`` (trained on the embedded corpus).
        parts: which of :data:`PARTS` to run.
        caps: seconds per part replacing the size's (:attr:`CheckSize.caps`).
        peak: the chip's peak TFLOP/s for the MFU in every precision (default: :data:`PEAK_TFLOPS`).
        lrs: optimizer -> LR of the study (default: GN 0.01, Muon 0.03, the CPU study's best at its largest batch).

    Returns:
        ``environment``, ``size``, ``settings``, ``parts`` (name -> ``status``, ``seconds``, ``cap_s`` and its
        figures) and ``goals`` (:func:`goals`), as written to ``gpu_check.json``.

    Raises:
        ValueError: naming the parameter, before any part runs.
    """
    check_choice("size", size, SIZES)
    for name in parts:
        check_choice("parts", name, PARTS)
    if not (tokenizer == "bytes" or str(tokenizer).startswith("bpe:")):
        raise ValueError(f"tokenizer={tokenizer!r}: the check needs no download; allowed: 'bytes', 'bpe:<n>'")
    config = dataclasses.replace(SIZES[size], caps={**SIZES[size].caps, **(caps or {})})
    for name, seconds in config.caps.items():
        check_choice("caps", name, PARTS)
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"caps[{name!r}]={seconds!r} must be a positive number of seconds")
    dev = resolve_device(device)
    lrs = dict(lrs or {"gn": 0.01, "muon": 0.03})
    base = study_base(config, dev, tokenizer, lrs)
    out = check_writable(out_dir, parameter="out_dir")
    out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "throughput": lambda: throughput_part(config, dev, peak),
        "large": lambda: large_part(config, dev),
        "study": lambda: study_part(config, base, lrs, config.caps["study"], out),
        "host_reads": lambda: host_reads_part(config, dev),
    }
    result = {"environment": environment(dev), "size": size, "settings": dataclasses.asdict(config), "parts": {}}
    for name in parts:
        result["parts"][name] = run_part(jobs[name], config.caps[name], dev, capped=name == "study")
        result["goals"] = goals(result["parts"])
        atomic_write_json(out / JSON_NAME, result)
    atomic_write_text(out / REPORT_NAME, format_report(result))
    return result


def _caps(values: Sequence[str]) -> dict[str, float]:
    """``PART=SECONDS`` arguments as a dict (ValueError naming ``--cap`` when one has another form)."""
    caps = {}
    for value in values:
        name, _, seconds = value.partition("=")
        try:
            caps[name] = float(seconds)
        except ValueError:
            raise ValueError(f"--cap {value!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}") from None
    return caps


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``python -m gnlib.tools.gpu_check --help``); exit status 2 on a refused argument."""
    parser = argparse.ArgumentParser(prog="python -m gnlib.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for gpu_check.json, gpu_check.md and the study's figures")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    parser.add_argument("--size", default="study", help=f"shapes and caps: {', '.join(SIZES)} (default: study)")
    parser.add_argument("--tokenizer", default="bytes", help="the study's tokens: bytes (default) or bpe:<n>")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--cap", action="append", default=[], help="PART=SECONDS: another time cap for a part")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak TFLOP/s for the MFU")
    args = parser.parse_args(argv)
    try:
        result = run_check(
            args.out_dir,
            args.device,
            args.size,
            tokenizer=args.tokenizer,
            parts=[p for p in args.parts.split(",") if p],
            caps=_caps(args.cap),
            peak=args.peak_tflops,
        )
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({name: part["status"] for name, part in result["parts"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

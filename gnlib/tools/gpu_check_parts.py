"""The GPU check's four parts, each a function of the check's size and device that returns its figures.

1. :func:`throughput_part`: tokens/s, peak memory, the bench's ratios and the MFU at the study's shape;
2. :func:`large_part`: ``paper150m``'s steps, or the largest batch of it that fits;
3. :func:`study_part`: a short GN vs Muon study from a shared warm-up, within the part's time;
4. :func:`host_reads_part`: the host reads (and on CUDA, the synchronizations) of one GN outer step.

:data:`SIZES` holds the shapes and time caps of a run of the check; :func:`time_cap` stops a block at its cap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from gnlib.experiment.history import History
from gnlib.experiment.runs import RunSpec, run, summarize
from gnlib.experiment.study import study_spec, warmup_checkpoint
from gnlib.host_reads import HostReads
from gnlib.models import build_model
from gnlib.notebook.plots import loss_curves, to_png
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.runtime import atomic_write_bytes
from gnlib.tools.bench import run_benchmark
from gnlib.tools.throughput import AUTOCAST_DTYPES, run_throughput

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
#: The study part's shares of its cap: the warm-up at most, all runs together, and the grace a run has
#: to end its step under way, evaluate and write its History once asked to stop (at least MIN_GRACE_S).
WARMUP_SHARE, RUNS_SHARE, GRACE_SHARE, MIN_GRACE_S = 0.5, 0.75, 0.12, 5.0
#: Outer steps a study run is given: more than fit in its time, which ends it.
STUDY_MAX_STEPS = 100_000


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


#: Each size's fields side by side, (study, tiny): ``study`` is the study's shapes on a GPU (at most 410 s
#: of caps on an H200), ``tiny`` the code path on a CPU.
_SIZE_FIELDS: dict[str, tuple[Any, Any]] = {
    "preset": ("paper45m", "tiny"),
    "large_preset": ("paper150m", "small"),
    "vocab_size": (32000, 256),
    "batch": (32, 2),
    "seq_len": (1024, 32),
    "repeats": (2, 1),
    "throughput_steps": (3, 1),
    "micro_batches": (8, 2),
    "warmup_steps": (50, 2),
    "val_batches": (2, 1),
    "corpus_bytes": (2**26, 2**20),
    "caps": (
        {"throughput": 110, "large": 60, "study": 200, "host_reads": 40},
        {"throughput": 60, "large": 30, "study": 12, "host_reads": 30},
    ),
}
SIZES: dict[str, CheckSize] = {
    name: CheckSize(**{field: values[i] for field, values in _SIZE_FIELDS.items()})
    for i, name in enumerate(("study", "tiny"))
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
    """Part 1 in one precision: throughput rows, the bench's ratios and peaks, and the gradient step's MFU.

    The gradient step's model FLOPs utilization is MFU = F / t / P, with F the matrix-product FLOPs counted
    in one gradient step (:func:`gnlib.curvature.costs.count_flops`), t its median time and P the chip's
    dense peak for the precision the products ran in (:func:`peak_tflops`).
    """
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
    """Part 1: :func:`throughput_figures` in each of :data:`DTYPES`, at ``size.preset``'s shape.

    In float32 and under ``torch.autocast`` in bfloat16 (parameters, optimizer state and Δ stay float32):
    tokens/s and peak memory of AdamW gradient steps and GN inner steps
    (:func:`gnlib.tools.throughput.run_throughput`); the bench's (:func:`gnlib.tools.bench.run_benchmark`)
    GN inner step, ``ggn_vp_cached``, line search and outer step against a gradient step, in time and peak
    memory; and the gradient step's MFU.
    """
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
    """Part 2: one gradient step and one GN inner step of ``size.large_preset`` in each precision.

    Tokens/s and peak memory at ``size.batch``, or, where that runs out of memory, the largest batch that
    fits and the smallest that does not, with the allocator's message (:func:`largest_fitting`).
    """

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

    On the embedded corpus (no download): tokens as bytes (or ``bpe:<n>``) fed to the ``size.vocab_size``
    model in random windows of T tokens; a shared AdamW warm-up
    (:func:`gnlib.experiment.study.warmup_checkpoint`), then GN and Muon (the best baseline of the CPU
    study) at one large batch, m micro-batches of B × T per outer step (GN: m inner steps; Muon: m
    accumulated micro-batches), each stopped after the step under way at the end of its share
    (:func:`timed_run`) and evaluated after every step. Validation loss against steps and against seconds
    (evaluations included) is returned as curves and drawn in ``study_loss_vs_steps.png`` and
    ``study_loss_vs_seconds.png`` (:func:`study_figures`).

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

    Host reads of tensor values during one GN outer step with its default line search
    (:class:`gnlib.host_reads.HostReads`; the claim is four), and on CUDA the synchronizations the device
    itself reports (:func:`cuda_syncs`): host reads, and blocking copies between host and device, which
    also wait for the queued work.

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

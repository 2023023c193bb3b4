"""The study's scale on a GPU in one command: ``python -m gnlib.tools.gpu_check OUT_DIR --device cuda``.

Four parts (:mod:`gnlib.tools.gpu_check_parts`), each under its own time cap (``--cap PART=SECONDS`` changes
one), so that a slow or failing part cannot take the others' time; the results are written to
``OUT_DIR/gpu_check.json`` after every part and summarized in ``OUT_DIR/gpu_check.md`` with the goals met or
missed (:mod:`gnlib.tools.gpu_check_report`). ``--size tiny`` runs every part on the CPU with tiny models in
seconds (the test suite does); the default, ``--size study``, takes at most about 7 minutes on an H200.
Asking for ``--device cuda`` where torch sees no CUDA device exits with status 2 and a one-line message.

Example (from a checkout, with torch and the packages of ``requirements.txt``)::

    PYTHONPATH=. python3 -m gnlib.tools.gpu_check outputs/gpu_check --device cuda

What the parts measure and the goals: docs/costs.md, section "GPU check".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gnlib.checks import check_writable
from gnlib.runtime import atomic_write_json, atomic_write_text, check_choice, resolve_device
from gnlib.tools.gpu_check_parts import (
    SIZES,
    PartTimeout,
    host_reads_part,
    large_part,
    study_base,
    study_part,
    throughput_part,
    time_cap,
)
from gnlib.tools.gpu_check_report import format_report, goals

#: The parts, in the order they run.
PARTS = ("throughput", "large", "study", "host_reads")
JSON_NAME, REPORT_NAME = "gpu_check.json", "gpu_check.md"


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

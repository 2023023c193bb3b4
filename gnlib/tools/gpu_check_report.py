"""The GPU check's goals, read off its figures, and its Markdown report (``gpu_check.md``).

:func:`goals` states each goal met or missed; :func:`format_report` writes the machine, the goals, each
part's status and then each part's figures as tables, with the study's figures linked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gnlib.tools.gpu_check_parts import BENCH_MEASUREMENTS, DTYPES

#: Goals of the check: GN's inner step against a gradient step, in time and in peak memory.
MAX_INNER_TIME_RATIO = 1.8
MAX_INNER_MEMORY_RATIO = 2.0
#: Host reads of one GN outer step, whatever its inner steps and line-search points (gnlib.optim.gauss_newton).
HOST_READS_PER_OUTER_STEP = 4


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

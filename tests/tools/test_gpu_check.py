"""The GPU check's code path on the CPU: every part's figures, the report, the figures and the refusals."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gnlib.tools import gpu_check_report
from gnlib.tools.gpu_check import JSON_NAME, PARTS, REPORT_NAME, main, run_check
from gnlib.tools.gpu_check_parts import BENCH_MEASUREMENTS, DTYPES, PartTimeout, largest_fitting, peak_tflops, time_cap
from gnlib.tools.gpu_check_report import HOST_READS_PER_OUTER_STEP

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Installed here, absent on the GPU machine: the check must import and refuse without them.
ABSENT_ON_GPU_MACHINE = (
    "IPython",
    "ipywidgets",
    "papermill",
    "nbformat",
    "nbclient",
    "jupyter_client",
    "datasets",
    "pyarrow",
    "pytest",
)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One tiny run of the whole check through its command line: (JSON, Markdown, folder, stdout)."""
    out = tmp_path_factory.mktemp("gpu_check")
    argv = [str(out), "--device", "cpu", "--size", "tiny", "--peak-tflops", "1"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(argv) == 0
    seconds = time.perf_counter() - start
    lines = stdout.getvalue().splitlines()
    return json.loads((out / JSON_NAME).read_text()), (out / REPORT_NAME).read_text(), out, lines, seconds


def test_every_part_ran_within_its_cap_and_the_goals_are_read_off_them(checked):
    result, _, _, lines, seconds = checked
    parts = result["parts"]
    assert set(parts) == set(PARTS)  # the file holds them with sorted keys
    assert json.loads(lines[-1]) == {name: "ok" for name in PARTS}
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("traceback"))
        assert part["seconds"] <= part["cap_s"] + 1
    assert seconds < sum(part["cap_s"] for part in parts.values())
    assert result["environment"]["torch"] == torch.__version__ and result["size"] == "tiny"
    goals = {goal["goal"]: goal for goal in result["goals"]}
    reads = goals["host reads per GN outer step"]
    assert (reads["value"], reads["met"]) == (HOST_READS_PER_OUTER_STEP, True)
    assert goals["CUDA synchronizations per GN outer step"]["value"] is None  # counted on CUDA only
    for dtype in DTYPES:
        bench = parts["throughput"][dtype]["bench"]
        time_goal = goals[f"GN inner step / gradient step, time ({dtype})"]
        assert time_goal["value"] == bench["ratio"]["gn_inner_step"]
        assert time_goal["met"] == (time_goal["value"] <= gpu_check_report.MAX_INNER_TIME_RATIO)
        assert goals[f"GN inner step / gradient step, peak memory ({dtype})"]["value"] == bench["peak_mem_ratio"]
        assert goals[f"gradient-step MFU ({dtype})"]["value"] == parts["throughput"][dtype]["mfu"]["mfu"]


def test_throughput_part_has_tokens_per_second_memory_bench_ratios_and_mfu_in_both_precisions(checked):
    part = checked[0]["parts"]["throughput"]
    assert (part["preset"], part["batch"], part["seq_len"]) == ("tiny", 2, 32)
    for dtype in DTYPES:
        figures = part[dtype]
        assert set(figures["throughput"]) == {"gradient_step", "gn_inner_steps"}
        for row in figures["throughput"].values():
            assert positive(row["tokens_per_s"]) and positive(row["peak_mem_bytes"])
        bench = figures["bench"]
        assert set(bench["ratio"]) == set(BENCH_MEASUREMENTS)  # only what the check reads is measured
        assert all(positive(bench["ratio"][name]) for name in BENCH_MEASUREMENTS)
        assert positive(bench["peak_mem_ratio"]) and positive(bench["grad_ms"])
        mfu = figures["mfu"]
        assert positive(mfu["grad_flops"]) and mfu["grad_flops"] == bench["flops"]["grad"]
        assert mfu["achieved_tflops"] == pytest.approx(mfu["grad_flops"] / (bench["grad_ms"] / 1e3) / 1e12)
        assert (mfu["peak_tflops"], mfu["peak_source"]) == (1.0, "--peak-tflops")
        assert mfu["mfu"] == pytest.approx(mfu["achieved_tflops"])


def test_large_part_fits_its_batch_and_measures_both_steps(checked):
    part = checked[0]["parts"]["large"]
    assert (part["preset"], part["asked_batch"]) == ("small", 2)
    for dtype in DTYPES:
        fit = part[dtype]
        assert (fit["batch"], fit["out_of_memory"]) == (2, [])
        assert positive(fit["figures"]["params"])
        for name in ("gradient_step", "gn_inner_steps"):
            assert positive(fit["figures"][name]["tokens_per_s"]) and positive(fit["figures"][name]["peak_mem_bytes"])


def test_study_part_trains_gn_and_muon_from_one_warm_up_and_draws_both_curves(checked):
    result, _, out, _, _ = checked
    part = result["parts"]["study"]
    assert set(part["runs"]) == {"gn", "muon"} and part["not_run"] == []
    assert part["tokens_per_step"] == 2 * 2 * 32  # m micro-batches of B x T
    for name, summary in part["runs"].items():
        assert summary["ended_by"] == "time" and summary["steps"] >= 1, (name, summary)
        assert positive(summary["final_val_loss"]) and positive(summary["wall_time_s"])
    curves = part["curves"]
    assert set(curves["optimizer"]) == {"gn", "muon"}
    for name in ("gn", "muon"):
        losses = [v for v, o in zip(curves["val_loss"], curves["optimizer"]) if o == name]
        steps = [s for s, o in zip(curves["step"], curves["optimizer"]) if o == name]
        assert steps[0] == 0 and steps == sorted(steps) and all(positive(v) for v in losses)
        assert min(losses[1:]) < losses[0]  # training lowers the loss after the warm-up
    assert part["figures"] == ["study_loss_vs_steps.png", "study_loss_vs_seconds.png"]
    for name in part["figures"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_markdown_report_names_each_part_and_its_figures(checked):
    result, report, _, _, _ = checked
    parts = result["parts"]
    for heading in ("# GPU check", "## 1. Throughput", "## 2. small", "## 3. Short study", "## 4. Host reads"):
        assert heading in report
    row = parts["throughput"]["float32"]["throughput"]["gradient_step"]
    assert f"{row['tokens_per_s']:,.0f}" in report
    assert f"| float32 | {parts['throughput']['float32']['bench']['grad_ms']:.1f} |" in report
    assert f"{HOST_READS_PER_OUTER_STEP} host reads in one outer step of 2 inner steps" in report
    for name in parts["study"]["figures"]:
        assert f"![{name}]({name})" in report
    for goal in result["goals"]:
        assert goal["goal"] in report


def test_cuda_without_cuda_is_refused_in_one_line_with_status_2_and_imports_without_notebook_packages(tmp_path):
    # as on the GPU machine: none of the notebook, hub or test packages; CUDA hidden from torch
    blocker = (
        "import sys, runpy\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {ABSENT_ON_GPU_MACHINE!r}:\n"
        "            raise ImportError(f'{name} is not installed')\n"
        "sys.meta_path.insert(0, Absent())\n"
        "sys.argv = ['gpu_check', *sys.argv[1:]]\n"
        "runpy.run_module('gnlib.tools.gpu_check', run_name='__main__')\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", blocker, str(out), "--device", "cuda"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "device='cuda'" in done.stderr and "CUDA is not available" in done.stderr
    assert not out.exists()


def test_run_check_refuses_bad_values_naming_the_parameter(tmp_path):
    cases = [
        ({"size": "huge"}, "size"),
        ({"parts": ["throughput", "speed"]}, "parts"),
        ({"tokenizer": "t5"}, "tokenizer"),
        ({"caps": {"study": -1}}, r"caps\['study'\]"),
        ({"caps": {"warmup": 5}}, "caps"),
    ]
    for kwargs, parameter in cases:
        with pytest.raises(ValueError, match=parameter):
            run_check(tmp_path / "out", "cpu", **{"size": "tiny", **kwargs})
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "out"), "--device", "cpu", "--cap", "study"]) == 2


def test_largest_fitting_halves_then_bisects_to_the_out_of_memory_point():
    def measure(limit):
        def call(batch):
            if batch > limit:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {batch}\nmore")
            return {"batch": batch}

        return call

    assert largest_fitting(measure(64), 32) == {"batch": 32, "figures": {"batch": 32}, "out_of_memory": []}
    found = largest_fitting(measure(5), 32)
    assert (found["batch"], found["figures"]) == (5, {"batch": 5})
    assert found["out_of_memory"] == [{"batch": b, "error": f"CUDA out of memory at batch {b}"} for b in (32, 16, 8, 6)]
    assert largest_fitting(measure(0), 4)["batch"] is None


def test_time_cap_stops_a_block_and_peak_needs_a_known_chip():
    start = time.perf_counter()
    with pytest.raises(PartTimeout, match="cap of 0.05 s"):
        with time_cap(0.05):
            time.sleep(5)
    assert time.perf_counter() - start < 2
    with time_cap(5):
        pass
    time.sleep(0.01)  # the timer was cancelled on leaving the block
    assert peak_tflops(torch.device("cpu"), "float32") == (None, "no peak known for this device: pass --peak-tflops")
    assert peak_tflops(torch.device("cpu"), "bfloat16", 400.0) == (400.0, "--peak-tflops")

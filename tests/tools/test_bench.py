"""The benchmark (gnlib.tools.bench): its JSON keys, its table, page faults and compiled steps; never its timings."""

import json

import pytest
import torch

from gnlib.curvature import costs
from gnlib.curvature.costs import FLOP_PASS_COSTS, PASSES
from gnlib.tools.bench import MEASUREMENTS, OUTER, format_table, minor_page_faults, run_benchmark
from gnlib.tools.bench import main as bench_main


@pytest.fixture
def fresh_memory_cache(monkeypatch):
    """No pass costs measured earlier in this process: each test measures its own."""
    monkeypatch.setattr(costs, "_MEASURED", {})


def test_bench_runs_end_to_end_in_json_mode(capsys):
    bench_main(["--preset", "tiny", "--batch", "2", "--seq-len", "8", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    for key in ("preset", "device", "params", "grad_ms", "ratio", "peak_mem_ratio", "layerwise_over_full"):
        assert key in result
    assert set(result["ratio"]) == set(MEASUREMENTS) - {"grad"}
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["peak_mem_ratio"] > 0
    assert set(result["minor_faults"]) == set(MEASUREMENTS)
    assert all(isinstance(n, int) and n >= 0 for n in result["minor_faults"].values())
    assert result["layerwise_blocks"] == 4  # embed, block0, block1, head
    assert set(result["flop_ratio"]) == set(MEASUREMENTS) - {"grad"}
    assert result["flop_ratio"]["gn_inner_step"] == pytest.approx(5 / 3, rel=1e-12)  # primal, 2 tangent, 2 backward
    assert result["flop_ratio"]["ggn_vp_cached"] == pytest.approx(4 / 3, rel=1e-12)  # two backward passes
    assert result["layerwise_over_full_flops"] == pytest.approx(
        result["flop_ratio"]["layerwise_inner_step"] / result["flop_ratio"]["gn_inner_step"]
    )


def test_bench_table_is_clean(capsys):
    bench_main(["--preset", "tiny", "--batch", "2", "--seq-len", "8", "--repeats", "1", "--outer-repeats", "0"])
    captured = capsys.readouterr()
    assert "USDT" not in captured.out + captured.err
    lines = captured.out.splitlines()
    header = ["measurement", "median", "ms", "x", "grad", "cpu", "x", "grad", "flops", "x", "grad", "page", "faults"]
    assert lines[1].split() == header
    end = next(i for i, line in enumerate(lines) if line.startswith("layerwise_inner_step / gn_inner_step = "))
    assert [line.split()[0] for line in lines[2:end]] == [m for m in MEASUREMENTS if m not in OUTER]
    assert lines[end + 1].startswith("peak memory")


def test_bench_counts_the_pages_a_fresh_buffer_takes():
    nbytes = 64 * 2**20  # above glibc's largest mmap threshold: a fresh mapping the kernel zeroes on first touch
    before = minor_page_faults()
    buffer = torch.ones(nbytes // 4)
    faults = minor_page_faults() - before
    del buffer
    assert faults >= nbytes // (2 * 2**20)  # one fault per 2 MiB at least, should transparent huge pages back it


def test_bench_times_compiled_steps_apart_from_their_compilation():
    result = run_benchmark("tiny", batch=2, seq_len=8, repeats=1, outer_repeats=0, compile=True, n_layers=1)
    assert set(result["compile_seconds"]) == {"grad_compiled", "gn_inner_step_compiled"}
    assert all(seconds > 0 for seconds in result["compile_seconds"].values())
    assert {"grad_compiled", "gn_inner_step_compiled"} <= set(result["ratio"])
    assert result["compiled_inner_over_grad"] == result["ms"]["gn_inner_step_compiled"] / result["ms"]["grad_compiled"]
    assert "gn_inner_step_compiled / grad_compiled" in format_table(result)


def test_bench_prints_the_pass_costs_a_run_uses_beside_its_ratios(capsys, fresh_memory_cache):
    bench_main(
        ["--preset", "tiny", "--batch", "2", "--seq-len", "8", "--repeats", "1", "--outer-repeats", "1", "--json"]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["vocab_size"] == 256
    assert result["pass_costs"]["flops"] == FLOP_PASS_COSTS
    assert set(result["pass_costs"]["measured"]) == set(PASSES) and min(result["pass_costs"]["measured"].values()) > 0
    # each priced measurement: its passes weighed by each model (checked here for the FLOP model by hand)
    assert result["passes"]["gn_inner_step"] == {"forward": 1, "tangent": 1, "backward": 1}
    assert result["priced"]["gn_inner_step"]["flops"] == pytest.approx(5 / 3)
    assert result["passes"]["line_search"] == {"forward": 2 * 6, "tangent": 2, "backward": 0}  # 2 batches, 5 α
    assert result["passes"]["outer_step_full"] == {"forward": 8 + 12, "tangent": 8 + 2, "backward": 8}
    assert result["priced"]["outer_step_full"]["flops"] == pytest.approx(56 / 3)
    assert set(result["priced"]) <= set(result["ratio"])
    small = ["--batch", "2", "--seq-len", "8", "--repeats", "1", "--outer-repeats", "0"]
    bench_main(["--preset", "tiny", "--vocab", "300", *small])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("preset=tiny vocab=300 ")
    start = lines.index(next(line for line in lines if line.startswith("pass costs (x grad)")))
    assert lines[start].split()[-2:] == ["measured", "flops"]
    assert [line.split()[0] for line in lines[start + 1 : start + 4]] == list(PASSES)
    assert lines[start + 4].split()[-3:] == ["measured", "flops", "timed"]
    assert [line.split()[0] for line in lines[start + 5 :]] == ["gn_inner_step", "layerwise_inner_step", "line_search"]

"""The GPU check's code path (``python -m gnlib.tools.throughput``), run on the CPU with a tiny reference model."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnlib.tools.throughput import format_table, main, run_throughput

TINY = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)


def test_throughput_reports_tokens_per_second_and_peak_memory_for_both_steps():
    result = run_throughput("paper_tiny", vocab_size=300, batch=2, seq_len=16, steps=2, **TINY)
    assert [r["name"] for r in result["rows"]] == ["gradient_step", "gn_inner_steps"]
    assert (result["vocab_size"], result["batch"], result["seq_len"]) == (300, 2, 16)
    assert result["params"] == 2 * 300 * 16 + 2 * 16 * 16 * 2 + 4 * 16 * 16 + 2 * 16 + 4 * 16 + 16
    for row in result["rows"]:
        assert row["tokens"] == 2 * 2 * 16
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"]) and row["seconds"] > 0
        assert row["peak_mem_bytes"] > 0


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes the matrix products of a call run in."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.dtypes.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_autocast_runs_both_steps_products_in_its_dtype(autocast):
    with _MatmulDtypes() as seen:
        result = run_throughput("paper_tiny", vocab_size=64, batch=2, seq_len=8, steps=1, autocast=autocast, **TINY)
    assert seen.dtypes == ({torch.bfloat16} if autocast else {torch.float32})
    assert result["autocast"] == autocast
    assert f"autocast={autocast or 'off (float32)'}" in format_table(result).splitlines()[0]
    assert all(row["tokens_per_s"] > 0 for row in result["rows"])


def test_command_line_prints_json(capsys):
    main(["--preset", "paper_tiny", "--vocab", "64", "--batch", "2", "--seq-len", "8", "--steps", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "paper_tiny" and printed["vocab_size"] == 64 and len(printed["rows"]) == 2


def test_bad_sizes_name_the_parameter():
    with pytest.raises(ValueError, match="seq_len=2048.*max_seq_len=128"):
        run_throughput("paper_tiny", vocab_size=64, seq_len=2048)
    with pytest.raises(ValueError, match="vocab_size=0"):
        run_throughput("paper_tiny", vocab_size=0)
    with pytest.raises(ValueError, match="preset='paper1b'"):
        run_throughput("paper1b")
    with pytest.raises(ValueError, match="autocast='float8'.*bfloat16"):
        run_throughput("paper_tiny", vocab_size=64, autocast="float8")

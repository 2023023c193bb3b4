"""The study's grids use the reference model, T5 tokens and C4 streamed; a CPU miniature of that pipeline runs here.

The miniature executes the iteration-complexity notebook with the 45M grid's own parameters, changing only
what needs a GPU or the hub: a tiny model of the same architecture, BPE tokens trained on the embedded
corpus instead of T5's, the embedded corpus's packed stream instead of C4's, and small sizes.
"""

import json
from pathlib import Path

import pandas as pd
import papermill
import pytest
import yaml

from gnlib.experiment.runs import RunSpec
from gnlib.models import REFERENCE, model_config
from gnlib.tools.sweep_grid import load_grid

ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "notebooks" / "grids"
NOTEBOOK = ROOT / "notebooks" / "02_iteration_complexity.ipynb"
MINIATURE = {  # what the CPU miniature changes in the paper grid
    "preset": "paper_tiny",
    "model_overrides": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
    "corpus": "default",
    "tokenizer": "bpe:384",
    "corpus_bytes": 300_000,
    "device": "cpu",
    "batch_size": 4,
    "seq_len": 32,
    "max_steps": 4,
    "warmup_steps": 4,
    "warmup_lr": 0.01,
    "target_loss": 5.9,
    "eval_every": 1,
    "val_batches": 2,
}


@pytest.mark.parametrize("preset", ["paper45m", "paper150m"])
def test_paper_grids_use_the_reference_model_t5_tokens_and_c4_streamed(preset):
    spec = load_grid(GRIDS / f"{preset}_study.yaml", cwd=ROOT)
    p = spec["parameters"]
    assert (p["preset"], p["model_overrides"], p["tokenizer"], p["corpus"]) == (preset, {}, "t5", "hf:allenai/c4:en")
    assert (p["data"], p["data_epochs"], p["batch_size"], p["seq_len"]) == ("stream", 1, 32, 1024)
    assert p["warmup_steps"] * p["batch_size"] * p["seq_len"] == 32_768_000  # the reference's warm-up tokens
    assert 122 in spec["grid"]["micro_batches"]
    config = model_config(preset)
    assert {k: getattr(config, k) for k in REFERENCE} == REFERENCE and config.vocab_size == 32000
    notebook_parameters = papermill.inspect_notebook(str(NOTEBOOK))
    assert set(p) <= set(notebook_parameters)
    fields = {k: p[k] for k in ("preset", "corpus", "tokenizer", "data", "data_epochs", "batch_size", "seq_len")}
    RunSpec(**fields, optimizer="gn", hyperparameters={"inner_steps": 122}).validate()  # no hub needed to check


def test_cpu_miniature_of_the_paper_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("GNLIB_OUTPUT_ROOT", str(tmp_path))  # the tokenizer cache goes under tmp_path/outputs
    grid = yaml.safe_load((GRIDS / "paper45m_study.yaml").read_text())
    parameters = {
        **grid["parameters"],
        **MINIATURE,
        "optimizers": ["gn", "adamw"],
        "micro_batches": [2],
        "lr_grids": {"gn": [0.01], "adamw": [0.01]},
        "seeds": [0],
        "hyperparameters": {"gn": {"ema": 0.5}},  # the EMA of 0.999 would stay at the warm-up's loss for 4 steps
        "warmup_dir": str(tmp_path / "warmup"),
        "output_dir": str(tmp_path / "study"),
    }
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters=parameters,
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
    )
    warmup_tokens = 4 * 4 * 32
    for optimizer, batches_per_step in (("gn", 2 + 2), ("adamw", 2)):  # GN: 2 inner + 2 line-search batches
        run_dir = tmp_path / "study" / "runs" / optimizer / "m=2" / "lr=0.01" / "seed=0"
        metadata = json.loads((run_dir / "metadata.json").read_text())
        corpus, model = metadata["corpus"], metadata["model"]
        assert (corpus["data"], corpus["tokenizer"], corpus["vocab_size"], model["vocab_size"]) == (
            "stream",
            "bpe:384",
            384,
            384,
        )
        assert (model["mlp"], model["qk_norm"], model["init"]) == ("gelu", True, "fan_in")
        assert corpus["data_start"] == warmup_tokens  # the studied runs continue after the warm-up's tokens
        assert corpus["tokens_needed"] == warmup_tokens + 4 * batches_per_step * 4 * 32 + 1
        assert corpus["passes"] == 1 and corpus["tokens_available"] > corpus["tokens_needed"]
        # from 6.13 after the warm-up: GN's EMA 5.85 at step 3 (its raw iterate 5.87 at step 2), AdamW 5.76 at step 2
        assert metadata["status"] == "reached_target"
        assert corpus["document_order"]["prefix_documents"] > 0  # the warm-up's documents come first, then seed 0's
    gn = pd.read_csv(tmp_path / "study" / "results.csv").set_index("optimizer").loc["gn"]
    assert gn["steps_to_target_raw"] < gn["steps_to_target"]  # read off both: the EMA trails the raw iterate
    [warmup] = (tmp_path / "warmup").glob("*/run/metadata.json")
    assert json.loads(warmup.read_text())["corpus"]["data_start"] == 0
    assert list((tmp_path / "outputs" / "tokenizers").glob("bpe-384-*.json"))  # trained once, cached

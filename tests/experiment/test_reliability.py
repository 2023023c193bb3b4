"""No lost work, no silent failure: divergence and stalls, refused overwrites, locks, checkpoints, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gnlib.checks import check_writable
from gnlib.data import load_corpus
from gnlib.experiment.history import METADATA
from gnlib.experiment.run_folder import CHECKPOINT, RunFolderBusy, run_folder_lock
from gnlib.experiment.runs import RunSpec, run, summarize
from gnlib.experiment.study import _cached_warmup_problem, warmup_checkpoint
from gnlib.experiment.train import TrainSettings, train
from gnlib.models import build_model
from gnlib.optim.gauss_newton import GaussNewton
from gnlib.tools.train_cli import cli, parse_value, read_config

REPO = Path(__file__).resolve().parents[2]
SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}
TINY_RUN = dict(preset="tiny", steps=2, batch_size=2, seq_len=16, eval_every=1, val_batches=1, model_overrides=SMALL)


def gn_run(**options):
    """A one-inner-step GN run with the plain SGD inner solver at a huge inner LR (inner_lr=100)."""
    corpus = load_corpus()
    model = build_model("tiny", seed=0, **SMALL)
    batches = corpus.sampler("train", 2, 16, seed=0)
    optimizer = GaussNewton(
        model, batches, inner_lr=100.0, inner_steps=1, solver="sgd", line_search_batches=1, **options
    )
    return model, optimizer, batches, corpus.fixed_batches("val", 2, 16, 1)


def test_gn_blow_up_without_line_search_is_diverged_with_reason():
    model, optimizer, batches, val = gn_run(line_search=None)
    history = train(model, optimizer, batches, val, TrainSettings(steps=6, eval_every=1, progress=False))
    assert history.status == "diverged" and history.rows[-1]["step"] < 6
    assert "exceeds 10x the start" in history.reason
    row = summarize(history)
    assert (row["status"], row["status_reason"]) == ("diverged", history.reason)


def test_gn_with_every_step_rejected_is_stalled(tmp_path):
    model, optimizer, batches, val = gn_run(line_search=(1.0, 0.5, 0.25))
    history = train(
        model,
        optimizer,
        batches,
        val,
        TrainSettings(steps=6, eval_every=1, stall_steps=3, run_dir=tmp_path, progress=False),
    )
    assert history.status == "stalled" and [r["alpha"] for r in history.rows[1:]] == [0.0] * 3
    assert "no step taken in the last 3 outer steps" in history.reason
    saved = json.loads((tmp_path / METADATA).read_text())
    assert (saved["status"], saved["status_reason"]) == ("stalled", history.reason)


def test_a_run_with_other_settings_is_refused_naming_both_and_the_way_out(tmp_path):
    first = run(RunSpec(**TINY_RUN), tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=r"spec\.seed: 0 there, 1 now.*overwrite=True.*--overwrite") as err:
        run(RunSpec(**TINY_RUN, seed=1), tmp_path, progress=False)
    assert "spec.steps" not in str(err.value)
    assert (tmp_path / CHECKPOINT).read_bytes() == before  # nothing lost
    replaced = run(RunSpec(**TINY_RUN, seed=1), tmp_path, progress=False, overwrite=True)
    assert replaced.metadata["spec"]["seed"] == 1 and first.metadata["spec"]["seed"] == 0
    assert json.loads((tmp_path / METADATA).read_text())["spec"]["seed"] == 1


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from gnlib.experiment.run_folder import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match="in use by another run"):
            run(RunSpec(**TINY_RUN), tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / METADATA).exists()
    assert run(RunSpec(**TINY_RUN), tmp_path, progress=False).status == "completed"  # a killed holder frees it


def test_unwritable_output_folder_is_refused_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the outputs folder should be")  # unwritable even for root
    started = []
    monkeypatch.setattr("gnlib.experiment.runs.build_run", lambda spec: started.append(spec))
    with pytest.raises(ValueError, match="output_dir=.*outputs/run' cannot be written.*choose another output_dir"):
        run(RunSpec(**TINY_RUN), blocker / "run", progress=False)
    assert started == []
    with pytest.raises(ValueError, match="MiB free; this run needs about"):
        check_writable(tmp_path, need_bytes=2**62)


def test_checkpoint_temporaries_removed_and_loaded_on_the_models_device(tmp_path, monkeypatch):
    spec = RunSpec(**TINY_RUN)
    run(spec, tmp_path, progress=False, checkpoint_every=1)
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or original(*a, **k))
    again = run(spec, tmp_path, progress=False)
    assert not stale.exists() and again.status == "completed"
    assert torch.device("cpu") in loads


@pytest.mark.parametrize("content", [b"PK\x03\x04truncated", None], ids=["truncated", "foreign"])
def test_unreadable_checkpoint_is_named_moved_aside_and_the_run_restarts(tmp_path, capsys, content):
    spec = RunSpec(**TINY_RUN)
    reference = run(spec, tmp_path / "reference", progress=False)
    run(spec, tmp_path / "run", progress=False)
    if content is None:
        torch.save({"weights": torch.zeros(2)}, tmp_path / "run" / CHECKPOINT)
    else:
        (tmp_path / "run" / CHECKPOINT).write_bytes(content)
    history = run(spec, tmp_path / "run", progress=True)
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run' / CHECKPOINT} cannot be read" in out and "starting this run afresh" in out
    aside = list((tmp_path / "run").glob("checkpoint.pt.unreadable-*"))
    assert len(aside) == 1 and aside[0].name in out
    assert [r["val_loss"] for r in history.rows] == [r["val_loss"] for r in reference.rows]


def test_diverged_warmup_is_not_cached_and_bad_cache_entries_are_rebuilt(tmp_path):
    base = RunSpec(**TINY_RUN)
    with pytest.raises(RuntimeError, match="warm-up .* ended 'diverged'.*nothing was cached.*Lower warmup_lr"):
        warmup_checkpoint(base, 3, lr=1e4, root=tmp_path)
    assert not list(tmp_path.glob("*/model.pt"))

    path = warmup_checkpoint(base, 2, lr=3e-3, root=tmp_path)
    assert _cached_warmup_problem(path.parent, path.parent.name) is None
    good = torch.load(path, weights_only=True)
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in good.items()}
    torch.save(poisoned, path)
    assert _cached_warmup_problem(path.parent, path.parent.name) == "its weights are not finite"
    assert warmup_checkpoint(base, 2, lr=3e-3, root=tmp_path) == path
    rebuilt = torch.load(path, weights_only=True)
    assert all(torch.equal(rebuilt[k], good[k]) for k in good)
    settings = json.loads((path.parent / "settings.json").read_text())
    (path.parent / "settings.json").write_text(json.dumps({**settings, "lr": 1.0}))
    assert "does not match" in _cached_warmup_problem(path.parent, path.parent.name)


@pytest.mark.parametrize(
    "config, flags, match",
    [
        (
            "lr: '3e-3'\n",
            [],
            r"optimizer 'adamw': lr='3e-3' is invalid; allowed: a finite number > 0.*a string: in YAML write floats",
        ),
        (
            "steps: true\n",
            [],
            r"steps=True is invalid; allowed: an integer >= 1 \(a bool is not a number\).*settings from config",
        ),
        ("optimizer: [gn\n", [], r"config .*run\.yaml is not valid YAML.*run\.yaml"),
        ('{"optimizer": "gn",}', [], r"config .*run\.json is not valid JSON.*line 1"),
        (b"\x80\x81binary", [], r"config .*run\.yaml is not UTF-8 text"),
        ("target_loss: -1\n", [], r"target_loss=-1 is invalid; allowed: None or a finite number >= 0"),
        ("optimizer: gn\n", ["--lr", "-0.01"], r"optimizer 'gn': lr=-0\.01 is invalid; allowed: .* > 0.*and flags"),
    ],
)
def test_cli_bad_input_is_named_with_the_file_and_exits_2(tmp_path, capsys, config, flags, match):
    path = tmp_path / ("run.json" if "json" in match else "run.yaml")
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    assert cli(["--config", str(path), "--output_dir", str(tmp_path / "out"), *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error and "<unicode string>" not in error
    assert re.search(match, error, flags=re.S), error


def test_cli_reads_exponents_as_numbers_in_files_and_flags_and_refuses_quoted_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3e-3\nhyperparameters: {ema: 1e-3, inner_steps: 4}\ndevice: cpu\n")
    config = read_config(path)
    assert config == {"lr": 0.003, "hyperparameters": {"ema": 0.001, "inner_steps": 4}, "device": "cpu"}
    assert parse_value("{ema: 1e-3}") == {"ema": 0.001} and parse_value("3e-3") == 0.003
    assert parse_value("'3e-3'") == "3e-3"  # quoted: text, refused where a number belongs
    with pytest.raises(ValueError, match=re.escape("optimizer 'gn': ema='1e-3' is invalid")):
        RunSpec(optimizer="gn", hyperparameters={"ema": parse_value("'1e-3'")}).validate()


def test_cli_overwrite_flag_replaces_a_run_with_other_settings(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(TINY_RUN))
    out = str(tmp_path / "out")
    assert cli(["--config", str(path), "--output_dir", out, "--quiet"]) == 0
    assert cli(["--config", str(path), "--output_dir", out, "--quiet", "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["--config", str(path), "--output_dir", out, "--quiet", "--seed", "1", "--overwrite"]) == 0


def test_run_folder_lock_waits_when_asked(tmp_path):
    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderBusy):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path, wait=True):
        pass


def test_gn_trains_on_targets_with_ignore_index_like_the_baselines():
    corpus = load_corpus()
    sampler = corpus.sampler("train", 2, 16, seed=0)

    def masked():
        inputs, targets = sampler()
        return inputs, targets.masked_fill(torch.arange(16) < 4, -100)  # e.g. prompt tokens

    val = [masked() for _ in range(2)]
    for name in ("gn", "adamw"):
        model = build_model("tiny", seed=0, **SMALL)
        optimizer = (
            GaussNewton(model, masked, inner_lr=0.03, inner_steps=2, line_search_batches=1)
            if name == "gn"
            else torch.optim.AdamW(model.parameters(), lr=3e-3)
        )
        history = train(model, optimizer, masked, val, TrainSettings(steps=3, eval_every=1, progress=False))
        assert history.status == "completed", (name, history.reason)
        assert history.rows[-1]["val_loss"] < history.rows[0]["val_loss"], name


def test_a_binary_text_corpus_file_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("plain text " * 50)
    (tmp_path / "b.txt").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(ValueError, match=r"b\.txt' is not UTF-8 text.*leave it out of the glob"):
        load_corpus(f"text:{tmp_path}/*.txt")

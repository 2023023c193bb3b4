"""The training loop: learning, early stop, bad input, History files, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gnlib.data import load_corpus
from gnlib.experiment.history import History
from gnlib.experiment.run_folder import CHECKPOINT
from gnlib.experiment.train import TrainSettings, evaluate, train, train_to_checkpoints
from gnlib.models import build_model
from gnlib.optim import make_optimizer
from gnlib.params import params_of

MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)


def setup(seed: int = 0):
    corpus = load_corpus()
    model = build_model("tiny", seed=seed, **MODEL)
    batches = corpus.sampler("train", 8, 32, seed=seed)
    val = corpus.fixed_batches("val", 8, 32, 4)
    return model, batches, val


def without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "cpu_time")} for r in rows]


def test_loss_decreases_on_embedded_corpus():
    model, batches, val = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = train(model, optimizer, batches, val, TrainSettings(steps=40, eval_every=20, progress=False))
    losses = history.evaluations()["val_loss"].tolist()
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.0
    assert history.status == "completed"
    assert [r["tokens"] for r in history.rows][:3] == [0, 8 * 32, 2 * 8 * 32]


def test_accumulation_equals_one_big_batch():
    model, batches, val = setup()
    parts = [batches(), batches()]
    whole = (torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]]))
    results = []
    for source, accumulation in ((iter(parts).__next__, 2), (iter([whole]).__next__, 1)):
        model = build_model("tiny", seed=0, **MODEL).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        history = train(
            model, optimizer, source, val, TrainSettings(steps=1, accumulation=accumulation, progress=False)
        )
        results.append((history.rows[-1]["tokens"], history.rows[-1]["train_loss"], model.embed.weight.detach()))
    assert results[0][0] == results[1][0] == 2 * 8 * 32
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-12)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-12, atol=1e-14)


def test_a_training_step_and_an_evaluation_read_the_device_once(host_reads):
    # each read is a device sync on a GPU
    model, batches, val = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(model, optimizer, batches, val, TrainSettings(steps=1, accumulation=3, progress=False))
    with host_reads() as reads:
        history = train(
            model, optimizer, batches, val, TrainSettings(steps=5, eval_every=10, accumulation=3, progress=False)
        )
    evaluations = [row["step"] for row in history.rows if row["val_loss"] is not None]
    assert evaluations == [0, 5] and reads.count == 5 + 2
    with host_reads() as reads:
        loss = evaluate(model, val, lambda z, y: torch.nn.functional.cross_entropy(z.flatten(0, -2), y.flatten()))
    assert reads.count == 1 and len(val) == 4
    expected = [torch.nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten()).item() for x, y in val]
    assert loss == sum(expected) / 4


def test_target_loss_stops_early_and_evaluate_matches_history():
    model, batches, val = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = train(
        model, optimizer, batches, val, TrainSettings(steps=200, eval_every=5, target_loss=4.5, progress=False)
    )
    assert history.status == "reached_target"
    assert history.rows[-1]["val_loss"] <= 4.5 < history.rows[-2 if history.rows[-2]["val_loss"] else 0]["val_loss"]
    assert history.rows[-1]["step"] < 200

    def cross_entropy(logits, targets):
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())

    assert evaluate(model, val, cross_entropy) == pytest.approx(history.rows[-1]["val_loss"], rel=1e-6)


def test_divergence_is_recorded():
    model, batches, val = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e6)
    history = train(model, optimizer, batches, val, TrainSettings(steps=30, progress=False))
    assert history.status == "diverged" and history.rows[-1]["step"] < 30


@pytest.mark.parametrize("kwargs, match", [({"steps": 0}, "steps"), ({"steps": 5, "accumulation": 0}, "accumulation")])
def test_bad_arguments(kwargs, match):
    model, batches, val = setup()
    with pytest.raises(ValueError, match=match):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, val, TrainSettings(**kwargs))


def test_history_files_round_trip(tmp_path):
    model, batches, val = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = train(
        model,
        optimizer,
        batches,
        val,
        TrainSettings(steps=4, eval_every=2, run_dir=tmp_path, metadata={"x": 1}, progress=False),
    )
    loaded = History.load(tmp_path)
    assert loaded.rows == json.loads(json.dumps(history.rows)) and loaded.status == "completed"
    assert loaded.metadata["x"] == 1
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("step,")
    # a finished run with the same settings is returned from disk, not retrained
    again = train(
        model,
        optimizer,
        batches,
        val,
        TrainSettings(steps=4, eval_every=2, run_dir=tmp_path, metadata={"x": 1}, progress=False),
    )
    assert again.rows == loaded.rows


RUNNER = textwrap.dedent(
    """
    import sys, time, torch
    from gnlib.data import load_corpus
    from gnlib.models import build_model
    from gnlib.optim.registry import build_optimizer
    from gnlib.experiment.train import TrainSettings, train

    run_dir, slow, name, lr = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    torch.manual_seed(0)  # K-FAC samples its Fisher targets
    corpus = load_corpus()
    model = build_model("tiny", seed=0, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    batches = corpus.sampler("train", 8, 32, seed=0)
    val = corpus.fixed_batches("val", 8, 32, 4)
    inner = batches.__call__

    class Slow:
        def __call__(self):
            time.sleep(slow)
            return inner()
        state_dict = batches.state_dict
        load_state_dict = batches.load_state_dict

    slowed = Slow()
    optimizer = build_optimizer(name, model, slowed, lr, {})
    train(model, optimizer, slowed, val, TrainSettings(steps=12, eval_every=3, run_dir=run_dir, checkpoint_every=2,
          metadata={"test": "resume"}, progress=False))
    """
)


@pytest.mark.parametrize("name, lr", [("adamw", 3e-3), ("kfac", 0.1), ("shampoo", 0.01), ("psgd", 0.01)])
def test_kill_and_resume_equals_uninterrupted(tmp_path, name, lr):
    """Kill -9 mid-run, then the same command: the resumed run's history and weights equal an uninterrupted run's."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(straight), "0", name, str(lr)], check=True, env=env)

    process = subprocess.Popen([sys.executable, str(script), str(killed), "0.25", name, str(lr)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (killed / CHECKPOINT).exists() and len(History.load(killed).rows) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = History.load(killed)
    assert partial.status == "running" and 5 <= len(partial.rows) < 13

    subprocess.run([sys.executable, str(script), str(killed), "0", name, str(lr)], check=True, env=env)
    resumed, reference = History.load(killed), History.load(straight)
    assert resumed.status == reference.status == "completed"
    assert without_time(resumed.rows) == without_time(reference.rows)
    assert torch.equal(
        torch.load(killed / CHECKPOINT, weights_only=True)["model"]["embed.weight"],
        torch.load(straight / CHECKPOINT, weights_only=True)["model"]["embed.weight"],
    )


def test_target_met_before_training_stops_at_step_zero():
    model, batches, val = setup()
    history = train(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        batches,
        val,
        TrainSettings(steps=5, target_loss=10.0, progress=False),
    )
    assert history.status == "reached_target" and [r["step"] for r in history.rows] == [0]


def test_nonfinite_validation_loss_counts_as_diverged():
    model, batches, val = setup()

    class Poisoned(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    history = train(
        model, Poisoned(model.parameters(), lr=0.0), batches, val, TrainSettings(steps=5, eval_every=1, progress=False)
    )
    assert history.status == "diverged" and history.rows[-1]["step"] == 1


def test_progress_names_the_run_in_one_final_line(capsys):
    model, batches, val = setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(model, optimizer, batches, val, TrainSettings(steps=4, eval_every=1, progress=True, label="adamw"))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adamw: completed at step 4/4, val loss ")
    assert "adamw" in err and "4/4" in err  # tqdm's bar, on stderr outside Jupyter
    train(model, optimizer, batches, val, TrainSettings(steps=2, progress=False))
    assert capsys.readouterr() == ("", "")


def test_train_to_checkpoints_matches_one_run_per_checkpoint():
    corpus = load_corpus(max_bytes=200_000)
    shape = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)

    def setup():
        model = build_model("tiny", seed=0, **shape)
        return model, make_optimizer("adamw", model, lr=1e-2), corpus.sampler("train", 4, 16, seed=3)

    val = corpus.fixed_batches("val", 4, 16, 2)
    model, optimizer, batches = setup()
    start = params_of(model)
    snapshots = {step: params_of(model) for step in train_to_checkpoints(model, optimizer, batches, val, [5, 0, 2, 2])}
    assert list(snapshots) == [0, 2, 5]
    assert all(torch.equal(snapshots[0][n], start[n]) for n in start)
    for steps in (2, 5):  # the oracle: a fresh run of that many steps in one call
        fresh, fresh_optimizer, fresh_batches = setup()
        train(fresh, fresh_optimizer, fresh_batches, val, TrainSettings(steps=steps, eval_every=steps, progress=False))
        for name, p in fresh.named_parameters():
            torch.testing.assert_close(snapshots[steps][name], p.detach(), rtol=0, atol=0)
    for bad in ([], [-1], [1.5], 3):
        with pytest.raises(ValueError, match="at_steps"):
            train_to_checkpoints(model, optimizer, batches, val, bad)

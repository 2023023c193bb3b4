"""A run survives its user: signals keep the work, a dead launcher stops its ranks, errors are one line."""

import errno
import json
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gnlib.runtime
from gnlib.data import load_corpus
from gnlib.experiment.history import HISTORY_CSV, HISTORY_JSONL, METADATA, History
from gnlib.experiment.run_folder import CHECKPOINT, LOCK, RunFolderBusy, run_folder_lock
from gnlib.experiment.runs import RunSpec, run
from gnlib.experiment.train import TrainSettings, train
from gnlib.models import build_model
from gnlib.tools.train_cli import cli

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}
#: A CLI run of about 10 s (50 ms a step on one thread): long enough to be signalled mid-run.
SIGNALLED = ["--steps", "200", "--batch_size", "16", "--seq_len", "128", "--eval_every", "50", "--quiet"]


def without_time(rows):
    return [{k: v for k, v in row.items() if k not in ("wall_time", "cpu_time")} for row in rows]


def wait_for(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def same_run(folder, reference):
    """``folder`` holds the run ``reference`` holds: rows (but wall time) and weights bit for bit."""
    ours, theirs = History.load(folder), History.load(reference)
    assert (ours.status, without_time(ours.rows)) == (theirs.status, without_time(theirs.rows))
    mine, wanted = (torch.load(f / CHECKPOINT, weights_only=True)["model"] for f in (folder, reference))
    assert all(torch.equal(mine[k], v) for k, v in wanted.items())


def cli_command(output_dir, *flags):
    return [sys.executable, "-m", "gnlib.tools.train_cli", *flags, "--output_dir", str(output_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(cli_command(folder, *SIGNALLED), check=True, env=ENV, cwd=REPO, timeout=300)
    return folder


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_checkpoints_says_how_to_resume_and_the_rerun_is_exact(
    tmp_path, uninterrupted, signum, status
):
    folder = tmp_path / "run"
    process = subprocess.Popen(
        cli_command(folder, *SIGNALLED), env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: (folder / LOCK).exists(), "the run to start training")
    time.sleep(0.5)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    step = History.load(folder).rows[-1]["step"]
    assert 1 <= step < 200 and torch.load(folder / CHECKPOINT, weights_only=True)["status"] == "running"
    assert f"after step {step}/200" in err and str(folder) in err and "to resume" in err, err

    subprocess.run(cli_command(folder, *SIGNALLED), check=True, env=ENV, cwd=REPO, timeout=300)
    same_run(folder, uninterrupted)


KERNEL_RUN = """
import time, torch
from gnlib.data import load_corpus
from gnlib.models import build_model
from gnlib.experiment.train import TrainSettings, train

corpus = load_corpus()
batches = corpus.sampler("train", 2, 16, seed=0)

def slow():
    open({started!r}, "a").close()
    time.sleep(0.05)
    return batches()

model = build_model("tiny", seed=0, d_model=16, n_layers=1, n_heads=2, d_ff=32)
try:
    train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), slow, corpus.fixed_batches("val", 2, 16, 1),
          TrainSettings(steps=100000, run_dir={run_dir!r}, progress=False))
except KeyboardInterrupt as err:
    print("caught", type(err).__name__, err)
    raise
"""


def test_a_kernel_interrupt_checkpoints_and_reraises_keyboard_interrupt(tmp_path):
    from jupyter_client.manager import start_new_kernel

    started, run_dir = tmp_path / "started", tmp_path / "run"
    manager, client = start_new_kernel(kernel_name="python3", env=ENV, cwd=str(REPO))
    try:
        message = client.execute(KERNEL_RUN.format(started=str(started), run_dir=str(run_dir)))
        wait_for(started.exists, "the kernel to start training")
        time.sleep(1.0)
        manager.interrupt_kernel()
        reply = client.get_shell_msg(timeout=120)
        while reply["parent_header"].get("msg_id") != message:  # a reply left from the kernel's start-up
            reply = client.get_shell_msg(timeout=120)
        assert reply["content"]["status"] == "error"
        printed = []
        while True:
            output = client.get_iopub_msg(timeout=10)
            if output["parent_header"].get("msg_id") != message:
                continue
            if output["msg_type"] == "stream":
                printed.append(output["content"]["text"])
            if output["msg_type"] == "status" and output["content"]["execution_state"] == "idle":
                break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert reply["content"]["ename"] == "RunInterrupted", reply["content"]
    assert "".join(printed).startswith("caught RunInterrupted") and "to resume" in "".join(printed)
    saved = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert saved["status"] == "running" and json.loads(saved["rows"])[-1]["step"] >= 1


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(output_dir):
    return [
        *[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
        *["--master_addr", "127.0.0.1", "--master_port", str(free_port())],
        *cli_command(output_dir, "--steps", "100000", "--batch_size", "2", "--seq_len", "16", "--quiet")[1:],
        *["--eval_every", "1000", "--checkpoint_every", "5", "--model_overrides", json.dumps(SMALL)],
    ]


def children(pid):
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_stop_when_their_launcher_is_killed_and_free_the_folder(tmp_path):
    folder = tmp_path / "run"
    launcher = subprocess.Popen(torchrun(folder), env=ENV, cwd=REPO, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        wait_for(lambda: (folder / CHECKPOINT).exists(), "the ranks' first checkpoint")
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        wait_for(lambda: not any(alive(pid) for pid in ranks), "the ranks to stop", timeout=20)
    finally:
        for pid in ranks or children(launcher.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
    wait_for(lambda: lock_free(folder), "the run folder's lock to be free", timeout=20)  # the ranks' exits release it
    with run_folder_lock(folder):  # a rerun is not refused as "in use"
        assert History.load(folder).rows[-1]["step"] >= 5


def lock_free(folder):
    """Whether a run could take ``folder``'s lock now (taken and released at once)."""
    try:
        with run_folder_lock(folder):
            return True
    except RunFolderBusy:
        return False


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--corpus", "text:/nonexistent/*.txt"], r"'text:/nonexistent/\*\.txt'.* match"),
        (["--corpus", "hf:does/not/exist"], r"source='hf:does/not/exist': the Hugging Face hub is unreachable"),
        (["--tokenizer", "t5"], r"tokenizer='t5' .* use tokenizer='t5:/path/to/tokenizer\.json'"),
        (["--init_checkpoint", "GARBAGE"], r"init_checkpoint=.*garbage\.pt' cannot be read as model weights"),
    ],
    ids=["missing-text-corpus", "hf-offline", "t5-offline", "garbage-init-checkpoint"],
)
def test_unusable_inputs_are_one_error_line_and_exit_2(tmp_path, capsys, monkeypatch, flags, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    flags = [str(garbage) if flag == "GARBAGE" else flag for flag in flags]
    assert cli([*flags, "--steps", "1", "--quiet", "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.splitlines()) == 1 and "weights_only" not in error, error
    assert re.search(match, error), error


def test_a_full_disk_mid_run_is_one_line_that_says_nothing_was_lost_and_how_to_resume(tmp_path, capsys, monkeypatch):
    flags = ["--steps", "6", "--batch_size", "2", "--seq_len", "16", "--eval_every", "2", "--quiet"]
    flags += ["--model_overrides", json.dumps(SMALL), "--checkpoint_every", "2"]
    assert cli([*flags, "--output_dir", str(tmp_path / "reference")]) == 0
    write, saves = gnlib.runtime.atomic_write_bytes, []

    def filling(path, data):
        if Path(path).name == CHECKPOINT:
            saves.append(path)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(gnlib.runtime, "atomic_write_bytes", filling)
    assert cli([*flags, "--output_dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.splitlines()) == 1, error
    assert "No space left on device" in error and "nothing was lost" in error and "step 2" in error, error
    assert "to resume" in error and str(tmp_path / "run" / CHECKPOINT) in error
    assert json.loads(torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["rows"])[-1]["step"] == 2
    monkeypatch.undo()
    assert cli([*flags, "--output_dir", str(tmp_path / "run")]) == 0
    same_run(tmp_path / "run", tmp_path / "reference")


def setup_small():
    corpus = load_corpus()
    return (
        build_model("tiny", seed=0, **SMALL),
        corpus.sampler("train", 2, 16, seed=0),
        corpus.fixed_batches("val", 2, 16, 1),
    )


def test_a_training_loss_blow_up_between_evaluations_is_diverged():
    model, batches, val = setup_small()

    class BlowsUp(torch.optim.SGD):
        """Scales the weights up at step 1 and back at step 2: only the training loss sees it."""

        def step(self, closure=None):
            self.state["calls"] = self.state.get("calls", 0) + 1
            with torch.no_grad():
                model.head.weight.mul_({1: 1e4, 2: 1e-4}.get(self.state["calls"], 1.0))

    history = train(
        model, BlowsUp(model.parameters(), lr=0.0), batches, val, TrainSettings(steps=4, eval_every=10, progress=False)
    )
    assert history.status == "diverged" and history.rows[-1]["step"] == 2, history.rows
    assert re.match(r"train_loss [\d.e+]+ at step 2 exceeds 10x the start's", history.reason), history.reason


def test_a_run_that_ends_worse_than_it_started_is_not_completed(tmp_path):
    model, batches, val = setup_small()

    class Collapses(torch.optim.SGD):
        """Predicts the uniform distribution from step 1 on (the loss goes to ln 256, just above the start's)."""

        def step(self, closure=None):
            with torch.no_grad():
                model.head.weight.zero_()

    history = train(
        model,
        Collapses(model.parameters(), lr=0.0),
        batches,
        val,
        TrainSettings(steps=3, eval_every=1, run_dir=tmp_path),
    )
    start, end = history.rows[0]["val_loss"], history.rows[-1]["val_loss"]
    assert end == pytest.approx(math.log(256)) and end > start
    assert history.status == "diverged" and "above the start's" in history.reason, history.reason
    assert json.loads((tmp_path / METADATA).read_text())["status"] == "diverged"


def test_gn_at_a_huge_lr_is_not_completed():
    spec = RunSpec(
        optimizer="gn",
        lr=1e6,
        steps=6,
        batch_size=8,
        seq_len=64,
        costs="flops",
        hyperparameters={"solver": "sgd", "line_search": None, "inner_steps": 4},
    )
    history = run(spec, progress=False)
    assert history.status == "diverged" and history.reason, [r["train_loss"] for r in history.rows]


def test_non_finite_values_are_null_in_history_jsonl_and_nan_in_history_csv(tmp_path):
    rows = [
        {"step": 0, "train_loss": None, "val_loss": 5.0},
        {"step": 1, "train_loss": float("nan"), "val_loss": None},
        {"step": 2, "train_loss": 4.0, "val_loss": float("inf")},
    ]
    History(rows=rows, status="diverged").save(tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = [json.loads(line, parse_constant=refuse) for line in (tmp_path / HISTORY_JSONL).read_text().splitlines()]
    assert written[1] == {"step": 1, "train_loss": None, "val_loss": None, "nonfinite": {"train_loss": "nan"}}
    assert written[2]["val_loss"] is None and written[2]["nonfinite"] == {"val_loss": "inf"}
    loaded = History.load(tmp_path).rows
    assert math.isnan(loaded[1]["train_loss"]) and loaded[1]["val_loss"] is None and loaded[2]["val_loss"] == math.inf
    assert "nonfinite" not in loaded[1]
    csv = (tmp_path / HISTORY_CSV).read_text().splitlines()
    assert csv == ["step,train_loss,val_loss", "0,,5.0", "1,nan,", "2,4.0,inf"]


def test_atomically_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        History(rows=[{"step": 0, "val_loss": 5.0}]).save(tmp_path)
        gnlib.runtime.atomic_torch_save({"x": torch.zeros(1)}, tmp_path / CHECKPOINT)
    finally:
        os.umask(previous)
    for name in (HISTORY_JSONL, HISTORY_CSV, METADATA, CHECKPOINT):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_an_unreadable_checkpoint_is_described_in_whole_sentences_without_torchs_advice(tmp_path, capsys):
    spec = RunSpec(preset="tiny", steps=1, batch_size=2, seq_len=16, val_batches=1, model_overrides=SMALL)
    run(spec, tmp_path, progress=False)
    torch.save({"when": time.gmtime(0)}, tmp_path / CHECKPOINT)  # a Python object a weights-only load refuses
    run(spec, tmp_path, progress=True)
    line = next(line for line in capsys.readouterr().out.splitlines() if "cannot be read" in line)
    assert "weights_only" not in line and "trust" not in line and "\x1b[" not in line, line
    whole = r"\(UnpicklingError: [^()]*time\.struct_time[^()]*\.\); moved it to checkpoint\.pt\.unreadable-"
    assert re.search(whole, line), line

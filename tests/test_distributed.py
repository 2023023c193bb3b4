"""Data-parallel training: 2 processes (Gloo, CPU, loopback) at batch b equal 1 process at batch 2b.

One group of 2 spawned processes runs every scenario (spawning costs more than the tiny runs): one or two
outer steps of each Gauss-Newton variant and each baseline, a checkpoint-and-resume, and a run whose
ranks write to separate folders; the parent process computes the single-process references at the
doubled batch and checks that rank 1 wrote nothing and that a resume on another number of processes is
refused. The command line is checked once through ``torchrun``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gnlib import distributed
from gnlib.data import BatchSampler
from gnlib.experiment.history import History
from gnlib.experiment.run_folder import CHECKPOINT
from gnlib.experiment.train import TrainSettings, train
from gnlib.models import build_model
from gnlib.optim import make_optimizer
from gnlib.optim.gauss_newton import make_gauss_newton
from gnlib.optim.kfac_optimizer import KFAC

WORLD = 2
B, T, VOCAB = 3, 8, 32  # per-process batch, sequence length, vocabulary
MODEL = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=T, vocab_size=VOCAB)
# SOAP's step depends on the eigenbases of its factors. After one gradient, the factor of a non-square
# matrix is rank-deficient and the basis of its null space is arbitrary, so a 1-ulp change of the gradient
# moves the step by O(1) (measured: 2e-2 relative, one process, weights scaled by 1 + 2^-52); with square
# matrices the bases are well defined and the same 1-ulp change moves the parameters by 6e-9 relative.
# SOAP is therefore compared on square matrices (vocabulary = d_ff = d_model), at 1e-6.
SQUARE = dict(MODEL, vocab_size=16, d_ff=16)
RTOL = {"soap": 1e-6}
GN = {"gn": 0.05, "gn_layerwise": 0.05, "gn_cg": 1.0}
BASELINES = {"adamw": 1e-2, "muon": 2e-2, "soap": 1e-2, "shampoo": 1e-2, "psgd": 1e-2}
STEPS = 2
GN_OPTIONS = dict(inner_steps=2, line_search_batches=1)
#: K-FAC with the exact Fisher: sampled targets would differ between a shard and the whole batch.
KFAC_OPTIONS = dict(lr=0.05, micro_batches=2, inverse_every=1, fisher="exact")


def _tokens(n: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


class Interrupted(Exception):
    """Stands for the processes being killed."""


class StoppingSampler(BatchSampler):
    """A BatchSampler that raises :class:`Interrupted` instead of its batch number ``draws + 1``."""

    def __init__(self, *args, draws: float, **kwargs):
        """BatchSampler's arguments, and how many batches to give."""
        super().__init__(*args, **kwargs)
        self.draws = draws

    def __call__(self):
        """The next batch, or :class:`Interrupted` once ``draws`` are used up."""
        self.draws -= 1
        if self.draws < 0:
            raise Interrupted
        return super().__call__()


def _model(name: str) -> torch.nn.Module:
    return build_model("tiny", seed=0, dtype=torch.float64, **(SQUARE if name == "soap" else MODEL))


def _run(
    name: str,
    batch_size: int,
    steps: int = STEPS,
    run_dir: Path | None = None,
    checkpoint_every: int = 0,
    draws: float = float("inf"),
):
    """Train the tiny float64 model with optimizer ``name`` at per-process ``batch_size``; (params, rows)."""
    config = SQUARE if name == "soap" else MODEL
    model = _model(name)
    batches = StoppingSampler(_tokens(3000, 1, config["vocab_size"]), batch_size, T, seed=5, draws=draws)
    val = [BatchSampler(_tokens(1000, 2, config["vocab_size"]), batch_size, T, seed=0)() for _ in range(2)]
    if name in GN:
        options = dict(GN_OPTIONS, cg_iters=4) if name == "gn_cg" else GN_OPTIONS
        optimizer = make_gauss_newton(name, model, batches, GN[name], **options)
    elif name == "kfac":
        optimizer = KFAC(model, batches, **KFAC_OPTIONS)
    else:
        optimizer = make_optimizer(name, model, lr=BASELINES[name])
    history = train(
        model,
        optimizer,
        batches,
        val,
        TrainSettings(
            steps=steps,
            accumulation=2,
            eval_every=1,
            run_dir=run_dir,
            checkpoint_every=checkpoint_every,
            metadata={"optimizer": name},
            progress=False,
            max_grad_norm=1.0,
        ),
    )
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, [{k: v for k, v in r.items() if k not in ("wall_time", "cpu_time")} for r in history.rows]


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    folder = Path(folder)
    try:
        names = {**GN, **BASELINES, "kfac": None}
        results = {name: _run(name, B, run_dir=folder / "runs" / name / f"rank{rank}") for name in names}
        with pytest.raises(Interrupted):  # GN draws 3 batches a step: stop in step 2, after the checkpoint of step 1
            _run("gn", B, steps=3, run_dir=folder / "resume", checkpoint_every=1, draws=4)
        dist.barrier()  # rank 0 has written the checkpoint
        assert History.load(folder / "resume").rows[-1]["step"] == 1
        results["resumed"] = _run("gn", B, steps=3, run_dir=folder / "resume", checkpoint_every=1)
        results["uninterrupted"] = _run("gn", B, steps=3)
        if rank == 0:
            torch.save(results, folder / "results.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """The 2-process results (rank 0's) and the folder the processes wrote to."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    return torch.load(folder / "results.pt", weights_only=False), folder


def _differences(a: dict, b: dict) -> tuple[float, float]:
    flat_a = torch.cat([t.detach().flatten() for t in a.values()])
    flat_b = torch.cat([t.detach().flatten() for t in b.values()])
    diff = float((flat_a - flat_b).abs().max())
    return diff, diff / float(flat_b.abs().max())


def _assert_rows_close(rows, reference, rtol):
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=rtol, abs=rtol), (row["step"], key)
            else:
                assert row[key] == value, (row["step"], key)


@pytest.mark.parametrize("name", [*GN, *BASELINES, "kfac"])
def test_two_processes_equal_one_at_double_batch(two_process, name):
    results, _ = two_process
    params, rows = results[name]
    ref_params, ref_rows = _run(name, WORLD * B)
    # Every process applies the same all-reduced gradients/products, so the runs differ only by the
    # order of floating-point sums (~1e-16 relative in float64). Muon's Newton-Schulz iteration runs in
    # bfloat16 inside torch.optim.Muon; its input differs by ~1e-16, far below bfloat16's spacing, so its
    # rounded output agrees as well. SOAP: see SQUARE.
    rtol = RTOL.get(name, 1e-10)
    diff, rel = _differences(params, ref_params)
    print(f"{name}: max abs diff {diff:.2e}, rel {rel:.2e}")
    assert rel < rtol
    _assert_rows_close(rows, ref_rows, rtol)
    assert rows[-1]["tokens"] == ref_rows[-1]["tokens"] > 0
    assert _differences(params, dict(_model(name).named_parameters()))[0] > 1e-4  # the steps moved the parameters


def test_only_rank_zero_writes(two_process):
    _, folder = two_process
    for name in [*GN, *BASELINES]:
        assert not (folder / "runs" / name / "rank1").exists()
        written = History.load(folder / "runs" / name / "rank0")
        worse = written.rows[-1]["val_loss"] > written.rows[0]["val_loss"]  # GN on random tokens, by a hair
        assert written.status == ("diverged" if worse else "completed") and len(written.rows) == STEPS + 1
        assert written.metadata["world_size"] == WORLD


def test_resume_under_two_processes_continues_exactly(two_process):
    results, _ = two_process
    resumed_params, resumed_rows = results["resumed"]
    params, rows = results["uninterrupted"]
    assert resumed_rows == rows
    for n in params:
        assert torch.equal(resumed_params[n], params[n])


def test_resume_on_another_world_size_is_refused(two_process):
    _, folder = two_process
    assert torch.load(folder / "resume" / CHECKPOINT, weights_only=True)["world_size"] == WORLD
    with pytest.raises(ValueError, match=r"world_size=2 process\(es\); this run has world_size=1"):
        _run("gn", B, steps=4, run_dir=folder / "resume")


def test_single_process_is_the_identity():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    value = {"a": torch.ones(2), "b": [1.5, torch.zeros(())]}
    assert distributed.all_reduce_mean(value) is value
    with pytest.raises(ValueError, match="shard"):
        BatchSampler(_tokens(100, 0), 2, 4, seed=0, shard=(2, 2))


def test_shards_partition_the_global_batch():
    tokens = _tokens(500, 0)
    whole = BatchSampler(tokens, 2 * B, T, seed=3)
    shards = [BatchSampler(tokens, B, T, seed=3, shard=(r, 2)) for r in range(2)]
    for _ in range(2):
        inputs, targets = whole()
        parts = [s() for s in shards]
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))


def test_train_cli_under_torchrun_equals_one_process(tmp_path):
    config = {
        "optimizer": "adamw",
        "lr": 3e-3,
        "preset": "tiny",
        "steps": 2,
        "batch_size": 2,
        "seq_len": 16,
        "eval_every": 1,
        "val_batches": 2,
        "accumulation": 2,
        "model_overrides": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "gnlib.tools.train_cli",
        "--config",
        str(tmp_path / "run.yaml"),
        "--output_dir",
        str(tmp_path / "two"),
        "--quiet",
    ]
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    from gnlib.tools.train_cli import main

    one = main(
        ["--config", str(tmp_path / "run.yaml"), "--batch_size", "4", "--output_dir", str(tmp_path / "one"), "--quiet"]
    )
    two = History.load(tmp_path / "two")
    assert two.metadata["world_size"] == 2 and two.status == "completed"
    for row, ref in zip(two.rows, one.rows, strict=True):
        assert row["tokens"] == ref["tokens"]
        assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)  # float32 model

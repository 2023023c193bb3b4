"""The packed token stream: order and packing, no reuse, passes, resume mid-stream, shards, the run pipeline."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gnlib.data import load_corpus
from gnlib.data.pipeline import after_warmup, build_run_data, tokens_drawn
from gnlib.data.stream import PackedStream, StreamExhausted, shuffled_documents, tensor_documents
from gnlib.experiment.history import History
from gnlib.experiment.run_folder import CHECKPOINT
from gnlib.experiment.runs import RunSpec, run
from gnlib.experiment.study import warmup_checkpoint
from gnlib.experiment.train import TrainSettings, train
from gnlib.models import build_model
from gnlib.optim import make_optimizer
from gnlib.optim.gauss_newton import make_gauss_newton

EOS = 0


def documents(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Documents of the given lengths with ids in [1, 50), each followed by EOS."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat((torch.randint(1, 50, (n,), generator=g), torch.tensor([EOS]))) for n in lengths]


def source(docs: list[torch.Tensor]):
    return lambda first: iter(docs[first:])


DOCS = documents([5, 17, 1, 30, 9, 12, 40, 3, 22, 8])
FLAT = torch.cat(DOCS)  # 157 tokens


def test_batches_are_consecutive_rows_of_the_packed_documents():
    stream = PackedStream(source(DOCS), batch_size=3, seq_len=4, shard=(0, 1))
    for call in range(12):  # 12 × 12 = 144 tokens, + 1 target
        inputs, targets = stream()
        start = call * 12
        assert torch.equal(inputs.flatten(), FLAT[start : start + 12])
        assert torch.equal(targets.flatten(), FLAT[start + 1 : start + 13])
    assert stream.position == 144
    assert stream.state_dict()["document"] == 8  # token 144 lies in the 9th document (tokens 136..158)


def test_a_single_pass_never_reuses_a_token_and_running_out_names_the_remedies():
    stream = PackedStream(source(DOCS), batch_size=2, seq_len=13, shard=(0, 1))
    seen = torch.cat([stream()[0].flatten() for _ in range(6)])  # 6 × 26 = 156 = every input token once
    assert torch.equal(seen, FLAT[:156])
    with pytest.raises(StreamExhausted, match="ran out.*1 pass.*steps or data_start.*data_epochs > 1"):
        stream()


def test_epochs_start_over_and_are_counted():
    stream = PackedStream(source(DOCS), batch_size=2, seq_len=13, shard=(0, 1), epochs=2)
    batches = [stream() for _ in range(12)]
    assert stream.epoch == 1 and stream.position == 12 * 26
    assert torch.equal(torch.cat([b[0].flatten() for b in batches]), torch.cat((FLAT, FLAT))[:312])
    with pytest.raises(StreamExhausted, match="2 pass"):
        stream()


@pytest.mark.parametrize("calls", [0, 1, 3, 5])
def test_state_dict_resumes_with_the_same_next_batches(calls):
    stream = PackedStream(source(DOCS), batch_size=2, seq_len=7, shard=(0, 1), start=11)
    for _ in range(calls):
        stream()
    state = json.loads(json.dumps(stream.state_dict()))  # plain data: it goes into a checkpoint
    resumed = PackedStream(source(DOCS), batch_size=2, seq_len=7, shard=(0, 1))
    resumed.load_state_dict(state)
    for _ in range(3):
        a, b = stream(), resumed()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="rows"):
        PackedStream(source(DOCS), batch_size=3, seq_len=7, shard=(0, 1)).load_state_dict(state)


def test_start_skips_tokens_exactly():
    skipped = PackedStream(source(DOCS), batch_size=2, seq_len=5, shard=(0, 1), start=37)
    assert torch.equal(skipped()[0].flatten(), FLAT[37:47])
    with pytest.raises(StreamExhausted):
        PackedStream(source(DOCS), batch_size=2, seq_len=5, shard=(0, 1), start=500)


def test_shards_together_are_one_stream_at_the_whole_batch():
    whole = PackedStream(source(DOCS), batch_size=4, seq_len=6, shard=(0, 1))
    shards = [PackedStream(source(DOCS), batch_size=2, seq_len=6, shard=(r, 2)) for r in range(2)]
    for _ in range(5):
        inputs, targets = whole()
        parts = [s() for s in shards]
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))


def test_tensor_documents_serve_a_split_with_a_final_eos():
    corpus = load_corpus(max_bytes=20_000)
    stream = PackedStream(tensor_documents(corpus.train, EOS), 1, len(corpus.train), shard=(0, 1))
    inputs, targets = stream()
    assert torch.equal(inputs[0], corpus.train) and targets[0, -1] == EOS


# ------------------------------------------------------------------------------------------------ runs

MODEL = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)
BASE = RunSpec(
    preset="paper_tiny",
    model_overrides=MODEL,
    data="stream",
    corpus_bytes=60_000,
    batch_size=4,
    seq_len=16,
    steps=4,
    eval_every=1,
    val_batches=2,
    lr=0.01,
)


class Interrupted(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize(
    "change",
    [
        dict(optimizer="gn", hyperparameters=dict(inner_steps=2, line_search_batches=1)),
        dict(optimizer="kfac", accumulation=3, lr=0.05, hyperparameters=dict(inverse_every=2)),
        dict(optimizer="shampoo", accumulation=3, lr=3e-3, hyperparameters=dict(precondition_frequency=2)),
        dict(optimizer="psgd", accumulation=3, lr=1e-3, hyperparameters=dict(preconditioner_update_probability=0.5)),
    ],
    ids=["gn", "kfac", "shampoo", "psgd"],
)
def test_killed_run_resumes_mid_stream_with_the_same_next_batch(tmp_path, change):
    """A run killed inside step 3 resumes from its step-2 checkpoint and ends exactly as an unbroken run.

    Each draws 3 batches a step: GN 2 inner steps and 1 line-search batch, the others 3 micro-batches.
    """
    spec = dataclasses.replace(BASE, **change)
    full = run(spec, tmp_path / "full", progress=False)

    import gnlib.experiment.runs as runs

    original = runs.build_run_data

    def dying(spec, device, **kwargs):  # the stream dies at its 8th batch: inside step 3 (3 batches a step)
        data = original(spec, device, **kwargs)
        stream, calls = data.train, []

        class Dying:
            def __call__(self):
                calls.append(1)
                if len(calls) == 8:
                    raise Interrupted
                return stream()

            state_dict, load_state_dict = stream.state_dict, stream.load_state_dict

        data.train = Dying()
        return data

    runs.build_run_data = dying
    try:
        with pytest.raises(Interrupted):
            run(spec, tmp_path / "resumed", progress=False, checkpoint_every=1)
    finally:
        runs.build_run_data = original
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert saved["sampler"]["position"] == 2 * 3 * 4 * 16  # two steps of 3 batches of 4 × 16 tokens
    resumed = run(spec, tmp_path / "resumed", progress=False, checkpoint_every=1)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_time", "cpu_time")} for r in rows]  # noqa: E731
    assert strip(resumed.rows) == strip(full.rows)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["sampler"]["position"] == 4 * 3 * 64


@pytest.mark.parametrize("protocol, line_search_batches", [("gnlib", 2), ("paper", 3)])
def test_a_gn_run_checks_the_stream_for_the_tokens_it_draws(tmp_path, protocol, line_search_batches):
    """The stream-length check counts GN's line-search batches as the run draws them.

    gnlib's protocol draws the default 2 a step; the paper's draws N = inner_steps (``line_search_batches=None``).
    """
    spec = dataclasses.replace(BASE, optimizer="gn", protocol=protocol, hyperparameters=dict(inner_steps=3))
    history = run(spec, tmp_path, progress=False, checkpoint_every=1)
    drawn = torch.load(tmp_path / CHECKPOINT, weights_only=True)["sampler"]["position"]
    assert drawn == spec.steps * (3 + line_search_batches) * 4 * 16
    assert history.metadata["corpus"]["tokens_needed"] == drawn + 1  # + the last batch's last target


def test_warmup_reads_the_first_tokens_and_studied_runs_continue_after_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = warmup_checkpoint(BASE, 3, root=tmp_path / "warmup")
    warm = History.load(path.parent / "run")
    assert warm.metadata["corpus"]["data_start"] == 0 and warm.rows[-1]["tokens"] == 3 * 4 * 16
    spec = dataclasses.replace(after_warmup(BASE, 3), optimizer="adamw", init_checkpoint=str(path))
    assert spec.data_start == 3 * 4 * 16 == tokens_drawn(dataclasses.replace(BASE, accumulation=1), 3)
    warm_data = build_run_data(dataclasses.replace(BASE, steps=3), torch.device("cpu"))
    for _ in range(3):
        warm_data.train()
    study_data = build_run_data(spec, torch.device("cpu"))
    assert torch.equal(study_data.train()[0], warm_data.train()[0])  # the token after the warm-up's last one
    for (a, b), (c, d) in zip(study_data.val, warm_data.val):  # one fixed validation set
        assert torch.equal(a, c) and torch.equal(b, d)
    history = run(spec, tmp_path / "study", progress=False)
    assert history.metadata["corpus"]["data_start"] == 192 and history.status == "completed"
    wide = dataclasses.replace(BASE, batch_size=2 * BASE.batch_size)  # runs of wider micro-batches, same warm-up
    assert after_warmup(wide, 3, batch_size=BASE.batch_size).data_start == 192
    assert after_warmup(wide, 3).data_start == 2 * 192


def test_validation_is_fixed_and_disjoint_from_training():
    data = build_run_data(BASE, torch.device("cpu"))
    again = build_run_data(dataclasses.replace(BASE, seed=7), torch.device("cpu"))
    corpus = data.corpus
    windows = corpus.fixed_batches("val", BASE.batch_size, BASE.seq_len, BASE.val_batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(data.val, windows))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(data.val, again.val))
    rows = torch.cat([x for x, _ in data.val])
    starts = [next(i for i in range(len(corpus.val)) if torch.equal(corpus.val[i : i + len(row)], row)) for row in rows]
    assert max(starts) - min(starts) > len(corpus.val) // 2  # spread across the split, not its first tokens
    text = corpus.tokenizer.decode(rows[0][:200])
    assert text not in corpus.tokenizer.decode(corpus.train)  # documents, not tokens, were split


def test_a_stream_that_would_run_out_is_refused_before_training(tmp_path):
    spec = dataclasses.replace(BASE, steps=10_000)
    with pytest.raises(ValueError, match=r"steps=10000.*too short|too short.*steps=10000"):
        run(spec, tmp_path / "short", progress=False)
    assert not (tmp_path / "short").exists()
    available = build_run_data(BASE, torch.device("cpu")).meta["tokens_available"]
    passes = -(-(10_000 * 64 + 1) // available)
    with pytest.raises(ValueError, match=f"data_epochs={passes}"):
        build_run_data(spec, torch.device("cpu"))
    meta = build_run_data(dataclasses.replace(spec, data_epochs=passes), torch.device("cpu")).meta
    assert (meta["passes"], meta["data_epochs"], meta["tokens_needed"]) == (passes, passes, 10_000 * 64 + 1)


def test_data_field_errors_name_the_field():
    for fields, match in [
        (dict(data="shuffle"), "data='shuffle'.*windows.*stream"),
        (dict(data_epochs=0), "data_epochs"),
        (dict(data_start=-1), "data_start"),
        (dict(data="windows", data_start=5), "data_start.*stream"),
        (dict(corpus_bytes=0), "corpus_bytes"),
        (dict(tokenizer="gpt2"), "tokenizer='gpt2'.*bytes.*t5.*bpe"),
        (dict(tokenizer="bpe:100"), "tokenizer='bpe:100'.*257"),
        (dict(tokenizer="t5:/no/such/tokenizer.json"), "tokenizer=.*no file"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(BASE, **fields).validate()


# ---------------------------------------------------------------------------------- two processes (gloo)

WORLD, B = 2, 2


def _stream_run(name: str, batch_size: int, run_dir: Path | None = None):
    """Train a float64 tiny model on the packed stream of a small corpus for 2 steps; (params, rows)."""
    corpus = load_corpus(max_bytes=30_000)
    stream = PackedStream(tensor_documents(corpus.train, EOS), batch_size, 8, start=100)
    val = [PackedStream(tensor_documents(corpus.val, EOS), batch_size, 8)()]
    model = build_model("paper_tiny", **MODEL, max_seq_len=8, dtype=torch.float64)
    if name == "gn":
        optimizer = make_gauss_newton("gn", model, stream, 0.05, inner_steps=2, line_search_batches=1)
    else:
        optimizer = make_optimizer("adamw", model, lr=1e-2)
    history = train(
        model,
        optimizer,
        stream,
        val,
        TrainSettings(
            steps=2, accumulation=2, eval_every=1, run_dir=run_dir, metadata={"optimizer": name}, progress=False
        ),
    )
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return (
        params,
        [{k: v for k, v in r.items() if k not in ("wall_time", "cpu_time")} for r in history.rows],
        stream.state_dict(),
    )


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: _stream_run(name, B, Path(folder) / name) for name in ("adamw", "gn")}
        if rank == 0:
            torch.save(results, Path(folder) / "results.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_their_own_shards_and_equal_one_process_at_twice_the_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for name in ("adamw", "gn"):
        params, rows, state = _stream_run(name, WORLD * B)
        two_params, two_rows, two_state = results[name]
        assert two_state == state  # both read the same tokens: 2 × (2 accumulation | 3 GN) batches of 4 × 8
        assert [r["tokens"] for r in two_rows] == [r["tokens"] for r in rows]
        for key in ("train_loss", "val_loss"):
            got, want = [r[key] for r in two_rows], [r[key] for r in rows]
            assert got == pytest.approx(want, rel=1e-10, abs=1e-12), (name, key)
        for n in params:
            torch.testing.assert_close(two_params[n], params[n], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ a streamed hub dataset


@pytest.fixture
def fake_hub(monkeypatch):
    """``hf:`` sources served from in-memory datasets (train and validation splits); nothing is downloaded."""
    import datasets

    import gnlib.data.pipeline as pipeline

    splits = {
        "train": [{"text": f"train document {i}: " + "lorem ipsum dolor " * (i % 7 + 1)} for i in range(300)],
        "validation": [{"text": f"held-out document {i}: " + "sit amet " * (i % 5 + 1)} for i in range(50)],
    }
    opened = []

    def load_dataset(name, config=None, split="train", streaming=False):
        assert (name, config, streaming) == ("fake/c4", "en", True)
        opened.append(split)
        return datasets.Dataset.from_list(splits[split]).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(pipeline, "hub_reachable", lambda: True)
    return splits, opened


def test_hf_dataset_is_streamed_in_order_packed_and_resumed_by_document(fake_hub, tmp_path):
    splits, opened = fake_hub
    spec = dataclasses.replace(BASE, corpus="hf:fake/c4:en", tokenizer="bpe:300", corpus_bytes=5_000, data_start=7)
    data = build_run_data(spec, torch.device("cpu"), tokenizer_cache=str(tmp_path))
    tok = data.tokenizer
    assert data.corpus is None and data.vocab_size == tok.vocab_size == 300
    assert data.meta["tokenizer_sha256"] == tok.sha256 and len(list(tmp_path.glob("bpe-300-*.json"))) == 1

    def packed(rows):
        return torch.tensor([i for row in rows for i in [*tok.encode(row["text"]), tok.eos_id]])

    train, val = packed(splits["train"]), packed(splits["validation"])
    n = 4 * 16
    for call in range(5):
        inputs, targets = data.train()
        assert torch.equal(inputs.flatten(), train[7 + call * n : 7 + (call + 1) * n])
        assert torch.equal(targets.flatten(), train[8 + call * n : 8 + (call + 1) * n])
    assert torch.equal(torch.cat([x.flatten() for x, _ in data.val]), val[: 2 * n])  # the validation split
    state = data.train.state_dict()
    assert state["document"] > 0 and state["position"] == 7 + 5 * n
    resumed = build_run_data(spec, torch.device("cpu"), tokenizer_cache=str(tmp_path)).train
    resumed.load_state_dict(state)  # reopens the stream at that document (skip), not at the start
    assert torch.equal(resumed()[0].flatten(), train[7 + 5 * n : 7 + 6 * n])
    assert opened.count("validation") == 2 and opened.count("train") >= 4


def test_hf_stream_offline_is_a_clear_error(monkeypatch):
    import gnlib.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "hub_reachable", lambda: False)
    with pytest.raises(ConnectionError, match="corpus='hf:allenai/c4:en'.*unreachable.*text:"):
        build_run_data(dataclasses.replace(BASE, corpus="hf:allenai/c4:en"), torch.device("cpu"))


def _documents(lengths: list[int], eos: int = 0) -> torch.Tensor:
    """Documents of distinct tokens (document d: tokens 1000·(d+1) + i) joined by EOS."""
    docs = [torch.arange(n) + 1000 * (d + 1) for d, n in enumerate(lengths)]
    return torch.cat([torch.cat((doc, torch.tensor([eos]))) for doc in docs])[:-1]


def _read(documents) -> torch.Tensor:
    return torch.cat(list(documents(0)))


def test_shuffled_documents_follow_the_seed_and_keep_a_warmups_documents_first():
    tokens = _documents([5, 9, 3, 7, 4, 8, 6, 2])
    orders = {seed: _read(shuffled_documents(tokens, 0, seed)[0]) for seed in (0, 1, 2)}
    every_token_once = sorted([*tokens.tolist(), 0])  # and the final EOS
    assert all(sorted(order.tolist()) == every_token_once for order in orders.values())
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])  # a seed varies the data
    warm = orders[0]
    start = 12  # a warm-up of seed 0 read warm[:12], ending inside a document
    for seed in (1, 2):
        documents, record = shuffled_documents(tokens, 0, seed, prefix_tokens=start, prefix_seed=0)
        run = _read(documents)
        covered = {int(t) // 1000 for t in warm[:start] if t}
        assert torch.equal(run[: start + 1], warm[: start + 1])  # continues exactly where the warm-up stopped
        end = next(i for i in range(start, len(run)) if run[i] == 0) + 1  # the end of the document it stopped in
        assert {int(t) // 1000 for t in run[end:] if t}.isdisjoint(covered)  # no warm-up document read again
        assert record == {"order_seed": seed, "prefix_seed": 0, "prefix_documents": len(covered), "documents": 8}

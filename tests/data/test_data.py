"""Tests for gnlib.data: sources, hashing, the document split, and the seeded batch sampler."""

from __future__ import annotations

import hashlib
import itertools
import platform
import socket
import sys
import types

import pytest
import torch

from gnlib import data
from gnlib.data import DOCUMENT_SEPARATOR, ByteTokenizer, hub, load_corpus, load_documents, split_indices
from gnlib.data import corpus as corpus_module

SMALL = 300_000


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return load_corpus(max_bytes=SMALL)


@pytest.fixture
def text_files(tmp_path) -> list[str]:
    """Ten small files with distinct, partly non-ASCII content; returns their texts in sorted-path order."""
    texts = [f"Dokument {i}: Grüße, naïve café №{i}.\nline two of {i}\n" * (i + 1) for i in range(10)]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return texts


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_tensor(text).tolist() == ids and tok.encode_tensor(text).dtype == torch.long
    assert tok.decode(torch.tensor(ids)) == text
    cut = ids[: -len("\n\ttabs") - 1]  # drops the last byte of the 4-byte emoji
    assert tok.decode(cut) == "héllo wörld — 日本語 \ufffd"


def test_default_corpus_meta_hash_and_counts(corpus):
    meta = corpus.meta
    documents = load_documents(max_bytes=SMALL)
    text = DOCUMENT_SEPARATOR.join(documents).encode("utf-8")
    assert meta["sha256"] == hashlib.sha256(text).hexdigest()
    assert meta["size_bytes"] == len(text) <= SMALL
    assert meta["n_documents"] == len(documents) == meta["n_train_docs"] + meta["n_val_docs"]
    assert meta["n_val_docs"] >= 1 and meta["n_train_docs"] >= 1
    assert (meta["source"], meta["tokenizer"], meta["val_fraction"], meta["split_seed"]) == ("default", "byte", 0.1, 0)
    assert meta["python_version"] == platform.python_version()
    # the two streams hold every document byte plus one separator less per split than documents
    assert meta["n_train_tokens"] + meta["n_val_tokens"] == len(text) - 1
    assert (len(corpus.train), len(corpus.val)) == (meta["n_train_tokens"], meta["n_val_tokens"])
    assert corpus.vocab_size == 256 and corpus.train.dtype == torch.long


def test_default_corpus_is_docs_then_stdlib_and_deterministic():
    from pydoc_data.topics import topics

    documents = load_documents()  # default cap: past the documentation, into the library sources
    assert documents[: len(topics)] == [topics[k] for k in sorted(topics)]
    assert any("def " in d and "import " in d for d in documents[len(topics) :])
    assert len(DOCUMENT_SEPARATOR.join(documents).encode("utf-8")) == data.DEFAULT_MAX_BYTES
    corpus_module._default_documents.cache_clear()
    assert load_documents() == documents  # re-read from disk, same text


def test_stdlib_paths_skip_excluded_folders():
    paths = corpus_module._stdlib_paths()
    assert paths and all(p.suffix == ".py" for p in paths)
    assert not any(set(p.parts) & corpus_module._EXCLUDED_DIRS for p in paths)


def test_default_corpus_is_large_enough_to_train_on():
    corpus = load_corpus()
    assert corpus.meta["n_train_tokens"] > 1_000_000


def test_split_indices_disjoint_covering_seeded():
    for n, fraction in [(2, 0.1), (3, 0.9), (10, 0.3), (101, 0.1)]:
        train, val = split_indices(n, fraction, 0)
        assert val and train and not set(train) & set(val) and sorted(train + val) == list(range(n))
        assert (train, val) == split_indices(n, fraction, 0)
    assert split_indices(100, 0.1, 0) != split_indices(100, 0.1, 1)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, 0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_indices(1, 0.1, 0)


def test_text_source_splits_by_document(tmp_path, text_files):
    corpus = load_corpus(f"text:{tmp_path}/*.txt", val_fraction=0.3, split_seed=1, max_bytes=None)
    train_idx, val_idx = split_indices(len(text_files), 0.3, 1)
    tok = corpus.tokenizer
    assert tok.decode(corpus.train).split(DOCUMENT_SEPARATOR) == [text_files[i] for i in train_idx]
    assert tok.decode(corpus.val).split(DOCUMENT_SEPARATOR) == [text_files[i] for i in val_idx]
    joined = DOCUMENT_SEPARATOR.join(text_files).encode("utf-8")
    assert corpus.meta["sha256"] == hashlib.sha256(joined).hexdigest()
    assert (corpus.meta["n_documents"], corpus.meta["n_val_docs"]) == (10, 3)


def test_max_bytes_caps_and_truncates_last_document(tmp_path, text_files):
    cap = len(text_files[0].encode("utf-8")) + 1 + 5
    documents = load_documents(f"text:{tmp_path}/doc*.txt", max_bytes=cap)
    assert documents == [text_files[0], text_files[1].encode("utf-8")[:5].decode("utf-8")]
    with pytest.raises(ValueError, match="max_bytes"):
        load_documents(max_bytes=0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("text:/no/such/file.txt", val_fraction=0.0)  # checked before any file is read


def test_missing_text_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_corpus(f"text:{missing}")


def test_unknown_source_names_allowed_forms():
    with pytest.raises(ValueError, match=r"source='s3://bucket'.*text:<path or glob>.*hf:<name>\[:<config>\]"):
        load_corpus("s3://bucket")


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to open a network connection")


def test_hf_offline_fails_fast_with_local_file_hint(monkeypatch):
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"hub is unreachable.*text:/path/to/\*\.txt"):
        load_corpus("hf:allenai/c4:en")


def test_hub_unreachable_when_connect_fails(monkeypatch):
    for var in hub._OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub.hub_reachable() is False


@pytest.fixture
def fake_hub(monkeypatch):
    """Pretend the hub is reachable and serve an endless stream from a fake ``datasets.load_dataset``."""
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "missing/name":
            raise FileNotFoundError("Dataset 'missing/name' doesn't exist on the Hub")
        return ({"text": f"row {i} ", "id": i} for i in itertools.count())

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_source_streams_until_cap(fake_hub):
    documents = load_documents("hf:org/name:cfg", max_bytes=30)
    assert fake_hub == [("org/name", "cfg", "train", True)]
    assert documents == ["row 0 ", "row 1 ", "row 2 ", "row 3 ", "ro"]
    assert load_documents("hf:org/name", max_bytes=6) == ["row 0 "] and fake_hub[-1][1] is None


def test_hf_errors_are_wrapped(fake_hub):
    with pytest.raises(ValueError, match=r"source='hf:missing/name'.*FileNotFoundError.*text:"):
        load_documents("hf:missing/name")
    with pytest.raises(ValueError, match=r"text_field='content'.*\['text', 'id'\]"):
        load_documents("hf:org/name", text_field="content")


def test_sampler_shapes_shift_and_windows(corpus):
    inputs, targets = corpus.sampler("train", batch_size=4, seq_len=16, seed=0)()
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    windows = torch.cat([inputs, targets[:, -1:]], dim=1)
    stream_windows = corpus.train.unfold(0, 17, 1)
    for row in windows:  # every row is a contiguous slice of the training stream
        assert (stream_windows == row).all(dim=1).any()


def test_sampler_seeded(corpus):
    def draw(seed, split="train"):
        sampler = corpus.sampler(split, batch_size=3, seq_len=8, seed=seed)
        return torch.cat([torch.cat(sampler()) for _ in range(3)])

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    assert not torch.equal(draw(5, "val"), draw(5))


def test_samplers_have_independent_generators(corpus):
    train, val = corpus.sampler("train", 2, 8, seed=0), corpus.sampler("val", 2, 8, seed=0)
    for _ in range(5):
        train()
    assert torch.equal(torch.cat(val()), torch.cat(corpus.sampler("val", 2, 8, seed=0)()))


def test_sampler_state_dict_resumes_stream(corpus):
    sampler = corpus.sampler("train", batch_size=2, seq_len=8, seed=3)
    sampler()
    state = sampler.state_dict()
    expected = [torch.cat(sampler()) for _ in range(3)]
    resumed = corpus.sampler("train", batch_size=2, seq_len=8, seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(torch.cat(resumed()), want)


def test_fixed_batches_repeat(corpus):
    first = corpus.fixed_batches("val", batch_size=2, seq_len=8, n_batches=3, seed=1)
    again = corpus.fixed_batches("val", batch_size=2, seq_len=8, n_batches=3, seed=1)
    sampler = corpus.sampler("val", 2, 8, seed=1)
    assert len(first) == 3
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) and x.device.type == "cpu" for x, y in zip(a, b))
        assert all(torch.equal(x, y) for x, y in zip(a, sampler()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split='test'.*'train', 'val'"),
        ({"seq_len": 0}, "seq_len=0 is invalid; allowed: an integer in"),
        ({"seq_len": 10**9}, r"seq_len=1000000000 is invalid; allowed: an integer in \[1, \d+\]"),
        ({"batch_size": 0}, "batch_size=0 is invalid; allowed: an integer >= 1"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_sampler_rejects_bad_arguments(corpus, kwargs, match):
    args = {"split": "val", "batch_size": 2, "seq_len": 8, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        corpus.sampler(**args)


def test_fixed_batches_rejects_zero_batches(corpus):
    with pytest.raises(ValueError, match="n_batches=0"):
        corpus.fixed_batches("val", 2, 8, n_batches=0)


def test_frequency_remap_keeps_the_frequent_ids_and_merges_the_rest():
    tokens = torch.tensor([3, 3, 3, 1, 1, 2, 0, 0])  # counts: id 3 three times, ids 0 and 1 twice, id 2 once
    remap = data.frequency_remap(tokens, 3, base_vocab=4)
    assert remap.tolist() == [1, 2, 2, 0]  # 3 -> 0, then the tie 0/1 goes to the smaller id; 1 and 2 share id 2
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (2000,), generator=generator) * torch.randint(0, 3, (2000,), generator=generator) % 50
    remap = data.frequency_remap(tokens, 12, base_vocab=50)
    counts = [int((tokens == i).sum()) for i in range(50)]  # independent ranking by plain Python sorting
    ranked = sorted(range(50), key=lambda i: (-counts[i], i))
    assert remap.tolist() == [ranked.index(i) if ranked.index(i) < 11 else 11 for i in range(50)]
    for vocab_size, match in [(1, "vocab_size"), (True, "vocab_size"), (51, "base_vocab")]:
        with pytest.raises(ValueError, match=match):
            data.frequency_remap(tokens, vocab_size, base_vocab=50)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\)"):
        data.frequency_remap(torch.tensor([0, 7]), 2, base_vocab=4)

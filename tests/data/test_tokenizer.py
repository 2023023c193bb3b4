"""Tokenizers by name: bytes, T5 (hub or local tokenizer.json, never downloaded here), BPE trained on the run's text."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, models

from gnlib.data import ByteTokenizer, load_corpus, load_documents
from gnlib.data import tokenizers as tok_module
from gnlib.data.tokenizers import make_tokenizer
from gnlib.experiment.runs import RunSpec, run

TEXTS = [f"def function_{i}(x):\n    return x * {i} + 'héllo wörld'\n" * 3 for i in range(40)]


def test_bytes_is_the_default():
    tok = make_tokenizer()
    assert isinstance(tok, ByteTokenizer) and (tok.vocab_size, tok.eos_id, tok.spec) == (256, 0, "bytes")


def test_bpe_is_trained_on_the_given_texts_cached_and_lossless(tmp_path, monkeypatch):
    calls = []

    def texts():
        calls.append(1)
        return TEXTS

    tok = make_tokenizer("bpe:300", training_texts=texts, cache_dir=tmp_path)
    assert (tok.vocab_size, tok.eos_id) == (300, 0)
    sample = "def function_7(x):\n    return x * 7 + 'héllo wörld' — 日本\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and max(ids) < 300 and tok.eos_id not in ids
    assert len(ids) < len(sample.encode("utf-8")) / 2  # subwords: far fewer tokens than bytes
    [cached] = tmp_path.glob("bpe-300-*.json")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached vocabulary must be reused")

    monkeypatch.setattr(Tokenizer, "train_from_iterator", no_training)
    again = make_tokenizer("bpe:300", training_texts=texts, cache_dir=tmp_path)
    assert again.sha256 == tok.sha256 and again.encode(sample) == ids and len(calls) == 2
    monkeypatch.undo()
    fresh = make_tokenizer("bpe:300", training_texts=texts, cache_dir=tmp_path / "fresh")
    assert fresh.sha256 == tok.sha256  # training is deterministic
    other = make_tokenizer("bpe:300", training_texts=lambda: TEXTS[:20], cache_dir=tmp_path)
    assert other.sha256 != tok.sha256 and len(list(tmp_path.glob("bpe-300-*.json"))) == 2


def test_t5_offline_names_both_ways(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"tokenizer='t5'.*unreachable.*online.*tokenizer='t5:/path/to/tokenizer"):
        make_tokenizer("t5")


def _t5_like_file(path, eos: str = "</s>"):
    """A small SentencePiece-style (Unigram) tokenizer.json with T5's special tokens."""
    pieces = [("<pad>", 0.0), (eos, 0.0), ("<unk>", 0.0)] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz "]
    Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False)).save(str(path))
    return path


def test_t5_from_a_local_tokenizer_json(tmp_path):
    path = _t5_like_file(tmp_path / "tokenizer.json")
    tok = make_tokenizer(f"t5:{path}")
    assert (tok.vocab_size, tok.eos_id) == (30, 1)  # 3 special pieces + 26 letters + space
    assert tok.decode(tok.encode("hello world")).replace(" ", "") == "helloworld"
    with pytest.raises(ValueError, match="no end-of-document token '</s>'"):
        make_tokenizer(f"t5:{_t5_like_file(tmp_path / 'other.json', eos='<eos>')}")


def test_t5_vocabulary_stops_before_its_sentinels_and_refuses_text_holding_one(tmp_path):
    path = _t5_like_file(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(path))
    hf.add_special_tokens([f"<extra_id_{i}>" for i in range(3)])  # T5's sentinels follow its 32,000 ids
    hf.save(str(path))
    tok = make_tokenizer(f"t5:{path}")
    assert (hf.get_vocab_size(with_added_tokens=True), tok.vocab_size) == (33, 30)
    assert max(tok.encode("hello world")) < tok.vocab_size
    with pytest.raises(ValueError, match=r"t5:.*holds '<extra_id_1>' \(id 31\).*beyond the model's 30 ids"):
        tok.encode_batch(["plain text", "a span <extra_id_1> left by a masking tool"])


def test_unparsable_tokenizer_json_names_the_parameter_and_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": [[1, 2')
    with pytest.raises(ValueError, match=rf"tokenizer='t5:{bad}'.*{bad}.*not a valid tokenizer.json"):
        make_tokenizer(f"t5:{bad}")


def test_unknown_forms_are_refused_with_the_allowed_ones():
    for name, match in [
        ("sentencepiece", "is invalid; allowed: one of the forms"),
        ("bpe:abc", "integer n >= 257"),
        ("bpe:10", "257"),
        (3, "tokenizer=3 is invalid; allowed: a string"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_tokenizer(name)
    with pytest.raises(ValueError, match="training_texts"):
        make_tokenizer("bpe:300")


def test_corpus_with_bpe_trains_on_its_train_split_only(tmp_path, monkeypatch):
    seen = {}
    original = tok_module._bpe

    def spy(spec, size, texts, cache):
        seen["texts"] = list(texts())
        return original(spec, size, lambda: seen["texts"], cache)

    monkeypatch.setattr(tok_module, "_bpe", spy)
    corpus = load_corpus(max_bytes=150_000, tokenizer="bpe:400", tokenizer_cache=tmp_path)
    documents = load_documents(max_bytes=150_000)
    assert len(seen["texts"]) == corpus.meta["n_train_docs"] < len(documents)
    assert set(seen["texts"]) <= set(documents)
    meta = corpus.meta
    assert (meta["tokenizer_spec"], meta["vocab_size"], meta["tokenizer_sha256"]) == (
        "bpe:400",
        400,
        corpus.tokenizer.sha256,
    )
    assert corpus.train.max() < 400 and (corpus.train == 0).sum() == meta["n_train_docs"] - 1  # EOS between docs
    [cached_tokens] = tmp_path.glob("tokens-*.pt")
    monkeypatch.setattr(tok_module.HFTokenizer, "encode_batch", lambda *a: pytest.fail("tokens must come from cache"))
    again = load_corpus(max_bytes=150_000, tokenizer="bpe:400", tokenizer_cache=tmp_path)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert again.train.dtype == torch.long


def test_vocabulary_flows_into_the_model_and_a_smaller_override_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GNLIB_OUTPUT_ROOT", str(tmp_path))  # BPE vocabularies are cached under outputs/
    spec = RunSpec(
        preset="paper_tiny",
        model_overrides=dict(d_model=16, n_layers=1, n_heads=2, d_ff=32),
        tokenizer="bpe:320",
        corpus_bytes=60_000,
        steps=1,
        batch_size=2,
        seq_len=16,
        val_batches=1,
    )
    history = run(spec, tmp_path / "run", progress=False)
    assert history.metadata["model"]["vocab_size"] == 320
    corpus_meta = history.metadata["corpus"]
    assert corpus_meta["tokenizer"] == "bpe:320" and len(corpus_meta["tokenizer_sha256"]) == 64
    assert list((tmp_path / "outputs" / "tokenizers").glob("bpe-320-*.json"))
    small = dataclasses.replace(spec, model_overrides={**spec.model_overrides, "vocab_size": 300})
    with pytest.raises(ValueError, match=r"model_overrides\['vocab_size'\]=300 is smaller than tokenizer='bpe:320'"):
        run(small, tmp_path / "small", progress=False)
    assert not (tmp_path / "small").exists()
    bigger = dataclasses.replace(spec, model_overrides={**spec.model_overrides, "vocab_size": 512})
    assert run(bigger, None, progress=False).metadata["model"]["vocab_size"] == 512
    assert torch.isfinite(torch.tensor(history.rows[-1]["val_loss"]))

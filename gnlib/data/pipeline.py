"""A run's data: tokenizer, training batch source and fixed validation set, from a RunSpec's data fields.

:func:`build_run_data` makes them for ``RunSpec.data`` ``"windows"`` (random windows of the train split,
:class:`gnlib.data.BatchSampler`; ``corpus_bytes`` defaults to 4 MB) or ``"stream"``
(:class:`gnlib.data.stream.PackedStream` over the train split's documents in the run's seeded order from
``data_start`` on; an ``hf:`` dataset in its own order), with the validation set of each, and checks before
any training that a stream holds every token the run will draw (:func:`tokens_drawn`). :func:`after_warmup`
moves a spec past a warm-up's tokens. What each kind reads, validates on, records and refuses:
docs/model-and-data.md, section "Training and validation data".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, TypeVar

import torch

from gnlib import distributed
from gnlib.data.corpus import DEFAULT_MAX_BYTES, Corpus, check_corpus_source, load_corpus
from gnlib.data.hub import hf_documents, hub_reachable
from gnlib.data.stream import PackedStream, shuffled_documents
from gnlib.data.tokenizers import check_tokenizer_name, make_tokenizer
from gnlib.runtime import check_choice, invalid, is_integer

DATA_KINDS = ("windows", "stream")
HF_VALIDATION_SPLIT = "validation"


class DataSpec(Protocol):
    """The settings of a run this module reads: :class:`gnlib.experiment.runs.RunSpec` has every one."""

    corpus: str
    corpus_bytes: int | None
    tokenizer: str
    data: str
    data_epochs: int
    data_start: int
    data_start_seed: int | None
    model_overrides: Mapping[str, Any]
    optimizer: str
    hyperparameters: Mapping[str, Any]
    accumulation: int
    batch_size: int
    seq_len: int
    steps: int
    seed: int
    val_batches: int | None


#: A :class:`DataSpec` type that :func:`after_warmup` returns unchanged in kind (a RunSpec stays a RunSpec).
Spec = TypeVar("Spec", bound=DataSpec)


@dataclass
class RunData:
    """What a run trains and evaluates on.

    Attributes:
        train: batch source ``() -> (inputs, targets)`` with ``state_dict``/``load_state_dict``.
        val: the fixed validation batches (this process's rows).
        vocab_size: the tokenizer's vocabulary size (the model's embedding and head must cover it).
        tokenizer: the tokenizer (:mod:`gnlib.data.tokenizers`).
        corpus: the in-memory corpus (None for a streamed ``hf:`` dataset).
        meta: provenance for the run's metadata.
    """

    train: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    vocab_size: int
    tokenizer: Any
    corpus: Corpus | None
    meta: dict[str, Any]


def check_data_fields(spec: DataSpec) -> None:
    """Raise ``ValueError`` naming the first bad data field of a RunSpec (corpus, tokenizer, data, data_epochs, ...).

    Cheap: nothing is loaded, trained or downloaded (a ``text:`` corpus's file names are listed).
    """
    check_corpus_source(spec.corpus)
    check_tokenizer_name(spec.tokenizer)
    check_choice("data", spec.data, DATA_KINDS)
    if not is_integer(spec.data_epochs) or spec.data_epochs < 1:
        raise invalid("", "data_epochs", spec.data_epochs, "an integer >= 1 (passes over the training data)")
    if not is_integer(spec.data_start) or spec.data_start < 0:
        raise invalid("", "data_start", spec.data_start, "an integer >= 0 (training tokens to skip)")
    seed = spec.data_start_seed
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise invalid("", "data_start_seed", seed, "an integer >= 0 (the warm-up's seed), or None (seed)")
    if spec.data == "windows" and (spec.data_start or spec.data_epochs != 1 or seed is not None):
        raise ValueError(
            f"data_start={spec.data_start!r}, data_start_seed={seed!r} and data_epochs={spec.data_epochs!r} apply "
            "to data='stream' only (random windows have no position)"
        )
    if spec.corpus_bytes is not None and (not is_integer(spec.corpus_bytes) or spec.corpus_bytes < 1):
        raise invalid("", "corpus_bytes", spec.corpus_bytes, "an integer >= 1 (bytes of text to read), or None")
    vocab = spec.model_overrides.get("vocab_size")
    if vocab is not None and spec.tokenizer == "bytes" and vocab < 256:
        raise ValueError(f"model_overrides['vocab_size']={vocab} is smaller than tokenizer='bytes''s 256 ids")


def batches_per_step(spec: DataSpec) -> int:
    """Training batches one outer step draws: GN's inner steps plus its line-search batches, else ``accumulation``.

    ``spec.hyperparameters`` are the options the optimizer is built with (a protocol's included):
    ``line_search_batches=None`` draws N = ``inner_steps`` line-search batches.
    """
    from gnlib.optim.gn_options import GN_VARIANTS, GaussNewtonOptions

    if spec.optimizer not in GN_VARIANTS:
        return spec.accumulation
    defaults = GaussNewtonOptions()
    inner_steps, line_search_batches = (
        spec.hyperparameters.get(name, getattr(defaults, name)) for name in ("inner_steps", "line_search_batches")
    )
    return inner_steps + (inner_steps if line_search_batches is None else line_search_batches)


def tokens_drawn(spec: DataSpec, steps: int | None = None) -> int:
    """Training tokens all processes draw in ``steps`` outer steps (default ``spec.steps``)."""
    steps = spec.steps if steps is None else steps
    return steps * batches_per_step(spec) * spec.batch_size * spec.seq_len * distributed.world_size()


def after_warmup(base: Spec, warmup_steps: int, batch_size: int | None = None, seed: int = 0) -> Spec:
    """``base`` moved past the tokens a warm-up of ``warmup_steps`` AdamW steps (one micro-batch each) consumed.

    With ``data="stream"`` the studied runs continue where the warm-up of seed ``seed`` stopped
    (``data_start`` += its tokens, at ``batch_size`` sequences per warm-up step, default
    ``base.batch_size``; ``data_start_seed`` = ``seed``, whose document order the warm-up read); random
    windows have no position and are returned unchanged.
    """
    if base.data != "stream":
        return base
    warmup = dataclasses.replace(
        base,
        optimizer="adamw",
        accumulation=1,
        hyperparameters={},
        batch_size=base.batch_size if batch_size is None else batch_size,
    )
    return dataclasses.replace(
        base, data_start=base.data_start + tokens_drawn(warmup, warmup_steps), data_start_seed=seed
    )


#: Fixed validation batches of a spec that leaves ``val_batches`` unset (a run passes its protocol's).
DEFAULT_VAL_BATCHES = 8


def build_run_data(spec: DataSpec, device: torch.device, *, tokenizer_cache: str = "outputs/tokenizers") -> RunData:
    """Tokenizer, training batches and validation set of ``spec`` (module docstring).

    ``spec.val_batches`` None means :data:`DEFAULT_VAL_BATCHES`.

    Raises:
        ValueError: the tokenizer's vocabulary exceeds ``model_overrides['vocab_size']``, a split too short for
            one batch, or a stream that would run out before ``spec.steps`` (all before training).
        ConnectionError: ``t5`` or an ``hf:`` corpus while the hub is unreachable.
    """
    check_data_fields(spec)
    if spec.val_batches is None:
        spec = dataclasses.replace(spec, val_batches=DEFAULT_VAL_BATCHES)
    if spec.data == "stream" and spec.corpus.startswith("hf:"):
        data = _hf_stream(spec, device, tokenizer_cache)
    else:
        max_bytes = (
            spec.corpus_bytes
            if spec.corpus_bytes is not None
            else (DEFAULT_MAX_BYTES if spec.data == "windows" else None)
        )
        corpus = load_corpus(
            spec.corpus,
            max_bytes=max_bytes,
            tokenizer=spec.tokenizer,
            tokenizer_cache=tokenizer_cache,
            max_bytes_name="corpus_bytes",
        )
        data = _in_memory(spec, corpus, device) if spec.data == "stream" else _windows(spec, corpus, device)
    vocab = spec.model_overrides.get("vocab_size")
    if vocab is not None and vocab < data.vocab_size:
        raise ValueError(
            f"model_overrides['vocab_size']={vocab} is smaller than tokenizer={spec.tokenizer!r}'s "
            f"{data.vocab_size} ids; remove the override (the model then takes the tokenizer's size) "
            f"or raise it"
        )
    return data


def _windows(spec: DataSpec, corpus: Corpus, device: torch.device) -> RunData:
    train = corpus.sampler("train", spec.batch_size, spec.seq_len, seed=spec.seed, device=device)
    val = corpus.fixed_batches("val", spec.batch_size, spec.seq_len, spec.val_batches, seed=0, device=device)
    meta = {**corpus.meta, "data": "windows"}
    return RunData(train, val, corpus.vocab_size, corpus.tokenizer, corpus, meta)


def _in_memory(spec: DataSpec, corpus: Corpus, device: torch.device) -> RunData:
    eos = corpus.tokenizer.eos_id
    available = len(corpus.train) + 1  # + the EOS after the last document
    needed = spec.data_start + tokens_drawn(spec) + 1  # + the last batch's last target
    passes = math.ceil(needed / available)
    if passes > spec.data_epochs:
        raise ValueError(
            f"the training stream is too short: steps={spec.steps} × {batches_per_step(spec)} batches × "
            f"{distributed.world_size()}×{spec.batch_size}×{spec.seq_len} tokens + data_start={spec.data_start} "
            f"needs {needed:,} tokens, the train split of corpus={spec.corpus!r} (corpus_bytes={spec.corpus_bytes}) "
            f"holds {available:,} with tokenizer={spec.tokenizer!r}: {passes} passes, data_epochs="
            f"{spec.data_epochs} allows {spec.data_epochs}. Lower steps or data_start, load more text, or set "
            f"data_epochs={passes}"
        )
    documents, order = shuffled_documents(
        corpus.train, eos, spec.seed, prefix_tokens=spec.data_start, prefix_seed=spec.data_start_seed
    )
    train = PackedStream(
        documents,
        spec.batch_size,
        spec.seq_len,
        device=device,
        epochs=spec.data_epochs,
        start=spec.data_start,
        tokens_per_epoch=available,
    )
    # a few packed batches of the val split would be one or two long files: windows across all of it instead
    val = corpus.fixed_batches("val", spec.batch_size, spec.seq_len, spec.val_batches, seed=0, device=device)
    meta = {
        **corpus.meta,
        "data": "stream",
        "tokens_available": available,
        "tokens_needed": needed,
        "data_start": spec.data_start,
        "data_epochs": spec.data_epochs,
        "passes": passes,
        "document_order": order,
    }
    return RunData(train, val, corpus.vocab_size, corpus.tokenizer, corpus, meta)


def _hf_stream(spec: DataSpec, device: torch.device, tokenizer_cache: str) -> RunData:
    name, _, config = spec.corpus[len("hf:") :].partition(":")
    if not hub_reachable():
        raise ConnectionError(
            f"corpus={spec.corpus!r} with data='stream' streams from the Hugging Face hub, which "
            "is unreachable (offline or HF_HUB_OFFLINE set); use a local corpus, e.g. "
            "corpus='text:/path/to/*.txt'"
        )

    limit = spec.corpus_bytes or DEFAULT_MAX_BYTES  # BPE trains on this much of the training stream

    def training_texts() -> list[str]:
        import datasets

        texts, used = [], 0
        for row in datasets.load_dataset(name, config or None, split="train", streaming=True):
            texts.append(row["text"])
            used += len(row["text"].encode("utf-8"))
            if used >= limit:
                return texts
        return texts

    tok = make_tokenizer(spec.tokenizer, training_texts=training_texts, cache_dir=tokenizer_cache)
    train = PackedStream(
        hf_documents(name, config or None, "train", tok),
        spec.batch_size,
        spec.seq_len,
        device=device,
        epochs=spec.data_epochs,
        start=spec.data_start,
    )
    val_stream = PackedStream(
        hf_documents(name, config or None, HF_VALIDATION_SPLIT, tok),
        spec.batch_size,
        spec.seq_len,
        device=device,
        name=f"{HF_VALIDATION_SPLIT} split",
    )
    meta = {
        "source": spec.corpus,
        "data": "stream",
        "tokenizer": tok.name,
        "tokenizer_spec": tok.spec,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "tokens_needed": spec.data_start + tokens_drawn(spec),
        "data_start": spec.data_start,
        "data_epochs": spec.data_epochs,
        "validation_split": HF_VALIDATION_SPLIT,
    }
    return RunData(train, _fixed(val_stream, spec), tok.vocab_size, tok, None, meta)


def _fixed(stream: PackedStream, spec: DataSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``spec.val_batches`` batches of ``stream``; a clear error when the split is too short."""
    try:
        return [stream() for _ in range(spec.val_batches)]
    except ValueError as err:
        raise ValueError(
            f"val_batches={spec.val_batches} × batch_size={spec.batch_size} × seq_len={spec.seq_len} "
            f"does not fit in the {stream.name}: {err}"
        ) from err

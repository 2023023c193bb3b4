"""Corpora → byte tokens → deterministic train/val split → seeded (B, T) language-model batches.

``load_corpus(source)`` reads ``"default"`` (the running Python's documentation and standard-library
sources), ``"text:<path or glob>"`` (one document per file) or ``"hf:<name>[:<config>]"`` (a Hugging Face
dataset's ``train`` split, streamed), takes documents in order until ``max_bytes``, splits the documents, not
tokens, into train and val by a seeded permutation (:func:`split_indices`) and tokenizes each split
(:mod:`gnlib.data.tokenizers`, bytes by default), its documents joined by the end-of-document token.
``meta["sha256"]`` hashes the documents joined by ``DOCUMENT_SEPARATOR`` (NUL). :class:`Corpus` serves
seeded windows of a split. The sources and the split in full: docs/model-and-data.md, section "Corpora".
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from gnlib.checks import check_positive_int
from gnlib.data.hub import hf_corpus_documents
from gnlib.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer
from gnlib.data.windows import BatchSampler
from gnlib.runtime import atomic_torch_save, check_choice, invalid, is_integer, output_path

DOCUMENT_SEPARATOR = "\x00"
DEFAULT_MAX_BYTES = 4_000_000
SOURCE_FORMS = ["default", "text:<path or glob>", "hf:<name>[:<config>]"]
SPLITS = ["train", "val"]
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages differ between machines
_LATER_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo"}  # read after the rest of the library


@dataclass
class Corpus:
    """Token streams of a split corpus.

    Attributes:
        train: LongTensor (N_train,), the training documents' tokens joined by the separator token.
        val: LongTensor (N_val,), the same for the validation documents.
        tokenizer: a :class:`gnlib.data.tokenizers.Tokenizer` (``vocab_size``, ``eos_id``, ``encode``, ``decode``).
        meta: provenance: source, counts, size, sha256, Python version, tokenizer, split settings.
    """

    train: Tensor
    val: Tensor
    tokenizer: Tokenizer
    meta: dict

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model's embedding and head must cover."""
        return self.tokenizer.vocab_size

    def sampler(
        self, split: str, batch_size: int, seq_len: int, seed: int, device: str | torch.device = "cpu"
    ) -> BatchSampler:
        """A seeded batch source over ``split`` ("train" or "val"), this process's shard; see :class:`BatchSampler`."""
        check_choice("split", split, SPLITS)
        return BatchSampler(getattr(self, split), batch_size, seq_len, seed, device)

    def fixed_batches(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        n_batches: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> list[tuple[Tensor, Tensor]]:
        """The first ``n_batches`` batches of a sampler seeded with ``seed``: the same list on every call.

        Under torchrun each process gets its shard of every batch (:class:`BatchSampler`).
        """
        if not is_integer(n_batches) or n_batches < 1:
            raise invalid("", "n_batches", n_batches, "an integer >= 1")
        sampler = self.sampler(split, batch_size, seq_len, seed, device)
        return [sampler() for _ in range(n_batches)]


def split_indices(
    n_documents: int, val_fraction: float, split_seed: int, *, max_bytes_name: str = "max_bytes"
) -> tuple[list[int], list[int]]:
    """Sorted document indices of (train, val): a seeded permutation's first ``round(val_fraction·n)`` are val.

    Val and train each get at least one document; the two lists are disjoint and cover ``range(n)``.
    ``max_bytes_name`` is the caller's name of the text cap, for the message on too few documents.
    """
    _check_val_fraction(val_fraction)
    if n_documents < 2:
        raise ValueError(
            f"a train/val split needs at least 2 documents, got {n_documents}; "
            f"split the text into several files or raise {max_bytes_name}"
        )
    n_val = min(max(1, round(val_fraction * n_documents)), n_documents - 1)
    order = torch.randperm(n_documents, generator=torch.Generator().manual_seed(split_seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_documents(
    source: str = "default",
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    text_field: str = "text",
    max_bytes_name: str = "max_bytes",
) -> list[str]:
    """Documents of ``source`` in order, taken until their joined text reaches ``max_bytes`` (None: all).

    ``max_bytes_name`` is the caller's name of ``max_bytes``, for messages.

    Raises:
        ValueError: unknown source form, bad ``max_bytes``, a dataset without ``text_field``.
        FileNotFoundError: a ``text:`` path or glob matching no file.
        ConnectionError: an ``hf:`` source while the Hugging Face hub is unreachable.
    """
    if max_bytes is not None and (not is_integer(max_bytes) or max_bytes < 1):
        raise invalid("", max_bytes_name, max_bytes, "an integer >= 1, or None (no cap)")
    if source == "default":
        return list(_default_documents(max_bytes))
    if source.startswith("text:"):
        return _text_documents(source[len("text:") :], max_bytes)
    if source.startswith("hf:"):
        return _take(hf_corpus_documents(source, text_field), max_bytes)
    raise invalid("", "source", source, f"one of the forms {SOURCE_FORMS}")


def load_corpus(
    source: str = "default",
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    text_field: str = "text",
    tokenizer: str = "bytes",
    tokenizer_cache: str = "outputs/tokenizers",
    max_bytes_name: str = "max_bytes",
) -> Corpus:
    """Load ``source`` (see the module docstring), split its documents, and tokenize them.

    Args:
        source: ``"default"``, ``"text:<path or glob>"`` or ``"hf:<name>[:<config>]"``.
        val_fraction: share of the documents held out for validation.
        split_seed: seed of the document split.
        max_bytes: cap on the text read (None: all of it).
        text_field: the column holding the text (``hf:`` sources).
        tokenizer: a form of :data:`gnlib.data.tokenizers.TOKENIZER_FORMS`; ``bpe:<n>`` is trained on the train split.
        tokenizer_cache: where trained BPE vocabularies are cached.
        max_bytes_name: the caller's name of ``max_bytes`` (e.g. a RunSpec's ``corpus_bytes``), for messages.
    """
    _check_val_fraction(val_fraction)
    documents = load_documents(source, max_bytes=max_bytes, text_field=text_field, max_bytes_name=max_bytes_name)
    train_idx, val_idx = split_indices(len(documents), val_fraction, split_seed, max_bytes_name=max_bytes_name)
    text = DOCUMENT_SEPARATOR.join(documents).encode("utf-8")
    tok = make_tokenizer(tokenizer, training_texts=lambda: [documents[i] for i in train_idx], cache_dir=tokenizer_cache)
    train, val = _encoded_splits(
        tok, documents, (train_idx, val_idx), hashlib.sha256(text).hexdigest(), tokenizer_cache
    )
    meta = {
        "source": source,
        "n_documents": len(documents),
        "n_train_docs": len(train_idx),
        "n_val_docs": len(val_idx),
        "size_bytes": len(text),
        "max_bytes": max_bytes,
        "sha256": hashlib.sha256(text).hexdigest(),
        "python_version": platform.python_version(),
        "tokenizer": tok.name,
        "tokenizer_spec": tok.spec,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "n_train_tokens": len(train),
        "n_val_tokens": len(val),
    }
    return Corpus(train, val, tok, meta)


def _encoded_splits(
    tokenizer: Tokenizer, documents: list[str], splits: tuple[list[int], ...], text_sha256: str, cache_dir: str
) -> list[Tensor]:
    """The tokens of each split (:func:`encode_documents`); subword tokens are cached beside the vocabulary.

    Subword tokenizers encode a few hundred kB per second on a small CPU, so their tokens are stored in
    ``<cache_dir>/tokens-<hash>.pt`` (hash of the tokenizer, the text and the split) and reused.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return [encode_documents(tokenizer, [documents[i] for i in idx]) for idx in splits]
    key = hashlib.sha256(json.dumps([tokenizer.sha256, text_sha256, splits]).encode()).hexdigest()[:16]
    path = output_path(cache_dir) / f"tokens-{key}.pt"
    if path.is_file():
        return [t.long() for t in torch.load(path, weights_only=True)]
    tokens = [encode_documents(tokenizer, [documents[i] for i in idx]) for idx in splits]
    atomic_torch_save([t.int() for t in tokens], path)
    return tokens


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> Tensor:
    """Tokens (N,) of ``documents`` joined by the tokenizer's end-of-document token (none after the last)."""
    if isinstance(tokenizer, ByteTokenizer):  # one pass over the joined text; the separator is the NUL byte
        return tokenizer.encode_tensor(DOCUMENT_SEPARATOR.join(documents))
    ids: list[int] = []
    for i, doc_ids in enumerate(tokenizer.encode_batch(documents)):
        ids += [tokenizer.eos_id, *doc_ids] if i else doc_ids
    return torch.tensor(ids, dtype=torch.long)


def _check_val_fraction(val_fraction: float) -> None:
    """Raise ``ValueError`` unless 0 < ``val_fraction`` < 1."""
    if not 0.0 < val_fraction < 1.0:
        raise invalid("", "val_fraction", val_fraction, "a number strictly between 0 and 1")


def _take(documents: Iterable[str], max_bytes: int | None) -> list[str]:
    """Non-blank documents in order until the joined text would pass ``max_bytes``; the last is truncated."""
    taken: list[str] = []
    used = 0
    for doc in documents:
        if not doc.strip():
            continue
        cost = len(doc.encode("utf-8")) + (1 if taken else 0)
        if max_bytes is not None and used + cost > max_bytes:
            room = max_bytes - used - (1 if taken else 0)
            tail = doc.encode("utf-8")[: max(room, 0)].decode("utf-8", errors="ignore")
            if tail.strip():
                taken.append(tail)
            break
        taken.append(doc)
        used += cost
    return taken


def _stdlib_paths() -> list[Path]:
    """The standard library's ``.py`` files sorted by path relative to its root, installed packages pruned.

    Files under the "later" folders (tests, IDLE, lib2to3, turtledemo) come after all others, so a cap of a
    few MB reads the same text as before those folders joined the corpus.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        paths += [Path(folder, f) for f in files if f.endswith(".py")]

    def key(path: Path) -> tuple[bool, str]:
        relative = path.relative_to(root)
        return bool(_LATER_DIRS.intersection(relative.parts[:-1])), relative.as_posix()

    return sorted(paths, key=key)


@functools.lru_cache(maxsize=8)
def _default_documents(max_bytes: int | None) -> tuple[str, ...]:
    """Documentation topics (sorted by name), then standard-library sources; cached per ``max_bytes``."""
    from pydoc_data.topics import topics

    sources = (p.read_bytes().decode("utf-8", errors="replace") for p in _stdlib_paths())
    return tuple(_take(itertools.chain((topics[k] for k in sorted(topics)), sources), max_bytes))


def check_corpus_source(source: str, *, parameter: str = "corpus") -> None:
    """Raise ``ValueError`` unless ``source`` can make a corpus; reads nothing but the names of files.

    The form must be one of :data:`SOURCE_FORMS`; a ``text:`` glob must match at least two files, since each
    file is one document and the train/val split needs two. ``parameter`` names ``source`` in the message.
    """
    if not isinstance(source, str) or not (source == "default" or source.startswith(("text:", "hf:"))):
        raise invalid("", parameter, source, f"one of the forms {SOURCE_FORMS}")
    if source.startswith("text:") and len(files := _text_files(source[len("text:") :])) < 2:
        raise ValueError(
            f"{parameter}={source!r} matches {len(files)} file(s); a text corpus is one document per file and "
            "its train/val split needs at least 2: name a glob such as 'text:data/my_corpus/*.txt'"
        )


def _text_files(pattern: str) -> list[str]:
    """The files matching ``pattern`` (``~`` expanded, ``**`` recursive), sorted."""
    return sorted(p for p in glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))


def _text_documents(pattern: str, max_bytes: int | None) -> list[str]:
    """One document per file matching ``pattern`` (sorted paths), read by ``datasets``' text builder."""
    files = _text_files(pattern)
    if not files:
        raise FileNotFoundError(
            f"source='text:{pattern}': no file matches {pattern!r}; "
            "name a file or a glob such as 'text:data/my_corpus/*.txt'"
        )
    import datasets

    ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", streaming=True)
    try:
        return _take((row["text"] for row in ds), max_bytes)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"source='text:{pattern}': {_undecodable(files)} is not UTF-8 text ({err.reason}); "
            "text: corpora read UTF-8 files: convert it, or leave it out of the glob"
        ) from None


def _undecodable(files: list[str]) -> str:
    """The first of ``files`` that is not UTF-8 (named for the error message)."""
    for path in files:
        try:
            Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return repr(path)
    return "a file"


def frequency_remap(tokens: Tensor, vocab_size: int, *, base_vocab: int = 256) -> Tensor:
    """A lookup table onto a smaller vocabulary: the ``vocab_size - 1`` most frequent ids, plus one shared id.

    Dense curvature matrices need a tiny model, and the embedding and head of a 256-byte vocabulary would
    dominate its parameters; ``remap[tokens]`` keeps the frequent bytes apart and merges the rare ones.
    With counts c_i of id i in ``tokens``, the ids are ranked by decreasing c_i (ties: the smaller id
    first); the id of rank r < V − 1 maps to r, every other id (rare or absent) to V − 1, the shared
    "other" token.

    Args:
        tokens: (N,) integer ids in [0, ``base_vocab``) whose counts rank the ids; pass the training split,
            so the validation split never shapes the vocabulary.
        vocab_size: V, the size of the reduced vocabulary, 2 <= V <= ``base_vocab``.
        base_vocab: size of the original vocabulary (256 for bytes).

    Returns:
        (base_vocab,) int64 table on ``tokens``' device with values in [0, V).

    Raises:
        ValueError: ``vocab_size`` outside [2, base_vocab], or ``tokens`` holding ids outside [0, base_vocab).
    """
    check_positive_int("vocab_size", vocab_size, minimum=2)
    if vocab_size > base_vocab:
        raise invalid("", "vocab_size", vocab_size, f"at most base_vocab={base_vocab} (the vocabulary it reduces)")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= base_vocab):
        raise ValueError(f"tokens must lie in [0, {base_vocab}), got ids in [{int(tokens.min())}, {int(tokens.max())}]")
    counts = torch.bincount(tokens.reshape(-1), minlength=base_vocab)
    frequent = counts.argsort(descending=True, stable=True)[: vocab_size - 1]
    remap = torch.full((base_vocab,), vocab_size - 1, dtype=torch.long, device=tokens.device)
    remap[frequent] = torch.arange(vocab_size - 1, device=tokens.device)
    return remap

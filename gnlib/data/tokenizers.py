"""Tokenizers by name: UTF-8 bytes, T5's 32k vocabulary, or a BPE vocabulary trained on the run's own text.

``make_tokenizer(name, ...)`` accepts ``"bytes"`` (:class:`ByteTokenizer`), ``"t5"`` (fetched from the hub),
``"t5:<path/to/tokenizer.json>"`` (a local copy) and ``"bpe:<vocab size>"`` (trained on the training documents
handed in, cached as ``<cache>/bpe-<hash>.json``); the last three are :class:`HFTokenizer` objects of the
``tokenizers`` library. Each has what :class:`Tokenizer` lists; ``sha256`` hashes its serialized vocabulary
and rules, which metadata records. Each form's vocabulary, end-of-document token and cache:
docs/model-and-data.md, section "Tokenizers".
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import Tensor

from gnlib.runtime import atomic_write_text, invalid

TOKENIZER_FORMS = ["bytes", "t5", "t5:<path to tokenizer.json>", "bpe:<vocab size>"]
T5_HUB_NAME = "google-t5/t5-base"
#: T5's sentinel tokens, the last 100 ids of its vocabulary (span corruption only).
SENTINEL = re.compile(r"<extra_id_\d+>")
BPE_EOS = "<eos>"
BPE_MIN_VOCAB = 257  # 256 byte symbols + the end-of-document token


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    spec: str
    vocab_size: int
    eos_id: int
    sha256: str

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    def encode_tensor(self, text: str) -> Tensor:
        """Token ids of ``text`` as a LongTensor (n,)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text."""

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of ``ids``."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary of 256 ids, no training, lossless on valid text."""

    name = "byte"
    spec = "bytes"
    vocab_size = 256
    eos_id = 0  # DOCUMENT_SEPARATOR, the NUL byte
    sha256 = hashlib.sha256(b"utf-8 bytes, 256 ids").hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids (the UTF-8 bytes) of ``text``."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        """Token ids of ``text`` as a LongTensor of shape (n_bytes,), without a Python list in between."""
        data = bytearray(text.encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of the byte ids ``ids``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with an end-of-document token, behind gnlib's tokenizer interface.

    ``vocab_size`` counts the ids a model needs: T5's (``sentinels=True``) stops before its 100 sentinel
    tokens ``<extra_id_N>`` (32,000 of 32,100 ids, as the study's model), which never occur in text; a
    text that holds one is refused when encoded.
    """

    def __init__(self, spec: str, tokenizer, eos_token: str, *, sentinels: bool = False) -> None:
        """Wrap ``tokenizer`` (a ``tokenizers.Tokenizer``) whose vocabulary holds ``eos_token``."""
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer={spec!r} has no end-of-document token {eos_token!r} in its vocabulary")
        self.spec, self.name, self.hf, self.eos_id = spec, spec, tokenizer, eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if sentinels:
            ids = [i for token, i in tokenizer.get_vocab(with_added_tokens=True).items() if SENTINEL.fullmatch(token)]
            self.vocab_size = min(ids, default=self.vocab_size)
        self.sha256 = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._covered(self.hf.encode(text, add_special_tokens=False).ids)

    def _covered(self, ids: list[int]) -> list[int]:
        """``ids``, or a ValueError naming the first id beyond ``vocab_size`` (a T5 sentinel in the text)."""
        beyond = [i for i in ids if i >= self.vocab_size]
        if beyond:
            raise ValueError(
                f"tokenizer={self.spec!r}: the text holds {self.hf.id_to_token(beyond[0])!r} (id {beyond[0]}), a "
                f"sentinel id beyond the model's {self.vocab_size} ids, which never occurs in natural text; "
                f"remove it from the corpus"
            )
        return ids

    def encode_tensor(self, text: str) -> Tensor:
        """Token ids of ``text`` as a LongTensor (n,)."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (the library tokenizes them in parallel)."""
        return [self._covered(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of ``ids``."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.hf.decode(ids, skip_special_tokens=False)


def check_tokenizer_name(name: str) -> None:
    """Raise ``ValueError`` naming ``tokenizer`` unless ``name`` has one of :data:`TOKENIZER_FORMS`' forms.

    Checks the form only (a ``t5:`` file must exist; a BPE size must be an integer >= 257); nothing is
    loaded or trained.
    """
    if not isinstance(name, str):
        raise invalid("", "tokenizer", name, f"a string of one of the forms {TOKENIZER_FORMS}")
    if name in ("bytes", "t5"):
        return
    if name.startswith("t5:"):
        path = Path(os.path.expanduser(name[len("t5:") :]))
        if not path.is_file():
            raise ValueError(f"tokenizer={name!r}: no file {str(path)!r}; give the path of T5's tokenizer.json")
        return
    if name.startswith("bpe:"):
        size = name[len("bpe:") :]
        if not (size.isdigit() and int(size) >= BPE_MIN_VOCAB):
            raise invalid(
                "",
                "tokenizer",
                name,
                f"'bpe:<n>' with an integer n >= {BPE_MIN_VOCAB} (256 bytes + end of document), e.g. 'bpe:4096'",
            )
        return
    raise invalid("", "tokenizer", name, f"one of the forms {TOKENIZER_FORMS}")


def make_tokenizer(
    name: str = "bytes",
    *,
    training_texts: Callable[[], Iterable[str]] | None = None,
    cache_dir: str | Path = "outputs/tokenizers",
) -> Tokenizer:
    """The tokenizer called ``name`` (module docstring).

    Args:
        name: one of :data:`TOKENIZER_FORMS`.
        training_texts: zero-argument callable giving the training documents (``bpe:`` only; called only
            when the cache has no vocabulary for them).
        cache_dir: folder of trained BPE vocabularies (relative paths resolve like notebook outputs).

    Raises:
        ValueError: an unknown form, a ``tokenizer.json`` that does not parse, a BPE size too small.
        ConnectionError: ``"t5"`` while the Hugging Face hub is unreachable (the message names both ways).
    """
    check_tokenizer_name(name)
    if name == "bytes":
        return ByteTokenizer()
    if name == "t5":
        return _t5_from_hub()
    if name.startswith("t5:"):
        return _from_file(name, Path(os.path.expanduser(name[len("t5:") :])), eos_token="</s>", sentinels=True)
    if training_texts is None:
        raise ValueError(f"tokenizer={name!r} is trained on the run's training documents; pass training_texts")
    return _bpe(name, int(name[len("bpe:") :]), training_texts, cache_dir)


def _t5_from_hub() -> HFTokenizer:
    """T5's tokenizer from the hub, or a ConnectionError that names the local-file alternative."""
    from gnlib.data.hub import hub_reachable

    local = "tokenizer='t5:/path/to/tokenizer.json' (a local copy of T5's tokenizer.json)"
    if not hub_reachable():
        raise ConnectionError(
            f"tokenizer='t5' fetches {T5_HUB_NAME}'s tokenizer.json from the Hugging Face hub, "
            f"which is unreachable (offline or HF_HUB_OFFLINE set); go online, or use {local}"
        )
    from tokenizers import Tokenizer as HF

    try:
        return HFTokenizer("t5", HF.from_pretrained(T5_HUB_NAME), eos_token="</s>", sentinels=True)
    except Exception as err:  # the hub raises many types; report them as one, with the way out
        raise ConnectionError(
            f"tokenizer='t5': could not fetch {T5_HUB_NAME} ({type(err).__name__}: {err}); use {local}"
        ) from err


def _from_file(spec: str, path: Path, eos_token: str, *, sentinels: bool = False) -> HFTokenizer:
    """A tokenizer from a ``tokenizer.json`` file, or a ValueError naming the file when it does not parse."""
    from tokenizers import Tokenizer as HF

    try:
        tokenizer = HF.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"tokenizer={spec!r}: {str(path)!r} is not a valid tokenizer.json ({err})") from err
    return HFTokenizer(spec, tokenizer, eos_token, sentinels=sentinels)


def _bpe(spec: str, vocab_size: int, training_texts: Callable[[], Iterable[str]], cache_dir: str | Path) -> HFTokenizer:
    """Byte-level BPE with ``vocab_size`` ids trained on ``training_texts()``, cached by content hash."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gnlib.runtime import output_path

    texts = list(training_texts())
    digest = hashlib.sha256(f"bpe v1 {vocab_size}\n".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    path = output_path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return _from_file(spec, path, BPE_EOS)
    tokenizer = HF(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    atomic_write_text(path, tokenizer.to_str())
    return HFTokenizer(spec, tokenizer, BPE_EOS)

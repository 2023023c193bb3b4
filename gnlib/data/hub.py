"""The Hugging Face hub, the only source that needs the network: whether it is reachable, and its two loaders.

:func:`hf_corpus_documents` reads a dataset's ``train`` split into memory (a corpus, split by document like
local text); :func:`hf_documents` streams a split for a packed stream, tokenizing as it goes. Offline (no
connection, or ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, :func:`hub_reachable`), the corpus loader,
and the pipeline before it streams, fail at once with a message that names a local alternative.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

import torch
from torch import Tensor

from gnlib.data.stream import Documents
from gnlib.runtime import invalid

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or a TCP connection to the hub's host fails within ``timeout`` s."""
    if any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_VARS):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hf_corpus_documents(source: str, text_field: str) -> Iterator[str]:
    """The texts of the ``train`` split of ``hf:<name>[:<config>]`` (``text_field`` of each row), streamed.

    The hub is reached and the first row read before this returns, so a missing dataset or column fails here.
    """
    name, _, config = source[len("hf:") :].partition(":")
    hint = "use a local file instead, e.g. source='text:/path/to/*.txt'"
    if not hub_reachable():
        raise ConnectionError(
            f"source={source!r}: the Hugging Face hub is unreachable (offline or "
            f"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set); {hint}"
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        rows = iter(ds)
        first = next(rows)
    except Exception as err:  # datasets raises many types (hub, config, network); report them as one
        raise ValueError(
            f"source={source!r}: datasets could not load it ({type(err).__name__}: {err}); {hint}"
        ) from err
    if text_field not in first:
        raise invalid("", "text_field", text_field, f"a column of {source!r}, one of {list(first)}")
    return (row[text_field] for row in itertools.chain([first], rows))


def hf_documents(
    name: str, config: str | None, split: str, tokenizer, *, text_field: str = "text", batch: int = 256
) -> Documents:
    """Documents of a Hugging Face dataset split, streamed in order and tokenized ``batch`` at a time, EOS appended.

    Resuming at document ``first`` skips the first ``first`` rows of the stream (read, not tokenized).
    """

    def documents(first: int) -> Iterator[Tensor]:
        import datasets

        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True).skip(first))
        while chunk := [row[text_field] for row in itertools.islice(rows, batch)]:
            for ids in tokenizer.encode_batch(chunk):
                yield torch.tensor([*ids, tokenizer.eos_id], dtype=torch.long)

    return documents

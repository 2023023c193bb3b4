"""A packed token stream: documents in order, each followed by EOS, cut into (B, T) windows, no token reused.

The study's data pipeline (docs/study.md, section "Reference configuration"). How a call's rows are cut
from the token sequence, the passes (``epochs``) and each process's rows: docs/model-and-data.md, section
"Training and validation data". A :class:`PackedStream`'s ``state_dict`` is its position (tokens consumed,
pass, document, offset inside it), which ``gnlib.experiment.train`` checkpoints.

Document sources are callables ``documents(first) -> iterator of LongTensors``: the tokens (EOS included)
of documents ``first, first + 1, ...``. :func:`tensor_documents` serves an in-memory split and
:func:`shuffled_documents` one in a seeded order; :func:`gnlib.data.hub.hf_documents` streams a Hugging
Face dataset and tokenizes as it goes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from gnlib.checks import check_fields, integer
from gnlib.data.source import resolve_shard
from gnlib.runtime import resolve_device

Documents = Callable[[int], Iterator[Tensor]]


class StreamExhausted(ValueError):
    """The stream has no more tokens within the passes (``epochs``) it may make."""


def tensor_documents(tokens: Tensor, eos_id: int) -> Documents:
    """The source of one in-memory split: its tokens (documents joined by EOS) with a final EOS, as one piece.

    Document boundaries inside ``tokens`` are already EOS tokens, so the whole split is served as a single
    "document" and the position inside it is a token offset.
    """
    whole = torch.cat((tokens.long(), torch.tensor([eos_id], dtype=torch.long)))
    return lambda first: iter([whole] if first == 0 else [])


def shuffled_documents(
    tokens: Tensor, eos_id: int, seed: int, *, prefix_tokens: int = 0, prefix_seed: int | None = None
) -> tuple[Documents, dict]:
    """An in-memory split's documents in a seeded order, a warm-up's documents first in the warm-up's order.

    ``tokens`` (N,) are the split's documents joined by EOS. The order: the documents that the first
    ``prefix_tokens`` tokens of the ``prefix_seed`` order cover (a warm-up's, the last one possibly in
    part), in that order, then every other document in the ``seed`` order. A run of seed s that starts
    ``prefix_tokens`` in thus continues exactly where a run of seed ``prefix_seed`` stopped and never reads
    a document of it again; with ``prefix_seed`` None (or ``seed``) the order is the ``seed`` order.
    An order is ``torch.randperm`` of the document count under ``torch.Generator().manual_seed(seed)``.

    Returns:
        The document source (the reordered split with a final EOS, as one piece, like
        :func:`tensor_documents`) and a record for metadata: ``order_seed``, ``prefix_seed``,
        ``prefix_documents`` (documents placed first), ``documents``.
    """
    ends = (torch.nonzero(tokens == eos_id).flatten() + 1).tolist()
    eos = torch.tensor([eos_id], dtype=torch.long)
    docs = [*torch.tensor_split(tokens.long(), ends)[:-1], torch.cat((tokens[ends[-1] if ends else 0 :].long(), eos))]
    prefix_seed = seed if prefix_seed is None else prefix_seed
    first: list[int] = []
    if prefix_tokens > 0:
        covered = 0
        for index in _permutation(len(docs), prefix_seed):
            if covered >= prefix_tokens:
                break
            first.append(index)
            covered += len(docs[index])
    placed = set(first)
    order = first + [i for i in _permutation(len(docs), seed) if i not in placed]
    whole = torch.cat([docs[i] for i in order])
    record = {"order_seed": seed, "prefix_seed": prefix_seed, "prefix_documents": len(first), "documents": len(docs)}
    return (lambda start: iter([whole] if start == 0 else [])), record


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class PackedStream:
    """Consecutive (B, T) batches of a document stream (module docstring); a :class:`~gnlib.data.BatchSource`.

    Attributes:
        position: tokens consumed since the start of the first pass (all processes' rows).
    """

    def __init__(
        self,
        documents: Documents,
        batch_size: int,
        seq_len: int,
        *,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] | None = None,
        epochs: int = 1,
        start: int = 0,
        tokens_per_epoch: int | None = None,
        name: str = "training stream",
    ) -> None:
        """Open the stream at token ``start`` (e.g. after a warm-up's tokens).

        Args:
            documents: the document source (module docstring).
            batch_size: rows per call for this process (B).
            seq_len: tokens per row (T).
            device: where batches go.
            shard: ``(rank, world_size)``; default this process's (``gnlib.distributed``).
            epochs: passes over the documents the run may make (1: no token is ever reused).
            start: tokens skipped before the first batch.
            tokens_per_epoch: the length of one pass when known (for error messages).
            name: what error messages call this stream.

        Raises:
            ValueError: bad sizes or shard; :class:`StreamExhausted` when ``start`` lies past the end.
        """
        sizes = {"batch_size": batch_size, "seq_len": seq_len, "epochs": epochs, "start": start}
        check_fields(
            "", sizes, {"batch_size": integer(1), "seq_len": integer(1), "epochs": integer(1), "start": integer(0)}
        )
        rank, world = resolve_shard(shard)
        self.documents, self.batch_size, self.seq_len = documents, batch_size, seq_len
        self.rank, self.world_size, self.epochs = rank, world, epochs
        self.device = resolve_device(device)
        self.tokens_per_epoch, self.name = tokens_per_epoch, name
        self._open(position=0, epoch=0, doc=0, offset=0)
        self.skip(start)

    # ------------------------------------------------------------------------------------ state

    def _open(self, *, position: int, epoch: int, doc: int, offset: int) -> None:
        """Position the stream at token ``offset`` of document ``doc`` of pass ``epoch``."""
        self.position = position
        self._pieces: list[tuple[int, int, Tensor]] = []  # (epoch, document, tokens) from the head on
        self._offset = offset  # tokens of the head piece already consumed
        self._next = (epoch, doc)  # the document the iterator yields next
        self._iterator = self.documents(doc)
        self._buffered = 0  # tokens held in _pieces, counted from the head's offset

    @property
    def epoch(self) -> int:
        """The pass (0-based) of the next token."""
        return self.state_dict()["epoch"]

    def state_dict(self) -> dict:
        """Position: tokens consumed, and the pass, document and offset of the next token."""
        epoch, doc = self._pieces[0][:2] if self._pieces else self._next
        return {
            "position": self.position,
            "epoch": epoch,
            "document": doc,
            "offset": self._offset,
            "rows": self.world_size * self.batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by :meth:`state_dict` (same batch shape and number of processes)."""
        shape = (self.world_size * self.batch_size, self.seq_len)
        if (state["rows"], state["seq_len"]) != shape:
            raise ValueError(
                f"the saved {self.name} position was made with {state['rows']} rows of {state['seq_len']} "
                f"tokens per call; this stream has {shape[0]} rows of {shape[1]}"
            )
        self._open(position=state["position"], epoch=state["epoch"], doc=state["document"], offset=state["offset"])

    # ------------------------------------------------------------------------------------ reading

    def _fill(self, n: int) -> None:
        """Buffer at least ``n`` tokens past the head, starting a new pass when one ends and ``epochs`` allows."""
        while self._buffered < n:
            epoch, doc = self._next
            piece = next(self._iterator, None)
            if piece is None:
                if epoch + 1 >= self.epochs:
                    raise self._exhausted(n)
                self._next, self._iterator = (epoch + 1, 0), self.documents(0)
                continue
            if not self._pieces:
                self._offset = min(self._offset, len(piece))
            self._pieces.append((epoch, doc, piece))
            self._buffered += len(piece) - (self._offset if len(self._pieces) == 1 else 0)
            self._next = (epoch, doc + 1)

    def _exhausted(self, n: int) -> StreamExhausted:
        length = f" of {self.tokens_per_epoch:,} tokens" if self.tokens_per_epoch is not None else ""
        return StreamExhausted(
            f"the {self.name} ran out at token {self.position + self._buffered:,} after {self.epochs} pass(es)"
            f"{length}, {n:,} tokens wanted from position {self.position:,}: lower steps or data_start, load "
            f"more text (corpus_bytes, a larger corpus), or allow data_epochs > {self.epochs}"
        )

    def _peek(self, n: int) -> Tensor:
        """The next ``n`` tokens without consuming them."""
        self._fill(n)
        parts, have = [], 0
        for i, (_, _, tokens) in enumerate(self._pieces):
            part = tokens[self._offset :] if i == 0 else tokens
            parts.append(part[: n - have])
            have += len(parts[-1])
            if have == n:
                break
        return torch.cat(parts)

    def _consume(self, n: int) -> None:
        """Advance the head by ``n`` buffered tokens."""
        self.position += n
        self._buffered -= n
        while n:
            left = len(self._pieces[0][2]) - self._offset
            if n < left:
                self._offset += n
                return
            n -= left
            self._pieces.pop(0)
            self._offset = 0

    def skip(self, n: int) -> None:
        """Consume ``n`` tokens without making batches (read in chunks of at most 2^20 tokens)."""
        while n > 0:
            k = min(n, 1 << 20)
            self._fill(k)
            self._consume(k)
            n -= k

    def __call__(self) -> tuple[Tensor, Tensor]:
        """The next batch: (inputs, targets), LongTensors (batch_size, seq_len) on ``device``, this process's rows."""
        rows, T = self.world_size * self.batch_size, self.seq_len
        tokens = self._peek(rows * T + 1)
        self._consume(rows * T)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        inputs = tokens[:-1].view(rows, T)[mine]
        targets = tokens[1:].view(rows, T)[mine]
        return inputs.to(self.device), targets.to(self.device)

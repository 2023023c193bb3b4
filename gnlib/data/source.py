"""What a training loop needs of a batch source: the next batch, and its position to checkpoint and restore."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from gnlib import distributed
from gnlib.checks import Rule, check_fields
from gnlib.runtime import is_integer

#: A process's share of every batch: ``(rank, world_size)``.
SHARD = Rule(
    lambda s: isinstance(s, (tuple, list)) and len(s) == 2 and all(map(is_integer, s)) and 0 <= s[0] < s[1],
    "(rank, world_size), integers with 0 <= rank < world_size",
)


def resolve_shard(shard: Any) -> tuple[int, int]:
    """``shard`` checked by :data:`SHARD`, or the process group's ``(rank, world_size)`` when None."""
    shard = (distributed.rank(), distributed.world_size()) if shard is None else shard
    check_fields("", {"shard": shard}, {"shard": SHARD})
    return int(shard[0]), int(shard[1])


@runtime_checkable
class BatchSource(Protocol):
    """A resumable source of training batches, as a training loop drives it.

    :class:`~gnlib.data.BatchSampler` (random windows) and :class:`~gnlib.data.PackedStream` (the packed
    stream) implement it. ``state_dict`` is what a checkpoint keeps; ``load_state_dict`` of it continues
    with the same next batch.
    """

    def __call__(self) -> tuple[Tensor, Tensor]:
        """The next batch: (inputs, targets), each (B, T)."""

    def state_dict(self) -> dict:
        """The position in the source."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position of :meth:`state_dict`."""

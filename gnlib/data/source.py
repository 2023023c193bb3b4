"""What a training loop needs of a batch source: the next batch, and its position to checkpoint and restore."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


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

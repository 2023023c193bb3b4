"""Random windows of a token stream, drawn with replacement by a seeded generator: the teaching notebooks' batches."""

from __future__ import annotations

import torch
from torch import Tensor

from gnlib.checks import check_fields, integer
from gnlib.data.source import resolve_shard
from gnlib.runtime import invalid, is_integer, resolve_device


class BatchSampler:
    """Random windows of one token stream as (inputs, targets), each (B, T), drawn with its own generator.

    A window is ``seq_len + 1`` consecutive tokens starting uniformly in the stream; inputs are its first
    T tokens and targets its last T, so ``targets[:, t] = inputs[:, t + 1]`` for t < T − 1.

    Data-parallel runs: shard ``(r, K)`` makes each call draw the K·B windows of a sampler at batch
    K·B (the same generator calls) and return windows [r·B, (r+1)·B), so K shards together see exactly
    the batches of one sampler at batch K·B. The default shard is this process's
    ``(gnlib.distributed.rank(), gnlib.distributed.world_size())``, i.e. ``(0, 1)`` outside torchrun.
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        seq_len: int,
        seed: int,
        device: str | torch.device = "cpu",
        *,
        shard: tuple[int, int] | None = None,
    ):
        """Validate the shape request against ``tokens`` (LongTensor (N,)) and seed a CPU generator.

        ``batch_size`` is the per-shard batch B; ``shard`` is ``(rank, world_size)`` (default: the
        process group's).
        """
        check_fields("", {"batch_size": batch_size}, {"batch_size": integer(1)})
        self.rank, self.world_size = resolve_shard(shard)
        if not is_integer(seq_len) or not 1 <= seq_len <= len(tokens) - 1:
            raise invalid(
                "",
                "seq_len",
                seq_len,
                f"an integer in [1, {len(tokens) - 1}] for a split of {len(tokens)} tokens "
                "(a window holds seq_len + 1 tokens)",
            )
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.device = resolve_device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[Tensor, Tensor]:
        """The next batch: (inputs, targets), LongTensors of shape (batch_size, seq_len) on ``device``."""
        starts = torch.randint(
            0, len(self.tokens) - self.seq_len, (self.world_size * self.batch_size,), generator=self.generator
        )[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)].to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        """The generator state: restoring it replays the same batches from this point on."""
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator_state"])

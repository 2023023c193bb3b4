"""Counting the host's reads of tensor values: each one a device synchronization on a GPU.

Python reads a tensor's value with ``float``, ``int``, ``bool``, ``.item()`` (each dispatches
``aten._local_scalar_dense``) or ``.tolist()``; on a GPU each waits for the work queued before it.
:class:`HostReads` counts them inside a ``with`` block, on any device, so the tests and
``python -m gnlib.tools.gpu_check`` check one claim with one counter: a Gauss-Newton outer step reads four
times, whatever its inner steps, line-search points and batches
(:mod:`gnlib.optim.gauss_newton`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Where torch optimizers read their step counters (``_get_value``): CPU tensors, not device reads.
_OPTIMIZER_FILE = os.path.join("torch", "optim", "optimizer.py")


def _from_optimizer_step_counter() -> bool:
    """Whether the current read comes from a torch optimizer's ``_get_value`` (a CPU step counter)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_get_value" and frame.f_code.co_filename.endswith(_OPTIMIZER_FILE):
            return True
        frame = frame.f_back
    return False


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor values inside a ``with`` block, in ``count``.

    ``item``, ``float`` and ``bool`` dispatch ``_local_scalar_dense``; ``tolist`` is counted by a wrapper
    installed on ``torch.Tensor`` for the block. Torch optimizers' step counters are not counted: they
    live on the CPU (``_get_value`` reads them).

    Example::

        with HostReads() as reads:
            optimizer.step()
        print(reads.count)
    """

    def __init__(self) -> None:
        """Nothing counted yet."""
        super().__init__()
        self.count = 0
        self._tolist: Any = None

    def __enter__(self) -> HostReads:
        """Start counting: the dispatch mode and the ``tolist`` wrapper."""
        tolist = self._tolist = torch.Tensor.tolist

        def counted(tensor: torch.Tensor) -> Any:
            self.count += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        """Stop counting; ``tolist`` is torch's again."""
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Run ``func``, counting it if it is a read of a value by the host."""
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += not _from_optimizer_step_counter()
        return func(*args, **(kwargs or {}))

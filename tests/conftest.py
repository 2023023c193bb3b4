"""Test session setup: parallel test workers share the cores out as math-library threads.

Under pytest-xdist each worker (and each notebook kernel it starts, through ``OMP_NUM_THREADS``) gets
``cores // workers`` threads, as sweep jobs do (:func:`gnlib.sweep.threads_per_job`); workers that each start a
thread per core oversubscribe the machine. An ``OMP_NUM_THREADS`` already set wins.

Fixture ``host_reads``: counts the host's reads of tensor values, each a device sync on a GPU.
"""

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gnlib.sweep import threads_per_job

os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_job(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class HostReads(TorchDispatchMode):
    """Counts the host's reads of tensor values inside a ``with`` block, in ``count``.

    ``item``, ``float`` and ``bool`` dispatch ``_local_scalar_dense``; ``tolist`` is counted by a wrapper.
    Torch optimizers' step counters are not counted: they live on the CPU (``_get_value`` reads them).
    """

    def __init__(self) -> None:
        """Nothing counted yet."""
        super().__init__()
        self.count = 0
        self._patch = pytest.MonkeyPatch()

    def __enter__(self) -> "HostReads":
        """Start counting: the dispatch mode and the ``tolist`` wrapper."""
        tolist = torch.Tensor.tolist

        def counted(tensor: torch.Tensor):
            self.count += 1
            return tolist(tensor)

        self._patch.setattr(torch.Tensor, "tolist", counted)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        """Stop counting; ``tolist`` is torch's again."""
        self._patch.undo()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Run ``func``, counting it if it is a read of a value by the host."""
        if func is torch.ops.aten._local_scalar_dense.default:
            frame = sys._getframe()
            counter = os.path.join("torch", "optim", "optimizer.py")
            while frame and not (frame.f_code.co_name == "_get_value" and frame.f_code.co_filename.endswith(counter)):
                frame = frame.f_back
            self.count += frame is None
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads() -> type[HostReads]:
    """The :class:`HostReads` counter class: use it as a context manager and read its ``count``."""
    return HostReads

"""Test session setup: parallel test workers share the cores out as math-library threads.

Under pytest-xdist each worker (and each notebook kernel it starts, through ``OMP_NUM_THREADS``) gets
``cores // workers`` threads, as sweep jobs do (:func:`gnlib.tools.sweep.threads_per_job`); workers that each start a
thread per core oversubscribe the machine. An ``OMP_NUM_THREADS`` already set wins.

Fixture ``host_reads``: :class:`gnlib.host_reads.HostReads`, which counts the host's reads of tensor values
(each a device sync on a GPU).
"""

import os

import pytest
import torch

from gnlib.host_reads import HostReads
from gnlib.tools.sweep import threads_per_job

os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_job(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def host_reads() -> type[HostReads]:
    """The :class:`HostReads` counter class: use it as a context manager and read its ``count``."""
    return HostReads

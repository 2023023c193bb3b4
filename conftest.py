"""Test-session settings shared by unit tests, papermill notebook tests and nbval.

The suite runs in two worker processes (pytest-xdist, one file per worker at a time); each worker and
every notebook kernel it starts uses one thread, so the two never oversubscribe a 2-core machine.
Relative outputs go to a fresh temporary folder (``GNLIB_OUTPUT_ROOT``), never to the checkout's outputs/.
nbval's notebook kernels start one at a time across the workers, and a failed start is retried.
"""

import fcntl
import functools
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("GNLIB_OUTPUT_ROOT", tempfile.mkdtemp(prefix="gnlib-test-outputs-"))
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# no GUI windows from tests or from the notebook kernels they start (which inherit it); gnlib's figures
# display inline through IPython whatever the backend, which the notebook tests check as a reader sees it
os.environ.setdefault("MPLBACKEND", "Agg")

import nbval.kernel  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

KERNEL_START_LOCK = Path(tempfile.gettempdir()) / "gnlib-test-kernel-start.lock"
KERNEL_START_ATTEMPTS = 3


def one_kernel_start_at_a_time(start_new_kernel):
    """Wrap nbval's kernel start: one start at a time across the test workers, and a failed start retried.

    A kernel's ports are picked free by the client and bound later by the kernel process, so two kernels
    starting at once (one per worker) can be handed the same port, and one of them then never answers
    (jupyter_client's port race: "Kernel didn't respond in 60 seconds"). A file lock held from the pick
    to the kernel's first reply rules that out between workers; a start that fails all the same (nbval
    has shut it down) is retried, with a warning in the test report.
    """

    @functools.wraps(start_new_kernel)
    def start(*args, **kwargs):
        for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
            with KERNEL_START_LOCK.open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    return start_new_kernel(*args, **kwargs)
                except RuntimeError as error:
                    if attempt == KERNEL_START_ATTEMPTS:
                        raise
                    warnings.warn(f"notebook kernel start {attempt} failed ({error}); retrying", stacklevel=2)

    return start


nbval.kernel.start_new_kernel = one_kernel_start_at_a_time(nbval.kernel.start_new_kernel)

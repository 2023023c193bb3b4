"""Test-session settings shared by unit tests, papermill notebook tests and nbval.

The suite runs in two worker processes (pytest-xdist, one file per worker at a time); each worker and
every notebook kernel it starts uses one thread, so the two never oversubscribe a 2-core machine.
Relative outputs go to a fresh temporary folder (``GNLIB_OUTPUT_ROOT``), never to the checkout's outputs/.
"""

import os
import tempfile

os.environ.setdefault("GNLIB_OUTPUT_ROOT", tempfile.mkdtemp(prefix="gnlib-test-outputs-"))
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# no GUI windows from tests or from the notebook kernels they start (which inherit it); gnlib's figures
# display inline through IPython whatever the backend, which the notebook tests check as a reader sees it
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

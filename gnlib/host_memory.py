"""What happens to CPU memory that tensors free: returned to the system (glibc's default) or kept for reuse.

glibc serves a block above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
returns them when the block is freed, so every large temporary is zeroed by the kernel page by page on
first touch, at every step. Layerwise GN's stacked tangents are such temporaries: on ``small`` (16 × 256
tokens) one layerwise inner step took 258,000 to 433,000 minor page faults (1.0 to 1.7 GiB of first
touches), a full-GN inner step or a gradient step none to 29,000.

``set_host_memory("retain")`` makes glibc serve every block from its heap and keep what is freed
(``mallopt``: no mmap, trim threshold 2 GiB), so those pages are reused as they are. The price is
memory: the process keeps its peak, and a heap fragments, so its resident size can exceed what the
tensors alive at any moment need (a loop of two 64 MiB temporaries settled at 734 MiB resident against
222 MiB). CUDA memory is not concerned: PyTorch's caching allocator already reuses it.
"""

from __future__ import annotations

import ctypes
import platform

from gnlib.runtime import check_choice

#: ``host_memory`` values.
HOST_MEMORY = ("system", "retain")

# glibc's mallopt parameters (malloc.h) and the defaults "system" restores.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_SETTINGS = {
    "system": {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024},
    "retain": {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1},
}
_current = "system"


def host_memory_policy() -> str:
    """The policy this process runs under: ``"system"`` unless :func:`set_host_memory` changed it."""
    return _current


def set_host_memory(policy: str) -> None:
    """Set how glibc's allocator treats freed CPU memory for the rest of the process.

    Args:
        policy: ``"system"`` (glibc's default: large blocks are returned to the kernel when freed) or
            ``"retain"`` (every block comes from the heap and freed memory stays for reuse). Going back to
            ``"system"`` restores glibc's default limits; its adaptive mmap threshold stays where it was.

    Raises:
        ValueError: an unknown policy, or ``"retain"`` where the C library is not glibc (macOS, Windows,
            musl), naming ``host_memory`` and what is allowed there.
        RuntimeError: glibc refused a setting.
    """
    global _current
    check_choice("host_memory", policy, HOST_MEMORY)
    if policy == _current:
        return
    library = platform.libc_ver()[0]
    if library != "glibc":
        raise ValueError(
            f"host_memory={policy!r} needs glibc (Linux); this Python runs on {platform.system()} with "
            f"C library {library or 'unknown'}; allowed here: 'system'"
        )
    libc = ctypes.CDLL(None)
    for parameter, value in _SETTINGS[policy].items():
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc's mallopt({parameter}, {value}) failed; host memory stays {_current!r}")
    _current = policy

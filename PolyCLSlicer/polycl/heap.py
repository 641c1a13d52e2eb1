"""Give the C heap's freed memory back to the operating system between jobs (glibc).

glibc's malloc keeps freed memory for reuse: a block below its mmap threshold comes from the heap, and the
threshold rises to the size of the largest block freed so far (up to 32 MiB), so the per-batch and per-slice
buffers of one step stay resident as free heap.  After `segment` + LiteMedSAM refinement of a 512 x 512 x 119
CT, with the results dropped, a process held 1 689 MiB; ``release_free_memory`` (``malloc_trim``) brought it
to 1 346 MiB (docs/benchmarks.md).  It runs between jobs (after each worker job or batch case), where a
long-lived process would otherwise keep the last job's peak; inside a job it did not lower the peak (a
300-slice `segment --refine` peaked at 1.42-1.43 GiB without it, 1.44-1.46 GiB with it after the network and
after refinement).  Elsewhere (macOS, Windows, musl) it does nothing.  Torch-free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # no glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (``malloc_trim(0)``); True when glibc did release some."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False

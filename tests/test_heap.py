"""polycl.heap: freed heap memory goes back to the OS between steps (glibc's malloc_trim)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

PROBE = textwrap.dedent("""
    import numpy as np
    from polycl.heap import release_free_memory

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    np.ones(16 << 20, np.uint8)  # a freed 16 MiB block: glibc raises its mmap threshold to 16 MiB
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(200)]  # 1 MiB each, now from the heap
    del blocks[:-1]  # freed, but the last one pins the heap's top: nothing is trimmed by itself
    before = rss_mib()
    released = release_free_memory()
    print(before - rss_mib(), released)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_heap_blocks_go_back_to_the_os():
    """200 MiB of freed 1 MiB blocks under a live one stay resident until release_free_memory returns them."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT / "PolyCLSlicer"), "PATH": "/usr/bin:/bin"})
    dropped, released = done.stdout.split()
    assert released == "True" and float(dropped) > 150, done.stdout


def test_release_is_harmless_without_glibc(monkeypatch):
    from polycl import heap

    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.release_free_memory() is False

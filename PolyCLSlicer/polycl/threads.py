"""How many CPU threads a compute process should use: the CPUs it may actually run on, not ``os.cpu_count()``.

torch's default is the machine's core count, which ignores the process's CPU affinity (``taskset``, a SLURM
allocation, a Dask worker pinned to cores) and a cgroup CPU quota (Docker ``--cpus``, Kubernetes limits): on a
64-core host with a 2-CPU quota, 32 OpenMP threads then fight over 2 CPUs.  :func:`thread_count` decides (an
explicit request, then ``POLYCL_THREADS``, then ``OMP_NUM_THREADS``, then the usable CPUs) and
:func:`configure_threads` applies it, before torch is imported (``polycl.devices`` applies it at the import)
or after.  Torch-free, so it can run before the import.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``);
    None when there is no quota or no cgroup file."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(affinity: set[int] | None = None, quota: float | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded down, at least 1)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except AttributeError:  # macOS, Windows
            affinity = set(range(os.cpu_count() or 1))
    count = max(1, len(affinity))
    quota = cgroup_cpu_quota() if quota is None else quota
    return max(1, min(count, math.floor(quota))) if quota else count


def thread_count(requested: int | None = None, environ: Mapping[str, str] = os.environ,
                 usable: int | None = None) -> int:
    """Threads for this process: ``requested`` (a --threads option), else $POLYCL_THREADS, else
    $OMP_NUM_THREADS, else the usable CPUs; a value that is not a positive integer is an error."""
    for source, value in (("--threads", requested), ("POLYCL_THREADS", environ.get("POLYCL_THREADS")),
                          ("OMP_NUM_THREADS", environ.get("OMP_NUM_THREADS"))):
        if value is None or value == "":
            continue
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"{source}={value!r} must be a positive whole number of threads") from None
        if count < 1:
            raise ValueError(f"{source}={value!r} must be a positive whole number of threads")
        return count
    return usable if usable is not None else usable_cpus()


SHORT_SPIN = "10000"  # libgomp's default spin before sleeping is 300000 when no wait policy is set


def openmp_wait_defaults(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment defaults for OpenMP's idle threads of a command-line process: a short spin before sleeping
    (``GOMP_SPINCOUNT``, read by libgomp, the OpenMP of torch's Linux wheels) unless the environment sets a
    wait policy or a spin count itself.  bench/contention.py (512x512x119 segment, load 2-3): alone 4.12 s vs
    4.07 s with libgomp's default, two at once 1.65x vs 2.02x; ``OMP_WAIT_POLICY=PASSIVE`` (the worker's
    setting) 1.21x but 4.56 s alone."""
    if environ.get("OMP_WAIT_POLICY") or environ.get("GOMP_SPINCOUNT"):
        return {}
    return {"GOMP_SPINCOUNT": SHORT_SPIN}


def configure_openmp_wait(environ: os._Environ | dict[str, str] = os.environ) -> dict[str, str]:
    """Apply :func:`openmp_wait_defaults` to ``environ``; effective only before the OpenMP runtime loads (torch's
    import), and inherited by child processes.  Returns what was set."""
    defaults = openmp_wait_defaults(environ)
    environ.update(defaults)
    return defaults


decided: int | None = None  # this process's decision (configure_threads), applied when torch is imported


def configure_threads(requested: int | None = None) -> int:
    """Decide with :func:`thread_count` and apply it to this process, before or after torch's import: kept
    here for ``polycl.devices`` to apply when it imports torch (an OpenMP runtime that another library loaded
    first has read $OMP_NUM_THREADS already; an environment variable would also leak into child processes),
    and set on torch at once if it is loaded."""
    global decided
    decided = thread_count(requested)
    if "torch" in sys.modules:
        apply_to_torch()
    return decided


def apply_to_torch() -> None:
    """torch's intra-op threads from this process's decision, when one was made (``configure_threads``)."""
    if decided is not None:
        import torch

        torch.set_num_threads(decided)

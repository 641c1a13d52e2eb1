"""Where a batch runs: an in-process Dask ``LocalCluster`` sized to this machine (the default), an existing
scheduler (``--scheduler tcp://HOST:PORT``), or a ``dask-jobqueue`` cluster on SLURM, PBS, LSF or SGE.

Every worker runs one case at a time (the ``polycl`` resource) and gives all the threads Dask gave it to torch
(:class:`~polycl.batch.work.WarmModels`).  A worker that dies mid-case has its case rescheduled on another one
up to ``retries`` times (Dask's ``allowed-failures``); then the case is reported as failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..threads import usable_cpus
from .work import PLUGIN_NAME, RESOURCE, WarmModels

JOBQUEUE_SYSTEMS = ("slurm", "pbs", "lsf", "sge")
GIB = 1024**3
WORKER_MEMORY_GIB = 4  # one 512x512x300 CT in flight (int16 read, float32 canonical copy, masks) plus the model
DEFAULT_THREADS_PER_WORKER = 2  # bench/batch.py, 2 cores: 1 worker x 2 threads beat 2 workers x 1 thread
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep (issue 25): workers share the cores
# (torch's thread count is set by the WarmModels plugin from the worker's threads, on every kind of cluster)


@dataclass(frozen=True)
class ClusterOptions:
    """How to get workers; see :func:`open_client`."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    retries: int = 2
    system: str | None = None  # a JOBQUEUE_SYSTEMS name
    jobs: int = 1
    job: dict | None = None  # dask-jobqueue keyword arguments (cores, memory, walltime, queue, account, ...)


def local_size(workers: int | None = None, threads_per_worker: int | None = None, cpus: int | None = None,
               memory_bytes: int | None = None) -> tuple[int, int]:
    """(workers, threads each) for this machine: the usable CPUs (affinity, cgroup quota) split into workers of
    ``DEFAULT_THREADS_PER_WORKER`` threads, no more workers than the memory holds (``WORKER_MEMORY_GIB`` each)."""
    cpus = cpus or usable_cpus()
    if memory_bytes is None:
        import psutil

        memory_bytes = psutil.virtual_memory().total
    if threads_per_worker is None:
        threads_per_worker = max(1, cpus // workers) if workers else min(DEFAULT_THREADS_PER_WORKER, cpus)
    if workers is None:
        workers = min(max(1, cpus // threads_per_worker), max(1, memory_bytes // (WORKER_MEMORY_GIB * GIB)))
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("--workers and --threads-per-worker must be at least 1")
    return workers, threads_per_worker


def local_cluster(workers: int, threads_per_worker: int, retries: int) -> Any:
    """An in-process scheduler with ``workers`` worker processes (no dashboard)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                            resources={RESOURCE: 1}, dashboard_address=None, silence_logs=logging.ERROR,
                            env={**WORKER_ENV, **{k: os.environ[k] for k in WORKER_ENV if k in os.environ}})


def jobqueue_cluster(system: str, retries: int = 2, **job: Any) -> Any:
    """A dask-jobqueue cluster (``SLURMCluster``, ...) whose workers run one case each with all their threads.

    ``job`` holds its keyword arguments (``cores``, ``memory``, ``processes``, ``walltime``, ``queue``,
    ``account``, ``python``, ...); what is not given comes from dask-jobqueue's configuration
    (``~/.config/dask/jobqueue.yaml``).  Nothing is submitted until the cluster is scaled."""
    import dask
    import dask_jobqueue

    if system not in JOBQUEUE_SYSTEMS:
        raise ValueError(f"unknown cluster {system!r}; use one of {', '.join(JOBQUEUE_SYSTEMS)}")
    cluster_class = getattr(dask_jobqueue, f"{system.upper()}Cluster")
    job = {key: value for key, value in job.items() if value is not None}
    job["worker_extra_args"] = [*job.get("worker_extra_args", []), "--resources", f"{RESOURCE}=1"]
    job["job_script_prologue"] = [*job.get("job_script_prologue", []),
                                  *(f"export {name}={value}" for name, value in WORKER_ENV.items())]
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        return cluster_class(**job)


@contextlib.contextmanager
def open_client(options: ClusterOptions) -> Iterator[Any]:
    """A Dask client with the warm-model plugin on every worker (present and future); closed on exit."""
    from distributed import Client

    with contextlib.ExitStack() as stack:
        if options.scheduler:
            client = stack.enter_context(Client(options.scheduler))
            client.run_on_scheduler(_set_allowed_failures, retries=options.retries)
        else:
            if options.system:
                cluster = jobqueue_cluster(options.system, options.retries, **(options.job or {}))
                cluster.scale(jobs=options.jobs)
            else:
                cluster = local_cluster(*local_size(options.workers, options.threads_per_worker), options.retries)
            stack.enter_context(cluster)
            client = stack.enter_context(Client(cluster))
        client.register_plugin(WarmModels(), name=PLUGIN_NAME)
        yield client


def _set_allowed_failures(dask_scheduler: Any, retries: int) -> None:
    """On a running scheduler: how many worker deaths a task survives (Dask's ``allowed-failures``)."""
    dask_scheduler.allowed_failures = retries


def describe(client: Any) -> str:
    """'2 workers, 1 thread each' (for the progress line)."""
    workers = client.scheduler_info().get("workers", {})
    threads = sorted({info.get("nthreads", 0) for info in workers.values()})
    count = "/".join(map(str, threads)) or "?"
    return f"{len(workers)} worker{'s' * (len(workers) != 1)}, {count} thread{'s' * (count != '1')} each"

"""Worker-process overhead: the same segment job in-process vs through ``python -m polycl.worker``.

Run:  nice -n 10 .venv/bin/python bench/worker.py [--data DIR] [--warm N]

Case: a 512x512x119 CT cut from ircad01 (the middle 119 of its 129 slices), starter model, CPU.
In-process = ``polycl.pipeline.segment`` in this interpreter (torch already imported, as the old
Python-thread design had it).  Worker = the Slicer module's path without MRML: ``PolyCLSlicerLib``
writes the volume (uncompressed NRRD) into a job folder, the worker reads it, segments, writes the
mask, the client reads it back.  Cold = first job (worker start, torch import, model load); warm =
later jobs on the same worker, interleaved with in-process runs.  Both use the same thread count.
Overhead = worker - in-process; target for warm jobs <= 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_root, machine  # noqa: E402  (also puts polycl / PolyCLSlicerLib on sys.path)
from PolyCLSlicerLib.tasks import MaskResult, Task, TaskRunner, WorkerJob  # noqa: E402
from PolyCLSlicerLib.worker_client import WorkerClient  # noqa: E402

from polycl import pipeline  # noqa: E402
from polycl.io.volumes import read_volume  # noqa: E402

SLICES = 119


def ct_119(data: Path) -> tuple[np.ndarray, np.ndarray]:
    big = read_volume(data / "unlabeled" / "ircad01_ct.nii.gz")
    start = (big.array.shape[2] - SLICES) // 2
    matrix = np.array(big.ijk_to_ras, float)
    matrix[:3, 3] = matrix[:3, :3] @ np.array([0, 0, start]) + matrix[:3, 3]
    # [i, j, k] with the memory layout of Slicer's arrays (vtkImageData is k-j-i in C order)
    return np.asfortranarray(big.array[:, :, start:start + SLICES]), matrix


def in_process(models: pipeline.ModelCache, array: np.ndarray, matrix: np.ndarray) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    mask = pipeline.segment(models, array, matrix, device="cpu").mask
    return time.perf_counter() - started, mask


def through_worker(client: WorkerClient, array: np.ndarray, matrix: np.ndarray) -> tuple[dict, np.ndarray]:
    """Wall time of a Task's compute, split into hand-over and the worker's own job time."""
    task = Task("bench", WorkerJob("segment", {"volume": (array, matrix)}, {"device": "cpu"}, {"mask": None}),
                MaskResult.read, client=client)
    started = time.perf_counter()
    runner = TaskRunner(task).start()
    sent = time.perf_counter()
    first = done = None
    while runner.running:
        for event in runner.poll(timeout=0.01):
            if event.kind == "progress" and event.message.startswith("segment: slice") and first is None:
                first = time.perf_counter()
            elif event.kind == "done":
                done = event
            elif event.kind in ("failed", "cancelled"):
                raise RuntimeError(f"worker job {event.kind}: {event.message}\n{event.details}")
    total = time.perf_counter() - started
    return {"total": total, "write_inputs": sent - started, "to_first_slice": first - started,
            "worker_job": done.stats["seconds"], "pid": done.stats["pid"]}, done.result.mask


def handover_steps(client: WorkerClient, array: np.ndarray, matrix: np.ndarray, mask: np.ndarray,
                   folder: Path) -> dict[str, float]:
    """The steps the worker path adds to the computation, each timed alone: the files both ways and one
    job round trip (a job the worker refuses at once: its input does not exist)."""
    from PolyCLSlicerLib.tasks import JobOutput

    from polycl.io.volumes import write_volume

    times = {}
    for name, step in (("write volume", lambda: write_volume(folder / "v.nrrd", array, matrix, compress=False)),
                       ("read volume", lambda: read_volume(folder / "v.nrrd")),
                       ("write mask", lambda: write_volume(folder / "m.nrrd", mask, matrix, compress=False)),
                       ("read mask", lambda: JobOutput({"mask": folder / "m.nrrd"}, {}).mask())):
        started, cpu = time.perf_counter(), time.process_time()
        step()
        times[name] = time.perf_counter() - started
        times[f"{name} (CPU)"] = time.process_time() - cpu
    started = time.perf_counter()
    run = client.submit("segment", {"volume": str(folder / "missing.nrrd")}, {"mask": str(folder / "x.nrrd")}, {})
    while not [e for e in run.poll(timeout=0.01) if e.kind != "progress"]:
        pass
    times["job round trip"] = time.perf_counter() - started
    for name in ("v.nrrd", "m.nrrd"):
        (folder / name).unlink()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--warm", type=int, default=3, help="warm job pairs")
    args = parser.parse_args()
    print(machine())
    array, matrix = ct_119(data_root(args.data))
    print(f"case: ircad01 middle {SLICES} slices, shape {array.shape}, {array.nbytes / 2**20:.0f} MiB "
          f"{array.dtype}; starter model; {torch.get_num_threads()} torch threads in both processes")
    models = pipeline.ModelCache()
    with tempfile.TemporaryDirectory() as temp:
        client = WorkerClient(threads=torch.get_num_threads(), temp_root=temp)
        try:
            local_cold, reference = in_process(models, array, matrix)
            worker_cold, mask = through_worker(client, array, matrix)
            assert np.array_equal(mask > 0, reference > 0), "worker and in-process masks differ"
            local_warm, worker_warm = [], []
            for _ in range(args.warm):
                local_warm.append(in_process(models, array, matrix)[0])
                worker_warm.append(through_worker(client, array, matrix)[0])
            assert len({w["pid"] for w in [worker_cold, *worker_warm]}) == 1, "the worker was restarted"
            steps = handover_steps(client, array, matrix, reference, Path(temp))
        finally:
            client.stop()
    print("\n| run | in-process s | worker s | overhead s | worker: write inputs s | start -> first slice s "
          "| job in worker s |")
    print("|---|---|---|---|---|---|---|")
    rows = [("cold", local_cold, worker_cold)] + [(f"warm {n + 1}", a, b)
                                                  for n, (a, b) in enumerate(zip(local_warm, worker_warm, strict=True))]
    for name, local, worker in rows:
        print(f"| {name} | {local:.2f} | {worker['total']:.2f} | {worker['total'] - local:+.2f} | "
              f"{worker['write_inputs']:.2f} | {worker['to_first_slice']:.2f} | {worker['worker_job']:.2f} |")
    overhead = statistics.median(b["total"] - a for a, b in zip(local_warm, worker_warm, strict=True))
    print(f"\nwarm overhead end to end (median of {args.warm}): {overhead:+.2f} s (target <= 0.5 s); masks "
          f"identical; one worker process (pid {worker_cold['pid']})")
    wall = {k: v for k, v in steps.items() if "(CPU)" not in k}
    cpu = sum(v for k, v in steps.items() if "(CPU)" in k)
    print("hand-over steps timed alone: " + ", ".join(f"{k} {v:.3f} s" for k, v in steps.items())
          + f"; wall sum {sum(wall.values()):.3f} s, CPU sum {cpu:.3f} s + round trip "
          "(the warm overhead without the noise of two long runs; CPU time does not grow with other load)")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

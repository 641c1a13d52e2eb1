"""``python -m polycl.worker``: a long-lived compute process speaking JSON lines.

One job per stdin line, ``{"id", "task", "inputs": {name: path}, "outputs": {name: path}, "options": {}}``,
or ``{"cancel": id}``.  Events on stdout, one JSON object per line::

    {"ready": true, "pid": 123, "torch": "2.x", "cuda": false}  once, when the worker accepts jobs
    {"id": "a", "progress": 0.4, "message": "segment: slice 8/20"}
    {"id": "a", "done": true, "outputs": {"mask": "..."}, "result": {...}, "stats": {...}}
    {"id": "a", "error": "one line", "type": "ValueError", "details": "traceback"}
    {"id": "a", "cancelled": true}

Jobs run one at a time on the main thread; a reader thread takes stdin lines and sets the running
job's cancel flag, which the engine checks at its cancellation points.  A cancelled or failed job
writes no output (outputs are written atomically after the computation).  End of stdin: the running
job is cancelled and the worker exits 0.  Models and SAM embeddings stay loaded between jobs.
Nothing but events reaches stdout: file descriptor 1 is pointed at stderr, so prints, warnings and
progress bars of any library go to the log.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .heap import release_free_memory
from .progress import Cancelled
from .threads import configure_threads

TASKS = ("segment", "refine", "propagate", "finetune", "suggest")


class JobError(ValueError):
    """The job line itself is wrong (unknown task, missing input, unknown option)."""


class EventWriter:
    """Writes one JSON object per line to the real stdout; thread-safe."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self._lock = stream, threading.Lock()

    def send(self, **event: Any) -> None:
        line = json.dumps(event, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def claim_stdout() -> IO[str]:
    """Keep a private copy of stdout for events and send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


@dataclass
class Job:
    id: Any
    task: str
    inputs: dict
    outputs: dict
    options: dict
    cancel: threading.Event = field(default_factory=threading.Event)


def parse_job(message: dict) -> Job:
    """Validate a job line; JobError with one clear line when it is malformed."""
    if "id" not in message or not isinstance(message["id"], str | int):
        raise JobError("a job needs an 'id' (string or integer)")
    task = message.get("task")
    if task not in TASKS:
        raise JobError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    parts = {key: message.get(key) or {} for key in ("inputs", "outputs", "options")}
    for key, value in parts.items():
        if not isinstance(value, dict):
            raise JobError(f"'{key}' must be an object")
    return Job(message["id"], task, parts["inputs"], parts["outputs"], parts["options"])


class Worker:
    """Reads jobs, runs them one by one, reports events."""

    def __init__(self, events: EventWriter, stdin: IO[str]) -> None:
        from .pipeline import ModelCache

        self.events, self.stdin = events, stdin
        self.models = ModelCache()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
        self.queued: set = set()  # ids of jobs accepted and not started yet
        self.cancelled_early: set = set()  # always a subset of ``queued``: it cannot grow without bound
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------- stdin reader thread
    def read_stdin(self) -> None:
        for line in self.stdin:
            if line.strip():
                self.accept(line)
        with self._lock:  # the client is gone: stop what runs, then exit
            if self.current is not None:
                self.current.cancel.set()
        self.jobs.put(None)

    def accept(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError as error:
            self.events.send(id=None, error=f"invalid job line (not JSON): {one_line(error)}", type="ValueError")
            return
        try:
            if not isinstance(message, dict):
                raise JobError("a job line must be a JSON object")
            if "cancel" in message:
                self.cancel(message["cancel"])
            else:
                job = parse_job(message)
                with self._lock:
                    self.queued.add(job.id)
                self.jobs.put(job)
        except JobError as error:
            job_id = message.get("id") if isinstance(message, dict) else None
            self.events.send(id=job_id, error=f"invalid job: {one_line(error)}", type="ValueError")

    def cancel(self, job_id: Any) -> None:
        """Cancel the running job, or a queued one before it starts; a finished or unknown id is ignored
        (a cancel often crosses the job's last event)."""
        with self._lock:
            if self.current is not None and self.current.id == job_id:
                self.current.cancel.set()
            elif job_id in self.queued:
                self.cancelled_early.add(job_id)

    # ------------------------------------------------------------------------------- main thread
    def serve(self) -> int:
        threading.Thread(target=self.read_stdin, name="polycl-worker-stdin", daemon=True).start()
        self.events.send(ready=True, pid=os.getpid(), **warm_up())
        while (job := self.jobs.get()) is not None:
            with self._lock:
                self.queued.discard(job.id)
                if job.id in self.cancelled_early:
                    self.cancelled_early.discard(job.id)
                    job.cancel.set()
                self.current = job
            try:
                self.run(job)
            finally:
                with self._lock:
                    self.current = None
                release_free_memory()  # idle beside Slicer with what the models hold, not the job's peak
        return 0

    def run(self, job: Job) -> None:
        started, modules_before, warm = time.perf_counter(), set(sys.modules), "torch" in sys.modules
        models_before = self.models.loaded()

        def progress(fraction: float, message: str) -> None:
            self.events.send(id=job.id, progress=round(min(max(float(fraction), 0.0), 1.0), 4), message=str(message))

        try:
            if job.cancel.is_set():
                raise Cancelled(f"{job.task} cancelled")
            for name in job.outputs:  # refuse before any work, not after it
                output_path(job, name)
            outputs, result = HANDLERS[job.task](self, job, progress)
        except Cancelled:
            self.events.send(id=job.id, cancelled=True)
        except Exception as error:  # reported to the client; the worker stays usable
            self.events.send(id=job.id, error=one_line(error), type=builtin_base(error),
                             details=traceback.format_exc())
        else:
            stats = {"pid": os.getpid(), "seconds": round(time.perf_counter() - started, 3),
                     "torch_was_loaded": warm, "new_modules": len(set(sys.modules) - modules_before),
                     "models_loaded_before": models_before}
            self.events.send(id=job.id, done=True, outputs=outputs, result=result, stats=stats)


def warm_up() -> dict:
    """Import the heavy modules before the first job arrives; facts for the client."""
    import torch

    from . import inference  # noqa: F401

    return {"torch": torch.__version__, "cuda": bool(torch.cuda.is_available())}


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def builtin_base(error: BaseException) -> str:
    """Name of the nearest built-in exception class (the client re-raises that type)."""
    import builtins

    for cls in type(error).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "RuntimeError"


# ------------------------------------------------------------------------------------ job handlers
def options_of(job: Job, allowed: dict[str, Any]) -> dict[str, Any]:
    """The job's options over ``allowed`` defaults; an unknown name is an error (catches typos)."""
    unknown = sorted(set(job.options) - set(allowed))
    if unknown:
        raise JobError(f"{job.task}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return {**allowed, **job.options}


def input_path(job: Job, name: str, required: bool = True) -> Path | None:
    value = job.inputs.get(name)
    if value is None:
        if required:
            raise JobError(f"{job.task}: input '{name}' is missing")
        return None
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{job.task}: input '{name}' {path} does not exist")
    return path


def output_path(job: Job, name: str) -> Path:
    if not job.outputs.get(name):
        raise JobError(f"{job.task}: output '{name}' is missing")
    path = Path(job.outputs[name])
    if path.exists():
        raise FileExistsError(f"{path} exists; the worker never replaces a file")
    return path


def read_grid_mask(job: Job, name: str, volume: Any, required: bool = True) -> Any:
    from .io.volumes import read_mask

    path = input_path(job, name, required)
    return None if path is None else read_mask(path, volume).array


def write_masks(job: Job, masks: dict[str, Any], matrix: Any) -> dict[str, str]:
    """Write each requested mask atomically (uncompressed: a hand-over file); returns their paths.

    The pipeline's masks are uint8 0/1 already: written as they are, without write_mask's copies."""
    from .io.volumes import write_volume

    paths = {name: output_path(job, name) for name in masks if name in job.outputs}
    if not paths:
        raise JobError(f"{job.task}: no output named; expected one of {', '.join(masks)}")
    return {name: str(write_volume(path, np.asarray(masks[name], np.uint8), matrix, compress=False))
            for name, path in paths.items()}


REFINE_OPTIONS = {"refiner": "litemedsam", "refiner_checkpoint": None, "sam_model": "vit_b", "sam2_config": None,
                  "device": "auto"}


def run_segment(worker: Worker, job: Job, progress: Callable) -> tuple[dict, dict]:
    from . import pipeline
    from .io.volumes import read_volume

    options = options_of(job, {"checkpoint": None, **REFINE_OPTIONS, "refiner": "none"})
    volume = read_volume(input_path(job, "volume"))
    out = pipeline.segment(worker.models, volume.array, volume.ijk_to_ras, progress=progress, cancel=job.cancel,
                           **options)
    return _mask_output(job, out, volume.ijk_to_ras)


def run_refine(worker: Worker, job: Job, progress: Callable) -> tuple[dict, dict]:
    from . import pipeline
    from .io.volumes import read_volume

    options = options_of(job, REFINE_OPTIONS)
    volume = read_volume(input_path(job, "volume"))
    mask = read_grid_mask(job, "mask", volume)
    out = pipeline.refine(worker.models, volume.array, volume.ijk_to_ras, mask, progress=progress, cancel=job.cancel,
                          **options)
    return _mask_output(job, out, volume.ijk_to_ras)


def _mask_output(job: Job, out: Any, matrix: Any) -> tuple[dict, dict]:
    outputs = write_masks(job, {"mask": out.mask, "coarse": out.coarse}, matrix)
    return outputs, {"warnings": out.warnings, "disagreements": out.disagreements, "axis": out.axis,
                     "liver": getattr(out, "liver", None)}


def run_propagate(worker: Worker, job: Job, progress: Callable) -> tuple[dict, dict]:
    from . import pipeline
    from .io.volumes import read_volume

    options = options_of(job, {"engine": "auto", "sam2_checkpoint": None, "sam2_config": None, "direction": "both",
                               "bounds": None, "device": "auto"})
    volume = read_volume(input_path(job, "volume"))
    annotation = read_grid_mask(job, "annotation", volume)
    guide = read_grid_mask(job, "guide", volume, required=False)
    out = pipeline.propagate(worker.models, volume.array, volume.ijk_to_ras, annotation, guide=guide,
                             progress=progress, cancel=job.cancel, **options)
    outputs = write_masks(job, {"mask": out.mask}, volume.ijk_to_ras)
    return outputs, {"stops": out.stops, "engine": out.engine, "axis": out.axis}


def run_finetune(worker: Worker, job: Job, progress: Callable) -> tuple[dict, dict]:
    from . import pipeline
    from .io.volumes import read_mask, read_volume

    options = options_of(job, {"init": None, "epochs": 20, "learning_rate": 1e-4, "device": "auto",
                               "batch_size": 10, "val_fraction": 0.2, "names": None, "slices": "all",
                               "empty_slices": None})
    images, labels = job.inputs.get("images") or [], job.inputs.get("labels") or []
    if not images or len(images) != len(labels):
        raise JobError("finetune: give as many 'labels' as 'images' (at least one)")
    names = options.pop("names") or [Path(p).name for p in images]
    output = output_path(job, "checkpoint")
    pairs = []
    for image, label, name in zip(images, labels, names, strict=True):
        volume = read_volume(image)
        pairs.append((volume.array, read_mask(label, volume).array, volume.ijk_to_ras, str(name)))
    result = pipeline.finetune(pairs, output, progress=progress, cancel=job.cancel, **options)
    return {"checkpoint": str(result.path)}, {"best_epoch": result.best_epoch, "card": result.card}


def run_suggest(worker: Worker, job: Job, progress: Callable) -> tuple[dict, dict]:
    """Slices to paint next; input ``annotated`` (optional mask) marks slices never to suggest."""
    from . import pipeline
    from .io.volumes import read_volume

    options = options_of(job, {"checkpoint": None, "count": 1, "device": "auto"})
    volume = read_volume(input_path(job, "volume"))
    annotated = read_grid_mask(job, "annotated", volume, required=False)
    return {}, pipeline.suggest(worker.models, volume.array, volume.ijk_to_ras, annotated=annotated,
                                progress=progress, cancel=job.cancel, **options)


HANDLERS: dict[str, Callable[[Worker, Job, Callable], tuple[dict, dict]]] = {
    "segment": run_segment, "refine": run_refine, "propagate": run_propagate, "finetune": run_finetune,
    "suggest": run_suggest,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polycl.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the CPUs this process may use, polycl.threads)")
    args = parser.parse_args(argv)
    configure_threads(args.threads)  # before torch is imported: affinity and cgroup quota, not the core count
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: no collapse beside other work
    events = EventWriter(claim_stdout())
    return Worker(events, sys.stdin).serve()


if __name__ == "__main__":
    sys.exit(main())

"""Long work split in two: ``compute`` (a job of the worker process) and ``apply`` (MRML, main thread).

A :class:`Task` holds the worker job (arrays it hands over, options, outputs it expects), how to read
the outputs back (``collect``) and what to do with them in the scene (``apply``).  ``compute`` writes
the inputs into a per-job temporary folder (uncompressed, atomically), runs the job in the worker,
reads the outputs and removes the folder; ``apply`` only runs after a successful compute, so a
cancelled or failed task (or a worker that died) leaves the scene exactly as it was.

The GUI drives a :class:`TaskRunner` from a timer on the main thread (``start`` / ``poll`` /
``request_cancel``); headless callers use :meth:`Task.run`.  No Python thread of Slicer's
interpreter computes anything, so nothing here touches MRML off the main thread.
"""

from __future__ import annotations

import builtins
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .worker_client import WorkerClient, WorkerEvent, shared_client

ProgressFn = Callable[[float, str], None]
Grid = tuple[np.ndarray, np.ndarray]  # [i, j, k] array, IJK->RAS


def _no_progress(fraction: float, message: str) -> None:
    """Default progress callback."""


@dataclass
class WorkerJob:
    """What the worker computes: ``volumes`` are written to the job folder as NRRD (a list -> several
    files); an ``outputs`` entry of None is a file in the job folder, a path is written where it says."""

    task: str
    volumes: dict[str, Grid | list[Grid]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str | None] = field(default_factory=dict)


@dataclass
class JobOutput:
    """A finished job: its output files and its JSON result."""

    files: dict[str, Path]
    result: dict

    def mask(self, name: str = "mask") -> np.ndarray:
        """An output mask (the worker writes uint8 0/1) as a uint8 [i, j, k] array."""
        from polycl.io.volumes import read_volume

        return np.asarray(read_volume(self.files[name]).array, np.uint8)


@dataclass
class MaskResult:
    """A mask job's result read back from the worker: the mask and the job's JSON result."""

    mask: np.ndarray
    info: dict

    @classmethod
    def read(cls, output: JobOutput) -> MaskResult:
        return cls(output.mask("mask"), output.result)

    def __getattr__(self, name: str) -> Any:
        """The job's result fields (axis, warnings, disagreements, stops, engine) as attributes."""
        try:
            return self.__dict__["info"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class FinetuneOutcome:
    """A finished finetuning job: the new checkpoint, its best epoch and model card."""

    path: Path
    best_epoch: int
    card: dict

    @classmethod
    def read(cls, output: JobOutput) -> FinetuneOutcome:
        return cls(output.files["checkpoint"], int(output.result["best_epoch"]), dict(output.result["card"]))


@dataclass
class Task:
    """A named unit of work: worker ``job`` -> ``collect(JobOutput)`` -> ``apply(result) -> report``."""

    name: str
    job: WorkerJob
    collect: Callable[[JobOutput], Any] = field(default=lambda output: output)
    apply: Callable[[Any], Any] = field(default=lambda result: result)
    client: WorkerClient | None = None

    def compute(self, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> Any:
        """Run the job in the worker and return the collected result (blocks; headless use)."""
        progress, cancel = progress or _no_progress, cancel or threading.Event()
        runner = TaskRunner(self).start()
        while True:
            if cancel.is_set():
                runner.request_cancel()
            for event in runner.poll(timeout=0.1):
                if event.kind == "progress":
                    progress(event.fraction, event.message)
                elif event.kind == "done":
                    return event.result
                else:
                    raise event.error

    def run(self, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> Any:
        """Compute in the worker, then apply on the calling thread (headless use)."""
        return self.apply(self.compute(progress, cancel))


@dataclass
class TaskEvent:
    """What :meth:`TaskRunner.poll` reports: progress, done, cancelled or failed."""

    kind: str
    fraction: float = 0.0
    message: str = ""
    result: Any = None
    error: BaseException | None = None
    details: str = ""
    stats: dict = field(default_factory=dict)


class TaskRunner:
    """Runs ``task``'s worker job; the owner polls events (e.g. from a QTimer) and applies the result."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.client = task.client or shared_client()
        self.folder: Path | None = None
        self.submitted = None

    def start(self) -> TaskRunner:
        """Write the inputs and send the job (main thread; returns at once)."""
        from polycl.io.volumes import write_volume

        job = self.task.job
        self.folder = Path(tempfile.mkdtemp(prefix="polycl-job-", dir=self.client.temp_root))
        try:
            inputs: dict[str, Any] = {}
            for name, value in job.volumes.items():
                grids = value if isinstance(value, list) else [value]
                paths = [str(write_volume(self.folder / f"{name}_{n}.nrrd", array, matrix, compress=False))
                         for n, (array, matrix) in enumerate(grids)]
                inputs[name] = paths if isinstance(value, list) else paths[0]
            outputs = {name: path or str(self.folder / f"{name}.nrrd") for name, path in job.outputs.items()}
            self.submitted = self.client.submit(job.task, inputs, outputs, job.options)
            self.submitted.on_end.append(self._clean)  # a job stopped with the worker leaves no folder behind
        except BaseException:
            self._clean()
            raise
        return self

    def request_cancel(self) -> None:
        """Ask the worker to stop at its next cancellation point (terminated if it does not answer)."""
        if self.submitted is not None:
            self.submitted.request_cancel()

    @property
    def running(self) -> bool:
        return self.submitted is not None and not self.submitted.ended

    def poll(self, timeout: float = 0.0) -> list[TaskEvent]:
        """Events since the last poll; the outputs are read (``collect``) when the job is done."""
        events = [self._convert(event) for event in self.submitted.poll(timeout)]
        if not self.running:
            self._clean()
        return events

    def wait(self, timeout: float | None = None) -> list[TaskEvent]:
        """Block until the job ends (tests and scripts); returns all its events."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        events = []
        while self.running and (deadline is None or time.monotonic() < deadline):
            events += self.poll(timeout=0.1)
        return events

    def _convert(self, event: WorkerEvent) -> TaskEvent:
        if event.kind == "progress":
            return TaskEvent("progress", event.fraction, event.message)
        if event.kind == "done":
            try:
                files = {name: Path(path) for name, path in event.outputs.items()}
                return TaskEvent("done", 1.0, "done", self.task.collect(JobOutput(files, event.result)),
                                 stats=event.stats)
            except Exception as error:  # unreadable output: a failure, the scene stays as it was
                return TaskEvent("failed", message=f"cannot read the result: {error}", error=error)
        if event.kind == "cancelled":
            from polycl.progress import Cancelled

            return TaskEvent("cancelled", message=event.message, error=Cancelled(f"{self.task.name} {event.message}"))
        return TaskEvent("failed", message=event.message, error=_exception(event), details=event.details)

    def _clean(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _exception(event: WorkerEvent) -> BaseException:
    """The worker's error as the built-in exception type it reported (ValueError, FileExistsError, ...)."""
    cls = getattr(builtins, event.error_type, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    try:
        error = cls(event.message)
    except Exception:
        error = RuntimeError(event.message)
    error.details = event.details  # the worker's traceback
    return error

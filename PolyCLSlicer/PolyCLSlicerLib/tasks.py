"""Long work split in two: ``compute`` (arrays only, any thread) and ``apply`` (MRML, main thread).

The GUI runs ``compute`` in a worker thread through :class:`BackgroundTask` and polls it from a
timer on the main thread; ``apply`` only runs after a successful compute, so a cancelled or failed
task leaves the scene exactly as it was.  Headless callers use :meth:`Task.run`.

Python's cyclic garbage collector runs on whichever thread happens to allocate; collecting MRML/VTK
objects on the worker thread crashes.  So garbage is collected on the main thread before the worker
starts, automatic collection is paused while it runs, and resumed (with a collection) on the main
thread when the task has ended.
"""

from __future__ import annotations

import gc
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ProgressFn = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    """Default progress callback."""


@dataclass
class Task:
    """A named unit of work: ``compute(progress, cancel) -> result`` then ``apply(result) -> report``."""

    name: str
    compute: Callable[[ProgressFn, threading.Event], Any]
    apply: Callable[[Any], Any] = field(default=lambda result: result)

    def run(self, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> Any:
        """Compute and apply synchronously on the calling thread (headless use)."""
        result = self.compute(progress or _no_progress, cancel or threading.Event())
        return self.apply(result)


@dataclass
class TaskEvent:
    """What :meth:`BackgroundTask.poll` reports: progress, done, cancelled or failed."""

    kind: str
    fraction: float = 0.0
    message: str = ""
    result: Any = None
    error: BaseException | None = None
    details: str = ""


class BackgroundTask:
    """Run ``task.compute`` in a daemon thread; events are collected with :meth:`poll`."""

    def __init__(self, task: Task):
        self.task = task
        self.cancel = threading.Event()
        self._events: queue.Queue[TaskEvent] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"PolyCL {task.name}", daemon=True)

    _paused = 0  # running background tasks that paused the garbage collector
    _gc_was_enabled = True

    def start(self) -> BackgroundTask:
        """Start the worker (call from the main thread)."""
        gc.collect()
        if BackgroundTask._paused == 0:
            BackgroundTask._gc_was_enabled = gc.isenabled()
            gc.disable()
        BackgroundTask._paused += 1
        self._resumed = False
        self._thread.start()
        return self

    def _resume_gc(self) -> None:
        if self._resumed:
            return
        self._resumed = True
        BackgroundTask._paused -= 1
        if BackgroundTask._paused == 0 and BackgroundTask._gc_was_enabled:
            gc.enable()
            gc.collect()

    def request_cancel(self) -> None:
        """Ask the computation to stop at its next cancellation point."""
        self.cancel.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _progress(self, fraction: float, message: str) -> None:
        self._events.put(TaskEvent("progress", float(fraction), str(message)))

    def _work(self) -> None:
        from polycl.progress import Cancelled

        try:
            result = self.task.compute(self._progress, self.cancel)
        except Cancelled as error:
            self._events.put(TaskEvent("cancelled", message=str(error)))
        except BaseException as error:  # reported to the GUI thread, never swallowed
            self._events.put(
                TaskEvent(
                    "failed", message=str(error) or type(error).__name__, error=error, details=traceback.format_exc()
                )
            )
        else:  # finished: reported as done even if cancel arrived after the last cancellation point
            self._events.put(TaskEvent("done", 1.0, "done", result=result))

    def poll(self) -> list[TaskEvent]:
        """Events since the last poll (call from the main thread, e.g. from a QTimer)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if any(event.kind != "progress" for event in events):
            self._thread.join()
            self._resume_gc()
        return events

    def wait(self, timeout: float | None = None) -> list[TaskEvent]:
        """Block until the worker ends (tests and scripts); returns all pending events."""
        self._thread.join(timeout)
        return self.poll()

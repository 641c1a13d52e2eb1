"""The panel's background job (app only, imports no Qt): one job at a time, polled from the Widget's QTimer.

While a job runs, its button reads Cancel (Stop for finetuning) and the other action buttons are off;
the result is applied on the main thread when the worker is done, and a cancelled or failed job leaves
the scene as it was.  ``PolyCLSlicerWidget`` inherits :class:`PanelJobs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import slicer

from . import dependencies
from .tasks import Task, TaskRunner


@dataclass
class PanelJob:
    """The running job and the widgets that show it."""

    runner: TaskRunner
    button: Any
    idleText: str
    progressBar: Any
    statusLabel: Any
    onDone: Callable[[Any], None]
    discard: bool = False  # the scene was closed: the result has nowhere to go


class PanelJobs:
    """Start / poll / cancel the panel's job.  The Widget provides ``ui``, ``_timer`` (a QTimer calling
    ``_pollJob``), ``_job``, ``ACTION_BUTTONS`` and ``_onParameterNodeModified``."""

    def _ensureDependencies(self, refiner: str = "none", engine: str | None = None, statusLabel: Any = None) -> bool:
        """True when the packages are there (installed after one consent); a decline is a cancel, not an error."""
        needed = dependencies.missing(refiner, engine)
        if not needed:
            return True
        label = statusLabel or self.ui.statusLabel
        with slicer.util.tryWithErrorDisplay("Installing Python packages failed."):
            try:
                if dependencies.ensure(needed):
                    return True
                label.text = "Cancelled: the Python packages were not installed."
            except dependencies.InstallFailedShown:  # Slicer showed the error and pip's log already
                label.text = "Failed: the Python packages were not installed (see the error shown)."
        return False

    def _cancelRunningJob(self) -> bool:
        """A click while a job runs is on its Cancel / Stop button: ask the job to stop; False when idle."""
        if self._job is None:
            return False
        self._job.runner.request_cancel()
        return True

    def _startJob(self, task: Task, button: Any, progressBar: Any, statusLabel: Any, onDone: Any) -> None:
        runner = TaskRunner(task).start()  # hands the inputs to the worker; raises before any UI change
        self._job = PanelJob(runner, button, button.text, progressBar, statusLabel, onDone)
        button.text = "Stop" if button is self.ui.finetuneButton else "Cancel"
        for name in self.ACTION_BUTTONS:
            getattr(self.ui, name).enabled = getattr(self.ui, name) is button
        progressBar.value = 0
        progressBar.visible = True
        statusLabel.text = f"{task.name} running..."
        self._timer.start()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.runner.poll():
            if event.kind == "progress":
                job.progressBar.value = int(100 * event.fraction)
                job.statusLabel.text = event.message
            elif event.kind == "done" and job.discard:
                self._endJob()
                job.statusLabel.text = "The scene was closed; the result was discarded."
            elif event.kind == "done":  # also when Cancel came too late: finished work is kept
                self._endJob()
                with slicer.util.tryWithErrorDisplay("Could not store the result.", waitCursor=True):
                    job.onDone(job.runner.task.apply(event.result))  # MRML changes: main thread only
            elif event.kind == "cancelled":
                self._endJob()
                job.statusLabel.text = "Cancelled; the scene and files are unchanged."
            elif event.kind == "failed":
                self._endJob()
                job.statusLabel.text = f"Failed: {event.message}"
                slicer.util.errorDisplay(f"{job.runner.task.name} failed: {event.message}", detailedText=event.details)

    def _endJob(self) -> None:
        job, self._job = self._job, None
        self._timer.stop()
        job.button.text = job.idleText
        job.progressBar.visible = False
        for name in self.ACTION_BUTTONS:
            getattr(self.ui, name).enabled = True
        self._onParameterNodeModified()

"""Progress reporting and cooperative cancellation shared by every long-running task."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

ProgressFn = Callable[[float, str], None]
"""progress(fraction in [0, 1], message)"""


class Cancelled(RuntimeError):
    """Raised inside a task when its cancel flag was set; the task leaves prior state intact."""


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def new_cancel_flag() -> threading.Event:
    """A thread-safe cancel flag (``flag.set()`` from any thread cancels)."""
    return threading.Event()


def check_cancel(cancel: CancelFlag | None, what: str = "task") -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def no_progress(fraction: float, message: str) -> None:
    """Default progress callback: does nothing."""

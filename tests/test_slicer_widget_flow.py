"""The Widget's flow with stand-ins for the app-only pieces (qt, ScriptedLoadableModule, parameterNodeWrapper).

The real MRML scene, nodes and Logic are used; only Qt widgets, dialogs and the parameter-node binding
are replaced by small fakes built from the real .ui (every widget name in it exists as a fake).  This
checks what the app would do on button presses: Apply turns into Cancel and back, results are applied
on the main thread, cancel leaves the scene unchanged, the review list jumps the views, finetuning
selects the new checkpoint.  Rendering and real Qt signal wiring are not covered (see docs/slicer.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PolyCLSlicer"
sys.path.insert(0, str(MODULE_DIR))
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")


class FakeWidget:
    """Any Qt widget: plain attributes plus the few methods the Widget calls."""

    def __init__(self, name: str, text: str = "") -> None:
        self.name, self.text, self.enabled, self.visible, self.value = name, text, True, True, 0
        self.slots: dict[str, object] = {}
        self.node, self.segmentId, self.rows, self.items = None, "", 0, {}

    def connect(self, signal: str, slot: object) -> None:
        self.slots[signal] = slot

    def setMRMLScene(self, scene: object) -> None:
        pass

    def setCurrentNode(self, node: object) -> None:
        if node is not self.node:
            self.node, self.segmentId = node, ""

    def currentSegmentID(self) -> str:
        return self.segmentId

    def setCurrentSegmentID(self, segment_id: str) -> None:
        self.segmentId = segment_id

    def setRowCount(self, rows: int) -> None:
        self.rows = rows

    def setItem(self, row: int, column: int, item: object) -> None:
        self.items[(row, column)] = item


class FakeTimer:
    def __init__(self) -> None:
        self.active = False

    def setInterval(self, msec: int) -> None:
        pass

    def connect(self, signal: str, slot: object) -> None:
        self.slot = slot

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class Dialogs:
    """Records dialogs; answers confirmations with ``answer``."""

    def __init__(self) -> None:
        self.answer, self.shown, self.errors, self.jumps = False, [], [], []

    def confirm(self, text: str, *args: object, **kwargs: object) -> bool:
        self.shown.append(text)
        return self.answer

    def error(self, text: str, *args: object, **kwargs: object) -> None:
        self.errors.append(text)

    @contextlib.contextmanager
    def try_with_error_display(self, message: str = "", show: bool = True, waitCursor: bool = False):
        try:
            yield
        except Exception as error:  # what slicer.util.tryWithErrorDisplay does: show, do not raise
            self.errors.append(f"{message} {error}")


@pytest.fixture()
def app(monkeypatch, tmp_path):
    """Install the app-only stand-ins and import PolyCLSlicer as inside Slicer."""
    from PolyCLSlicerLib import mrml

    dialogs = Dialogs()
    scene = mrml.new_scene()
    ui_names = {w.get("name"): w for w in ET.parse(MODULE_DIR / "Resources/UI/PolyCLSlicer.ui").iter("widget")}

    def text_of(widget: ET.Element) -> str:
        prop = next((p for p in widget.findall("property") if p.get("name") == "text"), None)
        return prop.findtext("string") or "" if prop is not None else ""

    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QTableWidgetItem = lambda text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    class Logic:
        def __init__(self):
            pass

        def getParameterNode(self):
            node = scene.GetFirstNodeByName("PolyCLSlicer")
            return node or scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "PolyCLSlicer")

    slm.ScriptedLoadableModule, slm.ScriptedLoadableModuleWidget = Base, Base
    slm.ScriptedLoadableModuleLogic, slm.ScriptedLoadableModuleTest = Logic, unittest.TestCase
    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        import typing

        defaults = {name: getattr(cls, name, None) for name in typing.get_type_hints(cls)}

        class Wrapped:
            def __init__(self, node):
                self.__dict__.update(defaults)
                self.node, self.connected, self.disconnected = node, [], []

            def AddObserver(self, *args):  # the real wrapper forwards observers to its MRML node
                return self.node.AddObserver(*args)

            def RemoveObserver(self, *args):
                return self.node.RemoveObserver(*args)

            def connectGui(self, ui):
                self.connected.append(ui)
                return len(self.connected)

            def disconnectGui(self, tag):
                self.disconnected.append(tag)

        Wrapped.__annotations__ = cls.__annotations__
        return Wrapped

    pnw.parameterNodeWrapper, pnw.WithinRange = parameterNodeWrapper, lambda lo, hi: (lo, hi)
    pnw.GuiConnector, pnw.parameterNodeGuiConnector, pnw.unannotatedType = object, lambda cls: cls, lambda t: t
    for name, value in {"qt": qt, "ctk": types.ModuleType("ctk"), "slicer.ScriptedLoadableModule": slm,
                        "slicer.parameterNodeWrapper": pnw}.items():
        monkeypatch.setitem(sys.modules, name, value)
    markups = types.SimpleNamespace(JumpSlicesToLocation=lambda *a: dialogs.jumps.append(a))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda *a: None, majorVersion=5, minorVersion=10),
                        raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        markups=types.SimpleNamespace(logic=lambda: markups)), raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: types.SimpleNamespace(setMRMLScene=lambda s: None))
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: types.SimpleNamespace(
        **{n: FakeWidget(n, text_of(w)) for n, w in ui_names.items()}))
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", dialogs.confirm, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", dialogs.confirm, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", dialogs.error, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", dialogs.try_with_error_display, raising=False)
    monkeypatch.setenv("POLYCL_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    spec = importlib.util.spec_from_file_location("PolyCLSlicerInApp", MODULE_DIR / "PolyCLSlicer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HAS_APP
    monkeypatch.setattr(module.dependencies, "missing", lambda *a, **k: [])
    return types.SimpleNamespace(module=module, scene=scene, dialogs=dialogs)


def run_job(widget, timeout: float = 120.0) -> None:
    """What the QTimer does: poll until the job has ended."""
    deadline = time.monotonic() + timeout
    while widget._job is not None:
        assert time.monotonic() < deadline, "job did not finish"
        widget._pollJob()
        time.sleep(0.02)


@pytest.fixture()
def widget(app, labeled_case, tmp_path):
    import torch
    from PolyCLSlicerLib import mrml
    from PolyCLSlicerLib.worker_client import WorkerClient
    from test_slicer_logic import crop, tiny_checkpoint

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    ct, liver = labeled_case("totalseg_sm")
    array, matrix = crop(ct.array, ct.ijk_to_ras, 10, 18)
    volume = mrml.add_volume_node(app.scene, array, matrix, "ct")
    widget = app.module.PolyCLSlicerWidget(types.SimpleNamespace(isEntered=True))
    assert not hasattr(widget, "ui") and widget._parameterNode is None  # nothing before setup
    widget.setup()
    widget.logic.worker = WorkerClient(python=sys.executable, threads=1)  # PythonSlicer is the app's
    p = widget._parameterNode
    assert p is not None and p.connected == [widget.ui] and p.inputVolume is volume
    p.useStarterModel, p.checkpointPath = False, tiny_checkpoint(tmp_path / "tiny.safetensors")
    p.device = app.module.Device.CPU
    widget._onParameterNodeModified()
    yield types.SimpleNamespace(widget=widget, p=p, volume=volume, liver=liver.array[:, :, 10:18], matrix=matrix)
    widget.cleanup()  # what the app does when the module is destroyed: observers go away
    torch.set_num_threads(previous)


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_apply_turns_into_cancel_and_results_are_applied(app, widget):
    w, ui = widget.widget, widget.widget.ui
    assert "safetensors" not in ui.modelCardLabel.text and "polycl_unet" in ui.modelCardLabel.text
    w.onApplyButton()
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled
    assert not ui.propagateButton.enabled and not ui.finetuneButton.enabled and ui.progressBar.visible
    assert w._timer.active
    run_job(w)
    assert ui.applyButton.text == "Apply" and ui.finetuneButton.enabled and not ui.progressBar.visible
    segmentation = widget.p.outputSegmentation
    assert segmentation is not None and "'Liver'" in ui.statusLabel.text
    assert [s for s in app.module.mrml.segment_names(segmentation)] == ["Liver"]
    assert not app.dialogs.errors

    before, names = node_ids(app.scene), app.module.mrml.segment_names(segmentation)
    app.dialogs.answer = False  # 'Liver' exists: keep it, add a new one ...
    w.onApplyButton()
    assert "already has a 'Liver' segment" in app.dialogs.shown[-1]
    w.onApplyButton()  # ... then press Cancel right away
    run_job(w)
    if "Cancelled" in ui.statusLabel.text:
        assert node_ids(app.scene) == before and app.module.mrml.segment_names(segmentation) == names
    else:  # the tiny model can finish before the cancel is seen: then the result was kept, as a new segment
        assert app.module.mrml.segment_names(segmentation) == ["Liver", "Liver (2)"]
    assert ui.applyButton.text == "Apply"


def test_review_rows_jump_the_views(app, widget):
    w, mrml = widget.widget, app.module.mrml
    segmentation = mrml.new_segmentation_node(widget.volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, segment_id, widget.liver, widget.matrix)
    mrml.store_review(segmentation, segment_id, 2, [{"slice": 3, "dice": 0.41}, {"slice": 5, "dice": 0.8}])
    widget.p.outputSegmentation = segmentation
    w.showReview()
    assert w.ui.reviewTableWidget.rows == 2 and w.ui.reviewTableWidget.items[(0, 1)] == "0.410"
    w.onReviewRowClicked(1, 0)
    (jump,) = app.dialogs.jumps
    np.testing.assert_allclose(jump[:3], mrml.slice_center_ras(widget.volume, 2, 5))


def test_finetune_start_stop_and_new_checkpoint_is_selected(app, widget):
    w, ui, p, mrml = widget.widget, widget.widget.ui, widget.p, app.module.mrml
    segmentation = mrml.new_segmentation_node(widget.volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, segment_id, widget.liver, widget.matrix)
    initial = Path(p.checkpointPath)
    p.epochs, p.learningRate = 1, 1e-3
    w.onFinetuneButton()
    assert ui.finetuneButton.text == "Stop" and not ui.applyButton.enabled
    run_job(w, timeout=300)
    assert not app.dialogs.errors, app.dialogs.errors
    assert ui.finetuneButton.text == "Start" and ui.applyButton.enabled
    new = Path(p.checkpointPath)
    assert new != initial and new.exists() and initial.exists() and not p.useStarterModel
    assert new.parent == Path(app.module.PolyCLSlicerLogic.checkpointDirectory())
    assert "Saved and selected" in ui.finetuneStatusLabel.text


def test_open_segment_editor_paints_into_an_annotation_segment(app, widget, monkeypatch):
    w, p, mrml = widget.widget, widget.p, app.module.mrml
    calls = []
    editor = types.SimpleNamespace(**{name: (lambda *a, n=name: calls.append((n, a))) for name in (
        "setSegmentationNode", "setSourceVolumeNode", "setCurrentSegmentID", "setActiveEffectByName")})
    representation = types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=editor))
    slicer.modules.segmenteditor = types.SimpleNamespace(widgetRepresentation=lambda: representation)
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: calls.append(("selectModule", (name,))),
                        raising=False)
    w.onOpenSegmentEditor()
    assert not app.dialogs.errors, app.dialogs.errors
    segmentation = p.outputSegmentation
    assert mrml.segment_names(segmentation) == ["Liver annotation"]
    annotation_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    assert ("setCurrentSegmentID", (annotation_id,)) in calls and ("setActiveEffectByName", ("Paint",)) in calls
    assert w.ui.annotationSegmentSelector.currentSegmentID() == annotation_id
    assert len(app.dialogs.jumps) == 1  # the views moved to the middle slice


def test_closing_the_scene_during_a_job_discards_its_result(app, widget):
    w = widget.widget
    before = node_ids(app.scene)
    w.onApplyButton()
    folder = w._job.runner.folder
    w.onSceneStartClose(None, None)  # the user closes the scene while the segmentation runs
    assert w._parameterNode is None
    run_job(w)
    assert not folder.exists()  # the hand-over files go with the job (issue 21 row 6)
    assert w.ui.statusLabel.text in ("The scene was closed; the result was discarded.",
                                     "Cancelled; the scene and files are unchanged.")
    assert node_ids(app.scene) == before and w.ui.applyButton.text == "Apply"
    w.onSceneEndClose(None, None)
    assert w._parameterNode is not None


def test_cleanup_stops_the_timer_and_the_worker_and_unhooks_the_gui(app, widget):
    """Module reload / app exit during a job: no timer fires on deleted widgets, no worker is left behind."""
    w, p = widget.widget, widget.p
    before = node_ids(app.scene)
    w.onApplyButton()
    assert w._timer.active and w.logic.worker.running
    process = w.logic.worker._process.popen
    folder = w._job.runner.folder
    assert folder.is_dir()
    tag = w._parameterNodeGuiTag
    w.cleanup()
    assert not w._timer.active and w._job is None
    assert not folder.exists()  # the hand-over files of the dropped job are gone (issue 21 row 6)
    assert process.poll() is not None and not w.logic.worker.running  # the worker process has ended
    assert w._parameterNode is None and p.disconnected == [tag]
    assert w.Observations == []  # scene and parameter-node observers are gone
    time.sleep(0.5)
    assert node_ids(app.scene) == before  # the dropped job never applied anything


def test_inside_the_app_a_failing_app_import_raises_instead_of_switching_to_stand_ins(app, monkeypatch):
    """Issue 21 row 3: a renamed or missing app module is an error in the app, not a silent headless mode."""
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", None)  # 'import' of it raises ImportError
    spec = importlib.util.spec_from_file_location("PolyCLSlicerBroken", MODULE_DIR / "PolyCLSlicer.py")
    with pytest.raises(ImportError, match="parameterNodeWrapper"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


class BlockingWorkerCall(BaseException):
    """Raised by a worker call that waits for the worker (not an Exception: no error display swallows it)."""


@contextlib.contextmanager
def no_blocking_worker_calls(monkeypatch):
    """Fail on any call that waits for the worker: Task.compute / Task.run, TaskRunner.wait, a waiting poll."""
    from PolyCLSlicerLib import tasks, worker_client

    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise BlockingWorkerCall(name)
        return call

    poll = worker_client.JobRun.poll

    def non_blocking_poll(self, timeout=0.0):
        if timeout:
            refuse(f"JobRun.poll(timeout={timeout})")()
        return poll(self, timeout)

    with monkeypatch.context() as patch:
        for owner, name in ((tasks.Task, "compute"), (tasks.Task, "run"), (tasks.TaskRunner, "wait")):
            patch.setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
        patch.setattr(worker_client.JobRun, "poll", non_blocking_poll)
        yield calls


def test_no_widget_slot_waits_for_the_worker(app, widget, monkeypatch):
    """Issue 21 row 2: every connected slot (and the timer's) returns at once; long work runs as a panel job
    with progress and Cancel.  Automatic finetuning on a contiguously painted liver needs the model's liver
    extent first: that runs as a job too, then finetuning starts from the timer."""
    w, ui, p, mrml = widget.widget, widget.widget.ui, widget.p, app.module.mrml
    segmentation = mrml.new_segmentation_node(widget.volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, segment_id, widget.liver, widget.matrix)  # every slice: contiguous
    p.outputSegmentation = segmentation
    p.finetuneSlices, p.epochs = app.module.FinetuneSlices.AUTO, 1
    annotation = np.zeros_like(widget.liver)
    annotation[:, :, 4] = widget.liver[:, :, 4]
    annotation_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver annotation")
    mrml.write_segment_mask(segmentation, annotation_id, annotation, widget.matrix)
    ui.annotationSegmentSelector.setCurrentNode(segmentation)
    ui.annotationSegmentSelector.setCurrentSegmentID(annotation_id)
    editor = types.SimpleNamespace(**{name: (lambda *a: None) for name in (
        "setSegmentationNode", "setSourceVolumeNode", "setCurrentSegmentID", "setActiveEffectByName")})
    representation = types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=editor))
    monkeypatch.setattr(slicer.modules, "segmenteditor",
                        types.SimpleNamespace(widgetRepresentation=lambda: representation), raising=False)
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: None, raising=False)
    slots = {(name, signal): slot for name in vars(ui) for signal, slot in getattr(ui, name).slots.items()}
    assert ("finetuneButton", "clicked(bool)") in slots and ("applyButton", "clicked(bool)") in slots
    started = []
    start_job = w._startJob
    monkeypatch.setattr(w, "_startJob", lambda task, *a: (started.append(task.name), start_job(task, *a)))
    with no_blocking_worker_calls(monkeypatch) as calls:
        for (name, signal), slot in sorted(slots.items(), key=lambda item: item[0][0] == "openSegmentEditorButton"):
            if name == "finetuneButton":
                continue
            slot(*([1, 0] if signal == "cellClicked(int,int)" else []))  # PythonQt drops unused arguments
            if w._job is not None:  # stop what it started: only the slot's own duration matters here
                slots[(w._job.button.name, "clicked(bool)")]()
                run_job(w)
        w.onSceneStartClose(None, None)
        w.onSceneEndClose(None, None)
        p = w._parameterNode
        p.finetuneSlices, p.epochs = app.module.FinetuneSlices.AUTO, 1
        p.useStarterModel, p.checkpointPath = widget.p.useStarterModel, widget.p.checkpointPath
        p.device, p.outputSegmentation = app.module.Device.CPU, segmentation
        errors = len(app.dialogs.errors)
        slots[("finetuneButton", "clicked(bool)")]()
        assert w._job is not None and ui.finetuneButton.text == "Stop" and started[-1] == "liver extent of ct"
        run_job(w, timeout=300)  # the timer's slot: extent done -> finetuning starts -> done
    assert calls == [] and app.dialogs.errors[errors:] == [], (calls, app.dialogs.errors)
    assert {"segmentation", "propagation", "slice suggestion"} <= set(started), (started, app.dialogs.errors)
    assert started[-2:] == ["liver extent of ct", "finetuning"]
    assert "Whole volume" in ui.finetuneSliceChoiceLabel.text and "Saved and selected" in ui.finetuneStatusLabel.text


def test_stop_during_the_liver_extent_step_cancels_finetuning(app, widget):
    w, ui, p, mrml = widget.widget, widget.widget.ui, widget.p, app.module.mrml
    segmentation = mrml.new_segmentation_node(widget.volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, segment_id, widget.liver, widget.matrix)
    p.finetuneSlices, p.epochs = app.module.FinetuneSlices.AUTO, 1
    checkpoint = p.checkpointPath
    w.onFinetuneButton()
    assert w._job.runner.task.name == "liver extent of ct"
    w.onFinetuneButton()  # Stop
    run_job(w)
    assert w._job is None and ui.finetuneButton.text == "Start" and p.checkpointPath == checkpoint
    assert not app.dialogs.errors, app.dialogs.errors

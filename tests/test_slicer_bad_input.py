"""Bad input in the Slicer Logic (issue 11): a clear message and an unchanged scene, before any compute.

Real MRML nodes (slicer-core): a volume under a parent transform, a vector volume, a labelmap volume
given as the CT, an output segmentation stored as closed surfaces, and a truncated file given to
``loadVolume``.  Each is refused when the task is built, so no worker job ever starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
from PolyCLSlicerLib import mrml  # noqa: E402

import PolyCLSlicer as module  # noqa: E402
from polycl.io import VolumeReadError, write_volume  # noqa: E402

SHAPE = (40, 36, 8)


@pytest.fixture()
def scene():
    return mrml.new_scene()


@pytest.fixture()
def logic():
    return module.PolyCLSlicerLogic()


def ct_array() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 300, SHAPE).astype(np.int16)


def matrix() -> np.ndarray:
    return np.diag([0.8, 0.8, 3.0, 1.0])


def scene_state(scene) -> list[tuple[str, str, int]]:
    """Node ids, classes and modification times: any added, removed or modified node shows."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(n.GetID(), n.GetClassName(), n.GetMTime()) for n in nodes]


def under_transform(scene):
    volume = mrml.add_volume_node(scene, ct_array(), matrix(), "ct")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume, None, "harden the transform"


def vector_volume(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(*SHAPE)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml.array_to_matrix(matrix()))
    return node, None, "3 components"


def labelmap_as_ct(scene):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "liver label")
    image = vtk.vtkImageData()
    image.SetDimensions(*SHAPE)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml.array_to_matrix(matrix()))
    return node, None, "is a labelmap"


def closed_surface_output(scene):
    volume = mrml.add_volume_node(scene, ct_array(), matrix(), "ct")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(5.0)
    sphere.Update()
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Liver", [0.2, 0.4, 0.9])
    return volume, node, "stores its segments as closed surface"


@pytest.mark.parametrize("build", [under_transform, vector_volume, labelmap_as_ct, closed_surface_output],
                         ids=["parent-transform", "vector-volume", "labelmap-as-ct", "closed-surface-output"])
def test_segment_task_refuses_before_any_change(build, scene, logic):
    volume, segmentation, expected = build(scene)
    before = scene_state(scene)
    with pytest.raises(ValueError, match=expected) as error:
        logic.segmentTask(volume, segmentation)
    assert len(str(error.value).splitlines()) == 1
    assert scene_state(scene) == before


def test_load_volume_refuses_a_truncated_file(scene, tmp_path):
    write_volume(tmp_path / "ct.nii.gz", ct_array(), matrix())
    (tmp_path / "ct.nii.gz").write_bytes((tmp_path / "ct.nii.gz").read_bytes()[:5000])
    before = scene_state(scene)
    with pytest.raises(VolumeReadError, match="truncated"):
        module.PolyCLSlicerLogic.loadVolume(scene, tmp_path / "ct.nii.gz")
    assert scene_state(scene) == before

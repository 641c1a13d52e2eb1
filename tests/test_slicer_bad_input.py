"""Bad input in the Slicer Logic (issue 11): a clear message and an unchanged scene, before any compute.

Real MRML nodes (slicer-core): a volume under a parent transform, a vector volume, a labelmap volume
given as the CT, an output segmentation stored as closed surfaces, and a truncated file given to
``loadVolume``.  Each is refused when the task is built, so no worker job ever starts.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
from PolyCLSlicerLib import mrml  # noqa: E402

import PolyCLSlicer as module  # noqa: E402
from conftest import closed_surface_segmentation  # noqa: E402
from polycl.io.base import VolumeReadError  # noqa: E402
from polycl.io.volumes import write_volume  # noqa: E402

SHAPE = (40, 36, 8)


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


def uint8_volume_node(scene, class_name: str, name: str, components: int):
    """A volume node of ``class_name`` holding an empty SHAPE image with ``components`` uint8 components."""
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*SHAPE)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, components)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml.array_to_matrix(matrix()))
    return node


def vector_volume(scene):
    return uint8_volume_node(scene, "vtkMRMLVectorVolumeNode", "rgb", 3), None, "3 components"


def labelmap_as_ct(scene):
    return uint8_volume_node(scene, "vtkMRMLLabelMapVolumeNode", "liver label", 1), None, "is a labelmap"


def closed_surface_output(scene):
    volume = mrml.add_volume_node(scene, ct_array(), matrix(), "ct")
    node, _ = closed_surface_segmentation(scene, volume)
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

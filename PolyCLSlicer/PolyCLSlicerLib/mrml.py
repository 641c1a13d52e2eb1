"""MRML nodes <-> core arrays: the only place that translates between Slicer and ``polycl`` conventions.

``polycl`` works on arrays indexed ``[i, j, k]`` with a 4x4 IJK->RAS matrix.  VTK image data (and so
``slicer.util.arrayFromVolume``) is ``[k, j, i]``; the matrix comes from ``GetIJKToRASMatrix``.
Every function here runs on the main thread (MRML is not thread-safe) and works under the real
Slicer app as well as under ``slicer-core`` (no ``slicer.app``, no ``slicer.modules``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from polycl import geometry
from polycl.io.base import atomic_write

LIVER_SEGMENT_NAME = "Liver"
REVIEW_ATTRIBUTE = "PolyCL.Review"


class GeometryError(ValueError):
    """Nodes whose geometry cannot be used as given (transforms, empty images, no labelmap)."""


def binary_labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


# ----------------------------------------------------------------------------------------- scene
def ensure_segmentation_support() -> None:
    """Register the segmentation conversion rules (the app does this at startup; slicer-core does not)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if (
        factory.ConstructRepresentationObjectByRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        )
        is not None
    ):
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def new_scene() -> slicer.vtkMRMLScene:
    """A headless MRML scene with default colour tables and segmentation support."""
    ensure_segmentation_support()
    scene = slicer.vtkMRMLScene()
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.SetMRMLScene(None)  # tables stay in the scene; the logic need not observe it
    return scene


def scene_of(node: slicer.vtkMRMLNode) -> slicer.vtkMRMLScene:
    scene = node.GetScene()
    if scene is None:
        raise GeometryError(f"node {node.GetName()!r} is not in a MRML scene")
    return scene


# ---------------------------------------------------------------------------------------- arrays
def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def ijk_to_ras(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """4x4 IJK->RAS of a volume node (direction x spacing, origin)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def _image_to_array(image: vtk.vtkImageData) -> np.ndarray:
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
    if scalars is None or min(dims) < 1:
        raise GeometryError("image holds no voxels")
    if scalars.GetNumberOfComponents() != 1:
        raise GeometryError(f"image has {scalars.GetNumberOfComponents()} components; a scalar CT is required")
    return np.transpose(numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]), (2, 1, 0))


def volume_array(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """Copy of the voxels as an ``[i, j, k]`` array."""
    check_no_transform(volume_node)
    image = volume_node.GetImageData()
    if image is None:
        raise GeometryError(f"volume {volume_node.GetName()!r} has no image data")
    return np.array(_image_to_array(image))


def _fill_image(image: vtk.vtkImageData, array: np.ndarray) -> None:
    array = np.asarray(array)
    image.SetDimensions(*array.shape)
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), 1)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array.shape[::-1])
    target[:] = np.transpose(array, (2, 1, 0))
    image.Modified()


def add_volume_node(
    scene: slicer.vtkMRMLScene, array: np.ndarray, matrix: np.ndarray, name: str = "CT"
) -> slicer.vtkMRMLScalarVolumeNode:
    """New scalar volume node from an ``[i, j, k]`` array and its IJK->RAS matrix."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    _fill_image(image, array)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(array_to_matrix(matrix))
    node.CreateDefaultDisplayNodes()
    return node


def axial_axis(matrix: np.ndarray) -> int:
    """Array axis closest to the patient's inferior-superior axis: the engine's own rule
    (``polycl.geometry`` is numpy-only, so this works before torch is installed)."""
    return geometry.axial_axis(matrix)


def check_no_transform(node: slicer.vtkMRMLNode) -> None:
    """The engine works on the node's own grid; parent transforms must be hardened first."""
    if node.GetParentTransformNode() is not None:
        raise GeometryError(
            f"{node.GetName()!r} is under the transform {node.GetParentTransformNode().GetName()!r}; "
            "harden the transform (Data module, right-click) before running PolyCL"
        )


# -------------------------------------------------------------------------------------- segments
def oriented_image(mask: np.ndarray, matrix: np.ndarray) -> slicer.vtkOrientedImageData:
    """Binary ``[i, j, k]`` mask as a uint8 vtkOrientedImageData on the given grid."""
    if np.ndim(mask) != 3:
        raise GeometryError(f"a segment mask must be a 3-D [i, j, k] array, got shape {np.shape(mask)}")
    image = slicer.vtkOrientedImageData()
    _fill_image(image, (np.asarray(mask) > 0).astype(np.uint8))
    image.SetImageToWorldMatrix(array_to_matrix(matrix))
    return image


def new_segmentation_node(
    volume_node: slicer.vtkMRMLVolumeNode, name: str | None = None
) -> slicer.vtkMRMLSegmentationNode:
    """Empty segmentation in the volume's scene, with the volume as reference geometry."""
    ensure_segmentation_support()
    node = scene_of(volume_node).AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} PolyCL")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def segment_names(segmentation_node: slicer.vtkMRMLSegmentationNode) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def unique_segment_name(segmentation_node: slicer.vtkMRMLSegmentationNode, base: str) -> str:
    """``base`` if unused, else ``base (2)``, ``base (3)`` ..."""
    names = set(segment_names(segmentation_node))
    if base not in names:
        return base
    number = 2
    while f"{base} ({number})" in names:
        number += 1
    return f"{base} ({number})"


def segment_id_by_name(segmentation_node: slicer.vtkMRMLSegmentationNode, name: str) -> str | None:
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    return segment_id or None


def check_labelmap_source(segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
    """PolyCL writes binary labelmaps: refuse a segmentation stored as another representation."""
    ensure_segmentation_support()
    source = segmentation_node.GetSegmentation().GetSourceRepresentationName()
    if source != binary_labelmap_name():
        raise GeometryError(
            f"{segmentation_node.GetName()!r} stores its segments as {source.lower()}, PolyCL writes labelmaps: "
            "choose another output segmentation, or make 'Binary labelmap' its source representation "
            "(Segmentations module, Representations)"
        )


def write_segment_mask(
    segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, mask: np.ndarray, matrix: np.ndarray
) -> None:
    """Replace a segment's binary labelmap with an ``[i, j, k]`` mask on the grid ``matrix``."""
    ensure_segmentation_support()
    check_no_transform(segmentation_node)
    check_labelmap_source(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    layer = segmentation.GetLayerIndex(segment_id)
    if layer >= 0 and len(segmentation.GetSegmentIDsForLayer(layer)) > 1:
        segmentation.SeparateSegmentLabelmap(segment_id)  # never touch segments sharing its layer
    image = oriented_image(mask, matrix)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent()
    )
    if not ok:
        raise RuntimeError(f"could not write the labelmap of segment {segment_id!r}")


def segment_mask(
    segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, volume_node: slicer.vtkMRMLVolumeNode
) -> np.ndarray:
    """A segment as a uint8 ``[i, j, k]`` mask on the volume's grid (nearest-neighbour resampling)."""
    ensure_segmentation_support()
    check_no_transform(segmentation_node)
    check_no_transform(volume_node)
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise KeyError(f"segment {segment_id!r} not in {segmentation_node.GetName()!r}")
    dims = volume_node.GetImageData().GetDimensions()
    labelmap = _binary_labelmap(segmentation_node, segment_id)
    extent = labelmap.GetExtent()
    if labelmap.GetPointData().GetScalars() is None or extent[1] < extent[0]:
        return np.zeros(dims, np.uint8)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(array_to_matrix(ijk_to_ras(volume_node)))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True
    )
    return (_padded_to(resampled, dims) > 0).astype(np.uint8)


def _binary_labelmap(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str) -> slicer.vtkOrientedImageData:
    """A segment's binary labelmap; segmentations stored as closed surfaces (etc.) get it as a derived
    representation first, as Slicer's slice views do (the source representation is unchanged)."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap = slicer.vtkOrientedImageData()
    if not (
        (segmentation.ContainsRepresentation(binary_labelmap_name())
         or segmentation.CreateRepresentation(binary_labelmap_name()))
        and segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    ):
        raise GeometryError(
            f"segment {segment_id!r} of {segmentation_node.GetName()!r} has no binary labelmap and "
            f"cannot be converted to one from its {segmentation.GetSourceRepresentationName().lower()}"
        )
    return labelmap


def _padded_to(image: vtk.vtkImageData, dims: tuple[int, int, int]) -> np.ndarray:
    """Array of ``image`` placed into a zero ``dims`` grid according to its extent."""
    out = np.zeros(dims, np.uint8)
    extent = image.GetExtent()
    if extent[1] < extent[0] or image.GetPointData().GetScalars() is None:
        return out
    values = _image_to_array(image)
    lo = [max(extent[2 * a], 0) for a in range(3)]
    hi = [min(extent[2 * a + 1], dims[a] - 1) for a in range(3)]
    if any(h < low for low, h in zip(lo, hi, strict=True)):
        return out
    src = tuple(slice(lo[a] - extent[2 * a], hi[a] - extent[2 * a] + 1) for a in range(3))
    out[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = values[src]
    return out


# ---------------------------------------------------------------------------------- review slices
def store_review(
    segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, axis: int, rows: list[dict]
) -> None:
    """Keep the per-slice disagreement list with the segmentation (saved with the scene)."""
    segmentation_node.SetAttribute(REVIEW_ATTRIBUTE, json.dumps({"segmentId": segment_id, "axis": axis, "rows": rows}))


def load_review(segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict | None:
    text = segmentation_node.GetAttribute(REVIEW_ATTRIBUTE)
    return json.loads(text) if text else None


def one_slice_annotation(
    mask: np.ndarray, matrix: np.ndarray, name: str, seed_slice: int | None, max_slices: int
) -> np.ndarray:
    """The annotation to propagate from: ``mask`` itself when it covers at most ``max_slices`` axial slices,
    else only slice ``seed_slice`` (axial array index) of it; a larger mask without a seed is refused."""
    axis = axial_axis(matrix)
    slices = np.flatnonzero(np.asarray(mask).any(axis=tuple(a for a in range(3) if a != axis)))
    if slices.size == 0:
        raise ValueError(f"the annotation segment {name!r} is empty; paint the liver on one axial slice first")
    if seed_slice is None:
        if slices.size > max_slices:
            raise ValueError(
                f"{name!r} covers {slices.size} axial slices ({slices[0]}-{slices[-1]}), not one: select the segment "
                "you painted on one slice (or a few) as the annotation, or give the slice to start from (seedSlice)"
            )
        return mask
    if seed_slice not in slices:
        raise ValueError(f"{name!r} is empty on axial slice {seed_slice}; it covers slices {slices[0]}-{slices[-1]}")
    seed = np.zeros_like(mask)
    index = [slice(None)] * 3
    index[axis] = seed_slice
    seed[tuple(index)] = np.asarray(mask)[tuple(index)]
    return seed


def slice_center_ras(volume_node: slicer.vtkMRMLVolumeNode, axis: int, index: int) -> tuple[float, float, float]:
    """RAS position of the centre of slice ``index`` along array axis ``axis``."""
    dims = volume_node.GetImageData().GetDimensions()
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[axis] = float(index)
    ras = ijk_to_ras(volume_node) @ np.array([*ijk, 1.0])
    return tuple(float(v) for v in ras[:3])


# ------------------------------------------------------------------------------------------- I/O
def save_segmentation(segmentation_node: slicer.vtkMRMLSegmentationNode, path: str | os.PathLike) -> Path:
    """Write a ``.seg.nrrd`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: segmentations are written as .seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetUseCompression(True)

    def write(temp: Path) -> None:
        storage.SetFileName(str(temp))
        if not storage.WriteData(segmentation_node):
            raise OSError(f"{path}: writing the segmentation failed")

    atomic_write(path, write, suffix=".seg.nrrd")
    return path


def load_segmentation(scene: slicer.vtkMRMLScene, path: str | os.PathLike) -> slicer.vtkMRMLSegmentationNode:
    """Read a ``.seg.nrrd`` into a new segmentation node."""
    ensure_segmentation_support()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", Path(path).name.split(".")[0])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise OSError(f"{path}: not a readable segmentation")
    node.CreateDefaultDisplayNodes()
    return node

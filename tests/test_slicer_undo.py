"""Segment read/write on segmentations stored as closed surfaces, and create-then-rollback of apply steps.

Real MRML (slicer-core), real failures: a segmentation whose source representation is closed surface
cannot take a labelmap, which is what a user's surface-based segmentation does to an apply.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
from PolyCLSlicerLib import mrml, terminology, undo  # noqa: E402

from conftest import closed_surface_segmentation, oblique_matrix  # noqa: E402

SHAPE = (40, 36, 20)


@pytest.fixture()
def volume(scene):
    matrix = oblique_matrix(spacing=(2.0, 2.0, 3.0), origin=(-40.0, -36.0, -30.0))
    return mrml.add_volume_node(scene, np.zeros(SHAPE, np.int16), matrix, "ct")


def sphere_center(volume) -> np.ndarray:
    return mrml.ijk_to_ras(volume) @ np.array([19.5, 17.5, 9.5, 1.0])


def surface_segmentation(scene, volume, radius: float = 15.0):
    """A closed-surface segmentation with a smooth sphere 'Liver' in the middle of the volume."""
    return closed_surface_segmentation(scene, volume, sphere_center(volume)[:3], radius, resolution=40)


def state(node, volume) -> dict:
    """Everything an apply may change on a segmentation node."""
    segmentation = node.GetSegmentation()
    segments = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        segments[segment_id] = (segment.GetName(), tuple(segment.GetColor()), segment.GetTerminology(),
                                mrml.segment_mask(node, segment_id, volume).tobytes())
    return {"segments": segments, "attributes": {n: node.GetAttribute(n) for n in node.GetAttributeNames()},
            "geometry": segmentation.GetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()),
            "source": segmentation.GetSourceRepresentationName()}


def test_segment_mask_of_a_closed_surface_segmentation_is_not_empty(scene, volume):
    node, segment_id = surface_segmentation(scene, volume)
    mask = mrml.segment_mask(node, segment_id, volume)
    voxel = 2.0 * 2.0 * 3.0
    expected = 4 / 3 * np.pi * 15.0**3 / voxel
    assert abs(mask.sum() - expected) < 0.1 * expected, (mask.sum(), expected)
    ijk = np.argwhere(mask).mean(axis=0)
    np.testing.assert_allclose(ijk, [19.5, 17.5, 9.5], atol=0.6)  # centred where the sphere is (oblique grid)
    assert node.GetSegmentation().GetSourceRepresentationName() == "Closed surface"  # source unchanged


def test_writing_into_a_closed_surface_segmentation_is_refused_before_any_change(scene, volume):
    node, segment_id = surface_segmentation(scene, volume)
    before = state(node, volume)
    with pytest.raises(mrml.GeometryError, match="stores its segments as closed surface.*source representation"):
        mrml.write_segment_mask(node, segment_id, np.ones(SHAPE), mrml.ijk_to_ras(volume))
    assert state(node, volume) == before


def test_failed_replace_restores_the_existing_liver_segment(scene, volume):
    node, liver_id = surface_segmentation(scene, volume)
    matrix = mrml.ijk_to_ras(volume)
    node.SetAttribute("keep", "me")
    before, nodes_before = state(node, volume), undo.node_ids(scene)
    with pytest.raises(mrml.GeometryError):
        with undo.undo_on_error(scene, node, changes_existing_segments=True):
            segment = node.GetSegmentation().GetSegment(liver_id)
            terminology.set_liver_terminology(segment)  # what replace mode does before writing
            segment.SetName("Liver (PolyCL)")
            mrml.store_review(node, liver_id, 2, [{"slice": 1, "dice": 0.5}])
            extra = node.GetSegmentation().AddEmptySegment("", "Liver (2)")
            assert extra
            mrml.write_segment_mask(node, liver_id, np.ones(SHAPE), matrix)  # fails: closed surface
    assert state(node, volume) == before and undo.node_ids(scene) == nodes_before


def test_failed_write_into_a_new_node_removes_it(scene, volume):
    nodes_before = undo.node_ids(scene)
    with pytest.raises(ValueError):
        with undo.undo_on_error(scene):
            node = mrml.new_segmentation_node(volume)
            segment_id = node.GetSegmentation().AddEmptySegment("", "Liver")
            mrml.write_segment_mask(node, segment_id, np.ones((4, 4)), mrml.ijk_to_ras(volume))  # not 3D
    assert undo.node_ids(scene) == nodes_before


def test_failure_in_an_empty_labelmap_segmentation_restores_its_geometry(scene, volume):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    node.CreateDefaultDisplayNodes()
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    role = node.GetReferenceImageGeometryReferenceRole()
    with pytest.raises(RuntimeError, match="disk full"):
        with undo.undo_on_error(scene, node):
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            node.GetSegmentation().AddEmptySegment("", "Liver")
            raise RuntimeError("disk full")
    assert node.GetSegmentation().GetNumberOfSegments() == 0
    assert node.GetSegmentation().GetConversionParameter(parameter) == "" and node.GetNodeReferenceID(role) is None


def test_rollback_removes_every_segment_the_block_added(scene, volume):
    """Issue 26: a block that added two segments must lose both (bug: only the last one added was removed)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "two")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    kept = node.GetSegmentation().AddEmptySegment("", "Kept")
    before = state(node, volume)
    with pytest.raises(RuntimeError, match="failed"):
        with undo.undo_on_error(scene, node):
            node.GetSegmentation().AddEmptySegment("", "Liver")
            node.GetSegmentation().AddEmptySegment("", "Liver annotation")
            raise RuntimeError("failed after two segments")
    assert [node.GetSegmentation().GetNthSegmentID(i)
            for i in range(node.GetSegmentation().GetNumberOfSegments())] == [kept]
    assert state(node, volume) == before


def test_ctrl_c_inside_the_block_rolls_the_scene_back(scene, volume):
    """Issue 26: a KeyboardInterrupt (Ctrl-C, a console interrupt) is not an Exception; the rollback must still
    run (bug: ``except Exception``)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    node.CreateDefaultDisplayNodes()
    nodes_before = undo.node_ids(scene)
    with pytest.raises(KeyboardInterrupt):
        with undo.undo_on_error(scene, node):
            mrml.new_segmentation_node(volume)
            node.GetSegmentation().AddEmptySegment("", "Liver")
            node.SetAttribute("PolyCL.Review", "{}")
            raise KeyboardInterrupt
    assert undo.node_ids(scene) == nodes_before
    assert node.GetSegmentation().GetNumberOfSegments() == 0 and node.GetAttribute("PolyCL.Review") is None


def test_success_keeps_everything(scene, volume):
    node = mrml.new_segmentation_node(volume)
    with undo.undo_on_error(scene, node, changes_existing_segments=True):
        segment_id = node.GetSegmentation().AddEmptySegment("", "Liver")
        mask = np.zeros(SHAPE, np.uint8)
        mask[5:10, 5:10, 2:4] = 1
        mrml.write_segment_mask(node, segment_id, mask, mrml.ijk_to_ras(volume))
    np.testing.assert_array_equal(mrml.segment_mask(node, segment_id, volume), mask)


# ------------------------------------------------------------------- the Logic's apply steps, real failures
def switch_to_closed_surface(node) -> None:
    """What a user can do while a job runs: make closed surface the segmentation's source representation."""
    node.CreateClosedSurfaceRepresentation()
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())


@pytest.fixture()
def labelmap_segmentation(scene, volume):
    """Segmentation with an existing 'Liver' (own colour, no terminology) and 'Spleen', plus a review list."""
    node = mrml.new_segmentation_node(volume, "mine")
    matrix = mrml.ijk_to_ras(volume)
    liver, spleen = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    liver[5:20, 5:20, 4:12] = 1
    spleen[25:35, 20:30, 6:10] = 1
    ids = {}
    for name, mask in (("Liver", liver), ("Spleen", spleen)):
        ids[name] = node.GetSegmentation().AddEmptySegment("", name)
        mrml.write_segment_mask(node, ids[name], mask, matrix)
    node.GetSegmentation().GetSegment(ids["Liver"]).SetColor(0.1, 0.2, 0.9)
    mrml.store_review(node, ids["Liver"], 2, [{"slice": 7, "dice": 0.4}])
    return node, ids


def result(mask: np.ndarray):
    from PolyCLSlicerLib.tasks import MaskResult

    return MaskResult(mask, {"axis": 2, "disagreements": [{"slice": 3, "dice": 0.2}], "warnings": [],
                             "engine": "litemedsam", "stops": []})


@pytest.mark.parametrize("overwrite", [True, False])
def test_segment_apply_that_fails_leaves_the_segmentation_as_it_was(scene, volume, labelmap_segmentation, overwrite):
    import PolyCLSlicer

    node, _ = labelmap_segmentation
    task = PolyCLSlicer.PolyCLSlicerLogic().segmentTask(volume, node, overwrite=overwrite)
    switch_to_closed_surface(node)  # while the job computes
    before, nodes_before = state(node, volume), undo.node_ids(scene)
    with pytest.raises(mrml.GeometryError, match="closed surface"):
        task.apply(result(np.ones(SHAPE, np.uint8)))
    assert state(node, volume) == before and undo.node_ids(scene) == nodes_before


def test_segment_apply_into_a_new_node_that_fails_removes_the_node(scene, volume):
    import PolyCLSlicer

    task = PolyCLSlicer.PolyCLSlicerLogic().segmentTask(volume)
    nodes_before = undo.node_ids(scene)
    with pytest.raises(mrml.GeometryError, match="3-D"):
        task.apply(result(np.ones((4, 4), np.uint8)))  # e.g. a damaged worker output
    assert undo.node_ids(scene) == nodes_before
    report = task.apply(result(np.ones(SHAPE, np.uint8)))  # the same task still applies a good result
    assert mrml.segment_names(report.segmentationNode) == ["Liver"]


@pytest.mark.parametrize("overwrite", [True, False])
def test_propagate_apply_that_fails_leaves_the_segmentation_as_it_was(scene, volume, labelmap_segmentation,
                                                                      overwrite):
    import PolyCLSlicer

    node, ids = labelmap_segmentation
    seed = np.zeros(SHAPE, np.uint8)
    seed[8:16, 8:16, 8] = 1
    annotation = node.GetSegmentation().AddEmptySegment("", "Liver annotation")
    mrml.write_segment_mask(node, annotation, seed, mrml.ijk_to_ras(volume))
    task = PolyCLSlicer.PolyCLSlicerLogic().propagateTask(volume, node, annotation, overwrite=overwrite)
    switch_to_closed_surface(node)
    before = state(node, volume)
    with pytest.raises(mrml.GeometryError, match="closed surface"):
        task.apply(result(np.ones(SHAPE, np.uint8)))
    assert state(node, volume) == before

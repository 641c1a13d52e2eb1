"""Create-then-rollback for the Logic's ``apply`` steps: a failure leaves the scene as it was.

What an apply may do: add a segmentation node (with display nodes), add segments, recolour / rename /
refill an existing segment (replace mode), set the reference geometry of an empty segmentation and
store attributes.  :func:`undo_on_error` undoes exactly these when its block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import slicer


def _geometry_parameter() -> str:
    return slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()


def node_ids(scene: slicer.vtkMRMLScene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def remove_nodes_except(scene: slicer.vtkMRMLScene, keep: set[str]) -> None:
    """Remove every node whose ID is not in ``keep`` (nodes added since ``keep = node_ids(scene)``)."""
    for i in reversed(range(scene.GetNumberOfNodes())):
        node = scene.GetNthNode(i)
        if node is not None and node.GetID() not in keep:
            scene.RemoveNode(node)


@contextlib.contextmanager
def undo_on_error(
    scene: slicer.vtkMRMLScene,
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
    changes_existing_segments: bool = False,
) -> Iterator[None]:
    """Create-then-rollback: when the block raises, remove the nodes it added to ``scene`` and the segments
    it added to ``segmentation_node``, and restore that node's attributes and reference geometry.

    With ``changes_existing_segments`` (e.g. replacing 'Liver'), all segments are copied first and put back
    on failure (names, colours, terminology, labelmaps, IDs; per-segment display settings return to defaults).
    """
    nodes_before = node_ids(scene)
    saved = None
    if segmentation_node is not None:
        segmentation = segmentation_node.GetSegmentation()
        role = segmentation_node.GetReferenceImageGeometryReferenceRole()
        copy = None
        if changes_existing_segments:
            copy = slicer.vtkSegmentation()
            copy.DeepCopy(segmentation)
        saved = (
            copy,
            [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())],
            {name: segmentation_node.GetAttribute(name) for name in segmentation_node.GetAttributeNames()},
            segmentation.GetConversionParameter(_geometry_parameter()),
            segmentation_node.GetNodeReferenceID(role),
        )
    try:
        yield
    except BaseException:
        if saved is not None and segmentation_node.GetScene() is not None:
            _restore_segmentation(segmentation_node, *saved)
        remove_nodes_except(scene, nodes_before)
        raise


def _restore_segmentation(
    node: slicer.vtkMRMLSegmentationNode,
    copy: slicer.vtkSegmentation | None,
    segment_ids: list[str],
    attributes: dict[str, str],
    geometry: str,
    reference_id: str | None,
) -> None:
    segmentation = node.GetSegmentation()
    if copy is not None:
        segmentation.DeepCopy(copy)
    for index in reversed(range(segmentation.GetNumberOfSegments())):
        if segmentation.GetNthSegmentID(index) not in segment_ids:
            segmentation.RemoveSegment(segmentation.GetNthSegmentID(index))
    for name in node.GetAttributeNames():
        if name not in attributes:
            node.RemoveAttribute(name)
    for name, value in attributes.items():
        node.SetAttribute(name, value)
    segmentation.SetConversionParameter(_geometry_parameter(), geometry)
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), reference_id)

"""The Logic's mask tasks: segment a liver, refine a segment with SAM, propagate a one-slice annotation.

``PolyCLSlicerLogic`` inherits them (``logic.segmentTask(...)``, ``logic.segment(...)``).  Each ``...Task``
builder reads the nodes now, hands the arrays to the worker and writes the result in ``apply`` on the
main thread under create-then-rollback; each synchronous form takes the same arguments plus
``progress(fraction, message)`` and ``cancel`` (a ``threading.Event``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from . import core, mrml, terminology
from .parameters import absolutePath
from .report import SegmentReport
from .tasks import MaskResult, Task, WorkerJob
from .undo import undo_on_error

MAX_ANNOTATED_SLICES = 5  # more is not a one-slice annotation (e.g. the whole coarse liver)


def _onSegment(builder: Callable[..., Task], doc: str) -> Callable[..., SegmentReport]:
    """The synchronous form of a task builder on (volume, segmentation, segment): build, compute, apply."""

    def run(
        self: Any,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode,
        segmentId: str,
        progress: Any = None,
        cancel: Any = None,
        **options: Any,
    ) -> SegmentReport:
        return builder(self, volumeNode, segmentationNode, segmentId, **options).run(progress, cancel)

    run.__doc__ = doc
    run.__name__ = run.__qualname__ = builder.__name__.removesuffix("Task")
    return run


class SegmentationTasks:
    """Segment / refine / propagate (needs ``self.worker`` and ``liverSegmentId`` of SceneHelpers)."""

    # ------------------------------------------------------------------------------- segmentation
    def segmentTask(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode | None = None,
        checkpoint: str | None = None,
        device: str = "auto",
        refiner: str = "none",
        samCheckpoint: str | None = None,
        samModel: str = "vit_b",
        sam2Checkpoint: str | None = None,
        sam2Config: str | None = None,
        segmentName: str = mrml.LIVER_SEGMENT_NAME,
        overwrite: bool = False,
    ) -> Task:
        """Read the volume now; compute in the worker; ``apply`` writes the Liver segment."""
        if volumeNode is None:
            raise ValueError("select an input CT volume")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"{volumeNode.GetName()!r} is a labelmap (a segmentation), not a CT; select the CT volume")
        array, matrix = mrml.volume_array(volumeNode), mrml.ijk_to_ras(volumeNode)
        if segmentationNode is not None:
            mrml.check_no_transform(segmentationNode)
            mrml.check_labelmap_source(segmentationNode)
        refinerCheckpoint = {"sam": samCheckpoint, "sam2": sam2Checkpoint}.get(refiner)
        started = time.perf_counter()
        job = WorkerJob("segment", {"volume": (array, matrix)}, {
            "checkpoint": str(core.checkpoint_path(checkpoint)), "device": device, "refiner": refiner,
            "refiner_checkpoint": absolutePath(refinerCheckpoint), "sam_model": samModel, "sam2_config": sam2Config,
        }, {"mask": None})

        def target() -> tuple[vtkMRMLSegmentationNode, str]:
            node = segmentationNode or mrml.new_segmentation_node(volumeNode)
            return node, self._targetSegment(node, volumeNode, segmentName, overwrite)

        def apply(output: MaskResult) -> SegmentReport:
            return self._applyMask(volumeNode, segmentationNode, overwrite, target, output, matrix, started)

        return Task("segmentation", job, MaskResult.read, apply, self.worker)

    def segment(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode | None = None,
        checkpoint: str | None = None,
        device: str = "auto",
        refiner: str = "none",
        progress: Any = None,
        cancel: Any = None,
        **options: Any,
    ) -> SegmentReport:
        """Segment the liver into a 'Liver' segment (new segmentation when none is given); headless."""
        task = self.segmentTask(volumeNode, segmentationNode, checkpoint, device, refiner, **options)
        return task.run(progress, cancel)

    def refineTask(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode,
        segmentId: str,
        refiner: str = "litemedsam",
        samCheckpoint: str | None = None,
        samModel: str = "vit_b",
        sam2Checkpoint: str | None = None,
        sam2Config: str | None = None,
        device: str = "auto",
        overwrite: bool = False,
    ) -> Task:
        """SAM-family box refinement of an existing segment (e.g. a corrected liver) into a new segment
        '<name> refined' (``overwrite``: into that segment); the review list is stored as after Apply."""
        if volumeNode is None or segmentationNode is None:
            raise ValueError("select the input volume and the segmentation that holds the segment to refine")
        mrml.check_no_transform(segmentationNode)
        mask = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
        if not mask.any():
            raise ValueError("the segment to refine is empty on this volume")
        array, matrix = mrml.volume_array(volumeNode), mrml.ijk_to_ras(volumeNode)
        sourceName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        started = time.perf_counter()
        job = WorkerJob("refine", {"volume": (array, matrix), "mask": (mask, matrix)}, {
            "refiner": refiner, "refiner_checkpoint": absolutePath({"sam": samCheckpoint, "sam2": sam2Checkpoint}.get(
                refiner)), "sam_model": samModel, "sam2_config": sam2Config, "device": device}, {"mask": None})

        def target() -> tuple[vtkMRMLSegmentationNode, str]:
            if overwrite:
                return segmentationNode, segmentId
            return segmentationNode, self._targetSegment(segmentationNode, volumeNode, f"{sourceName} refined", False)

        def apply(output: MaskResult) -> SegmentReport:
            return self._applyMask(volumeNode, segmentationNode, overwrite, target, output, matrix, started)

        return Task("refinement", job, MaskResult.read, apply, self.worker)

    refine = _onSegment(refineTask, "Refine an existing segment with SAM box prompts (new segment by default); "
                                    "headless.")

    # -------------------------------------------------------------------------------- propagation
    def propagateTask(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode,
        segmentId: str,
        engine: str = "auto",
        sam2Checkpoint: str | None = None,
        sam2Config: str | None = None,
        direction: str = "both",
        bounds: tuple[int, int] | None = None,
        device: str = "auto",
        outputSegmentName: str | None = None,
        overwrite: bool = False,
        useLiverAsGuide: bool = True,
        seedSlice: int | None = None,
    ) -> Task:
        """Propagate the segment painted on one axial slice through the volume (new segment by default).

        With ``useLiverAsGuide``, a non-empty 'Liver' segment (e.g. the PolyCL result) adds a stop rule.
        ``seedSlice`` (axial array index) propagates from that one slice of the segment; without it, a
        segment on more than MAX_ANNOTATED_SLICES slices (e.g. a whole liver) is refused.
        """
        if volumeNode is None or segmentationNode is None:
            raise ValueError("select the input volume and the segmentation that holds the annotation")
        matrix, array = mrml.ijk_to_ras(volumeNode), mrml.volume_array(volumeNode)
        annotation = mrml.segment_mask(segmentationNode, segmentId, volumeNode)  # KeyError: unknown segment
        sourceName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        annotation = mrml.one_slice_annotation(annotation, matrix, sourceName, seedSlice, MAX_ANNOTATED_SLICES)
        guideId = self.liverSegmentId(segmentationNode) if useLiverAsGuide else None
        guide = mrml.segment_mask(segmentationNode, guideId, volumeNode) if guideId else None
        started = time.perf_counter()

        volumes = {"volume": (array, matrix), "annotation": (annotation, matrix)}
        if guide is not None and guide.any():
            volumes["guide"] = (guide, matrix)
        job = WorkerJob("propagate", volumes, {
            "engine": engine, "sam2_checkpoint": absolutePath(sam2Checkpoint), "sam2_config": sam2Config,
            "direction": direction,
            "bounds": None if bounds is None else [int(b) for b in bounds], "device": device}, {"mask": None})

        def target() -> tuple[vtkMRMLSegmentationNode, str]:
            if overwrite:
                return segmentationNode, segmentId
            name = outputSegmentName or f"{sourceName} propagated"
            return segmentationNode, self.newLiverSegment(segmentationNode, name)

        def apply(output: MaskResult) -> SegmentReport:
            report = self._applyMask(volumeNode, segmentationNode, overwrite, target, output, matrix, started,
                                     review=False)
            report.notes = [f"engine: {output.engine}", *output.stops]
            return report

        return Task("propagation", job, MaskResult.read, apply, self.worker)

    propagate = _onSegment(propagateTask, "One annotated slice -> a multi-slice segment; headless.")

    # ------------------------------------------------------------------------------------ helpers
    def _applyMask(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode | None,
        overwrite: bool,
        target: Callable[[], tuple[vtkMRMLSegmentationNode, str]],
        output: MaskResult,
        matrix: np.ndarray,
        started: float,
        review: bool = True,
    ) -> SegmentReport:
        """Write ``output.mask`` into the segment ``target()`` picks (and, with ``review``, store the refiner's
        review list) under create-then-rollback: a failure removes what was created, restores what changed."""
        with undo_on_error(mrml.scene_of(volumeNode), segmentationNode, changes_existing_segments=overwrite):
            node, segmentId = target()
            mrml.write_segment_mask(node, segmentId, output.mask, matrix)
            rows = self._storeReview(node, segmentId, volumeNode, output) if review else []
        warnings = output.warnings if review else []
        report = self._report(node, segmentId, output.mask, matrix, output.axis, started, warnings, rows)
        report.liver = getattr(output, "liver", None)
        return report

    @staticmethod
    def _storeReview(node: vtkMRMLSegmentationNode, segmentId: str, volumeNode: vtkMRMLScalarVolumeNode,
                     output: MaskResult) -> list[dict]:
        """Store the refiner's disagreement slices with the segmentation (replacing an older list); return
        them with the RAS centre of each slice."""
        mrml.store_review(node, segmentId, output.axis, output.disagreements)
        return [{**row, "ras": mrml.slice_center_ras(volumeNode, output.axis, row["slice"])}
                for row in output.disagreements]

    def _targetSegment(
        self, segmentationNode: vtkMRMLSegmentationNode, volumeNode: vtkMRMLScalarVolumeNode, name: str, overwrite: bool
    ) -> str:
        """Existing segment ``name`` when overwriting, else a new segment with a unique name."""
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        existing = mrml.segment_id_by_name(segmentationNode, name)
        if overwrite and existing:
            segmentId = existing
            terminology.set_liver_terminology(segmentationNode.GetSegmentation().GetSegment(segmentId))
            return segmentId
        return self.newLiverSegment(segmentationNode, name)

    @staticmethod
    def _report(
        node: vtkMRMLSegmentationNode,
        segmentId: str,
        mask: np.ndarray,
        matrix: np.ndarray,
        axis: int,
        started: float,
        warnings: list[str],
        review: list[dict],
    ) -> SegmentReport:
        voxel_ml = abs(np.linalg.det(np.asarray(matrix)[:3, :3])) / 1000.0
        other = tuple(a for a in range(3) if a != axis)
        slices = [int(k) for k in np.flatnonzero(np.asarray(mask).any(axis=other))]
        count = int(np.count_nonzero(mask))
        name = node.GetSegmentation().GetSegment(segmentId).GetName()
        return SegmentReport(
            node,
            segmentId,
            name,
            count,
            count * voxel_ml,
            time.perf_counter() - started,
            slices,
            list(warnings),
            review,
        )

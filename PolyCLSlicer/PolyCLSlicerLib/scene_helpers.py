"""The Logic's scene helpers that start no job: finding liver segments and training pairs, the annotation
segment and where to look first, review rows, checkpoint file names, volume / mask file I/O.

``PolyCLSlicerLogic`` inherits them, so they are called as ``logic.liverSegmentId(...)`` and so on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from . import mrml, terminology


class SceneHelpers:
    """Stateless helpers on MRML nodes and files (no worker job, main thread)."""

    @staticmethod
    def newLiverSegment(segmentationNode: vtkMRMLSegmentationNode, name: str) -> str:
        """A new empty segment ``name`` (made unique) with the liver terminology."""
        uniqueName = mrml.unique_segment_name(segmentationNode, name)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", uniqueName)
        terminology.set_liver_terminology(segmentationNode.GetSegmentation().GetSegment(segmentId))
        return segmentId

    def annotationSegment(self, segmentationNode: vtkMRMLSegmentationNode) -> str:
        """A new empty 'Liver annotation' segment for painting one slice (liver terminology)."""
        return self.newLiverSegment(segmentationNode, "Liver annotation")

    def paintSegment(self, segmentationNode: vtkMRMLSegmentationNode) -> str:
        """The segment a finetune trains on (the liver segment), created as 'Liver' when there is none."""
        return self.liverSegmentId(segmentationNode) or self.newLiverSegment(segmentationNode, mrml.LIVER_SEGMENT_NAME)

    def middleSlicePosition(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode | None = None,
        segmentId: str | None = None,
    ) -> tuple[float, float, float]:
        """RAS centre of the middle axial slice of the (coarse) liver extent, else of the volume."""
        matrix = mrml.ijk_to_ras(volumeNode)
        axis = mrml.axial_axis(matrix)
        count = volumeNode.GetImageData().GetDimensions()[axis]
        index = (count - 1) // 2
        if segmentationNode is not None:
            segmentId = segmentId or self.liverSegmentId(segmentationNode, nonEmptyOn=volumeNode)
            if segmentId:
                mask = mrml.segment_mask(segmentationNode, segmentId, volumeNode)
                slices = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                if slices.size:
                    index = int((slices[0] + slices[-1]) // 2)
        return mrml.slice_center_ras(volumeNode, axis, index)

    @staticmethod
    def liverSegmentId(
        segmentationNode: vtkMRMLSegmentationNode, nonEmptyOn: vtkMRMLScalarVolumeNode | None = None
    ) -> str | None:
        """The liver segment (SNOMED CT code or name): 'Liver' first, one-slice annotations never.

        With ``nonEmptyOn``, only a segment that is non-empty on that volume's grid is returned.
        """
        segmentation = segmentationNode.GetSegmentation()
        candidates = []
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            name = segment.GetName().strip().lower()
            if terminology.is_liver_segment(segment) and "annotation" not in name:
                candidates.append((name != "liver", index, segmentation.GetNthSegmentID(index)))
        for _, _, segmentId in sorted(candidates):
            if nonEmptyOn is None or mrml.segment_mask(segmentationNode, segmentId, nonEmptyOn).any():
                return segmentId
        return None

    def trainingPairs(
        self, scene: Any, volumeNode: vtkMRMLScalarVolumeNode | None = None
    ) -> list[tuple[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, str]]:
        """(volume, segmentation, liver segment) for every segmentation whose reference volume has a liver."""
        role = vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        pairs = []
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
            reference = node.GetNodeReference(role)
            if not isinstance(reference, vtkMRMLScalarVolumeNode) or reference.IsA("vtkMRMLLabelMapVolumeNode"):
                continue
            if volumeNode is not None and reference is not volumeNode:
                continue
            segmentId = self.liverSegmentId(node, nonEmptyOn=reference)
            if segmentId:
                pairs.append((reference, node, segmentId))
        return pairs

    @staticmethod
    def checkpointDirectory() -> Path:
        """Where finetuned checkpoints go: $POLYCL_CHECKPOINT_DIR, else the Slicer / user data folder."""
        if os.environ.get("POLYCL_CHECKPOINT_DIR"):
            return Path(os.environ["POLYCL_CHECKPOINT_DIR"])
        app = getattr(slicer, "app", None)
        if app is not None:
            return Path(app.slicerUserSettingsFilePath).parent / "PolyCL" / "checkpoints"
        return Path.home() / ".polycl" / "checkpoints"

    def newCheckpointPath(self, directory: str | os.PathLike | None = None) -> Path:
        """A checkpoint file name that does not exist yet (never overwrite a checkpoint)."""
        directory = Path(directory) if directory else self.checkpointDirectory()
        stem = time.strftime("polycl_finetuned_%Y%m%d-%H%M%S")
        path, number = directory / f"{stem}.safetensors", 2
        while path.exists():
            path, number = directory / f"{stem}_{number}.safetensors", number + 1
        return path

    # ------------------------------------------------------------------------------------- review
    @staticmethod
    def reviewRows(
        segmentationNode: vtkMRMLSegmentationNode, volumeNode: vtkMRMLScalarVolumeNode | None = None
    ) -> list[dict]:
        """Stored disagreement slices of the last refinement, worst first, with their RAS positions."""
        review = mrml.load_review(segmentationNode) if segmentationNode else None
        if not review:
            return []
        if volumeNode is None:
            volumeNode = segmentationNode.GetNodeReference(
                vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
            )
        return [
            {**row, "ras": mrml.slice_center_ras(volumeNode, review["axis"], row["slice"])} for row in review["rows"]
        ]

    # --------------------------------------------------------------------------------------- I/O
    @staticmethod
    def loadVolume(scene: Any, path: str | os.PathLike, name: str | None = None) -> vtkMRMLScalarVolumeNode:
        """Read a CT (NIfTI / NRRD / MHA / DICOM folder) through polycl.io into a new volume node."""
        from polycl.io.volumes import read_volume

        volume = read_volume(path)
        return mrml.add_volume_node(scene, volume.array, volume.ijk_to_ras, name or Path(path).name.split(".")[0])

    @staticmethod
    def exportSegment(
        segmentationNode: vtkMRMLSegmentationNode,
        segmentId: str,
        volumeNode: vtkMRMLScalarVolumeNode,
        path: str | os.PathLike,
    ) -> Path:
        """Write one segment as a binary mask (NIfTI / NRRD) on the volume's grid."""
        from polycl.io.volumes import write_mask

        return write_mask(path, mrml.segment_mask(segmentationNode, segmentId, volumeNode), mrml.ijk_to_ras(volumeNode))

"""The Logic's human-in-the-loop tasks: finetune on liver segments, choose the training slices, suggest the
next slice to paint.

``PolyCLSlicerLogic`` inherits them (``logic.finetuneTask(...)``, ``logic.finetune(...)``); as in
:mod:`PolyCLSlicerLib.segmentation_tasks`, each synchronous form takes the builder's arguments plus
``progress`` and ``cancel``.  Finetuning writes a new checkpoint file and changes nothing in the scene.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from . import core, loop, mrml
from .tasks import FinetuneOutcome, Task, WorkerJob


class LoopTasks:
    """Finetune / slice choice / slice suggestion (needs ``self.worker`` and the SceneHelpers)."""

    # --------------------------------------------------------------------------------- finetuning
    def finetuneTask(
        self,
        volumeNodes: list,
        segmentationNodes: list,
        outputPath: str | os.PathLike | None = None,
        init: str | None = None,
        epochs: int = 20,
        learningRate: float = 1e-4,
        device: str = "auto",
        segmentIds: list[str | None] | None = None,
        batchSize: int = 10,
        valFraction: float = 0.2,
        slices: str = "all",
        emptySlices: list | None = None,
    ) -> Task:
        """Train from ``init`` (current checkpoint) on liver segments; writes a new file, selects nothing.

        ``slices="annotated"``: only the segment's painted axial slices (plus ``emptySlices``, array
        indices trained as background); see :meth:`finetuneSliceChoice` for the panel's automatic choice.
        """
        if len(volumeNodes) != len(segmentationNodes) or not volumeNodes:
            raise ValueError("give one segmentation node per volume node (at least one pair)")
        output = Path(outputPath) if outputPath else self.newCheckpointPath()
        if output.exists():
            raise FileExistsError(f"{output} exists; finetuning never overwrites a checkpoint")
        if output.resolve() == core.checkpoint_path(init).resolve():
            raise FileExistsError("the new checkpoint must not replace the one it starts from")
        pairs = []
        for volume, segmentation, segmentId in self._liverSegments(volumeNodes, segmentationNodes, segmentIds):
            mask = mrml.segment_mask(segmentation, segmentId, volume)
            pairs.append((mrml.volume_array(volume), mask, mrml.ijk_to_ras(volume), volume.GetName()))
        job = WorkerJob(
            "finetune",
            {"images": [(ct, m) for ct, _, m, _ in pairs], "labels": [(mask, m) for _, mask, m, _ in pairs]},
            {"init": str(core.checkpoint_path(init)), "epochs": int(epochs), "learning_rate": float(learningRate),
             "device": device, "batch_size": int(batchSize), "val_fraction": float(valFraction),
             "names": [name for *_, name in pairs], "slices": slices, "empty_slices": emptySlices},
            {"checkpoint": str(output.resolve())},
        )
        return Task("finetuning", job, FinetuneOutcome.read, client=self.worker)

    def finetune(
        self,
        volumeNodes: list,
        segmentationNodes: list,
        outputPath: str | os.PathLike | None = None,
        progress: Any = None,
        cancel: Any = None,
        **options: Any,
    ) -> Any:
        """Finetune on (volume, segmentation) pairs; returns ``.path``, ``.best_epoch`` and ``.card``."""
        return self.finetuneTask(volumeNodes, segmentationNodes, outputPath, **options).run(progress, cancel)

    def finetuneSliceChoice(
        self,
        volumeNodes: list,
        segmentationNodes: list,
        segmentIds: list[str | None] | None = None,
        mode: str = "auto",
        checkpoint: str | None = None,
        device: str = "auto",
        extents: dict[str, list[int] | None] | None = None,
    ) -> loop.SliceChoice:
        """Annotated slices or whole volume: ``auto`` picks annotated slices when a liver segment's slices are
        not contiguous or cover less than half of the model's liver extent.

        ``extents``: the results of :meth:`finetuneExtentTasks` (volume name -> liver extent), which the
        panel runs as background jobs first; without them the model runs here, synchronously (headless).
        """
        painted, counts, _ = self._paintedSlices(volumeNodes, segmentationNodes, segmentIds)
        if extents is None:
            tasks = self.finetuneExtentTasks(volumeNodes, segmentationNodes, segmentIds, mode, checkpoint, device)
            extents = {name: task.run() for name, task in tasks.items()}
        return loop.choose_slice_mode(painted, extents, counts, mode)

    def finetuneExtentTasks(
        self,
        volumeNodes: list,
        segmentationNodes: list,
        segmentIds: list[str | None] | None = None,
        mode: str = "auto",
        checkpoint: str | None = None,
        device: str = "auto",
    ) -> dict[str, Task]:
        """The worker jobs :meth:`finetuneSliceChoice` needs first (``auto`` mode, a liver segment painted on
        contiguous slices): volume name -> a task whose ``apply`` returns the model's liver extent."""
        if mode != "auto":
            return {}
        painted, _, volumes = self._paintedSlices(volumeNodes, segmentationNodes, segmentIds)
        tasks = {}
        for name, slices in painted.items():
            if slices and slices[-1] - slices[0] + 1 == len(slices):
                task = self.suggestSliceTask(volumes[name], None, checkpoint, 1, device)
                task.name, task.apply = f"liver extent of {name}", lambda result: result["liver_extent"]
                tasks[name] = task
        return tasks

    def _paintedSlices(
        self, volumeNodes: list, segmentationNodes: list, segmentIds: list[str | None] | None
    ) -> tuple[dict[str, list[int]], dict[str, int], dict[str, vtkMRMLScalarVolumeNode]]:
        """Per volume name: the liver segment's painted axial slices, the axial slice count, the volume node."""
        from polycl.training.sparse import annotated_slices

        painted, counts, volumes = {}, {}, {}
        for volume, segmentation, segmentId in self._liverSegments(volumeNodes, segmentationNodes, segmentIds):
            matrix, name = mrml.ijk_to_ras(volume), volume.GetName()
            painted[name] = annotated_slices(mrml.segment_mask(segmentation, segmentId, volume), matrix)
            counts[name] = volume.GetImageData().GetDimensions()[mrml.axial_axis(matrix)]
            volumes[name] = volume
        return painted, counts, volumes

    def _liverSegments(
        self, volumeNodes: list, segmentationNodes: list, segmentIds: list[str | None] | None
    ) -> list[tuple[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, str]]:
        """(volume, segmentation, segment) per pair: the given segment, else the liver segment (refused if none)."""
        triples = []
        for index, (volume, segmentation) in enumerate(zip(volumeNodes, segmentationNodes, strict=True)):
            segmentId = (segmentIds or [None] * len(volumeNodes))[index] or self.liverSegmentId(segmentation)
            if not segmentId:
                raise ValueError(f"{segmentation.GetName()!r} has no liver segment")
            triples.append((volume, segmentation, segmentId))
        return triples

    # ---------------------------------------------------------------------------- slice suggestion
    def suggestSliceTask(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode | None = None,
        checkpoint: str | None = None,
        count: int = 1,
        device: str = "auto",
        segmentId: str | None = None,
    ) -> Task:
        """Rank the axial slices to paint next (model uncertainty, polycl.suggest); slices of the liver
        segment are never suggested.  ``apply`` returns a :class:`loop.SuggestReport` (nothing is changed)."""
        if volumeNode is None:
            raise ValueError("select an input CT volume")
        matrix = mrml.ijk_to_ras(volumeNode)
        volumes = {"volume": (mrml.volume_array(volumeNode), matrix)}
        if segmentationNode is not None:
            segmentId = segmentId or self.liverSegmentId(segmentationNode, nonEmptyOn=volumeNode)
            if segmentId:
                volumes["annotated"] = (mrml.segment_mask(segmentationNode, segmentId, volumeNode), matrix)
        job = WorkerJob("suggest", volumes, {"checkpoint": str(core.checkpoint_path(checkpoint)), "count": int(count),
                                             "device": device})

        def apply(result: dict) -> loop.SuggestReport:
            positions = [mrml.slice_center_ras(volumeNode, result["axis"], k) for k in result["slices"]]
            return loop.SuggestReport(result["slices"], result["scores"], positions, result["axis"],
                                      result["annotated"], result["liver_extent"])

        return Task("slice suggestion", job, lambda output: output.result, apply, self.worker)

    def suggestSlice(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode | None = None,
        progress: Any = None,
        cancel: Any = None,
        **options: Any,
    ) -> loop.SuggestReport:
        """Slices to paint next, best first (headless)."""
        return self.suggestSliceTask(volumeNode, segmentationNode, **options).run(progress, cancel)

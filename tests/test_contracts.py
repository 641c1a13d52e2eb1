"""Contracts of issue 26: each test fails on the one-line bug named in its docstring (each was made in the
code and watched failing).  Unit level on synthetic arrays and tiny networks: checkpoints, outputs that
would replace an input, truncated files, sparse finetuning, slice suggestion, field of view, .seg.nrrd,
metrics on permuted and oblique grids, TransUNet's position table, DICOM SEG frame order.  The batch
contracts sit in tests/test_batch.py beside its fixtures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_cli_newcomer import no_work, run_error  # noqa: F401  (no_work: fixture)
from test_context25d import canonical_matrix, reoriented

from conftest import oblique_matrix
from polycl.geometry import CanonicalOrientation
from polycl.io.base import Volume, check_output_file
from polycl.io.volumes import read_volume, write_volume
from polycl.metrics import evaluate, hausdorff, per_slice_dice
from polycl.nets.checkpoints import CheckpointError, default_card, load_checkpoint, save_checkpoint, save_model
from polycl.nets.registry import build_model

TINY_UNET = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}
TINY_TRANSUNET = {"stem_width": 8, "stage_blocks": (1, 1, 1), "hidden": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
                  "img_size": 64, "decoder_channels": (16, 8, 8, 4), "dropout": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(single_torch_thread):
    """Tiny networks: one torch thread (shared 2-core machine)."""


# ------------------------------------------------------------------------------------------ checkpoints
def _raw_checkpoint(path: Path, state: dict, card: dict) -> Path:
    """A checkpoint written without save_checkpoint's card check (what a foreign or damaged file may hold)."""
    metadata = {"format": "polycl-checkpoint", "format_version": "1", "card": json.dumps(card)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_weight_holding_inf_is_refused_like_nan(tmp_path, bad):
    """Bug: only NaN weights were checked (torch.isnan), +Inf loaded and gave an all-NaN mask."""
    state = build_model("polycl_unet", **TINY_UNET).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = bad
    path = _raw_checkpoint(tmp_path / "bad.safetensors", state, default_card("polycl_unet", TINY_UNET, 32))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)


@pytest.mark.parametrize("field", ["center", "width"])
def test_a_card_window_with_nan_is_refused(tmp_path, field):
    """Bug: the window check dropped math.isfinite; NaN > 0 is False, so a NaN width or centre passed and
    every windowed slice became NaN."""
    model = build_model("polycl_unet", **TINY_UNET)
    card = default_card("polycl_unet", TINY_UNET, 32)
    card["window"][field] = float("nan")
    path = _raw_checkpoint(tmp_path / "nan_window.safetensors", model.state_dict(), card)
    with pytest.raises(CheckpointError, match="window"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="window"):
        save_checkpoint(tmp_path / "never.safetensors", model.state_dict(), card)
    assert not (tmp_path / "never.safetensors").exists()


def test_a_transunet_card_with_fewer_layers_than_its_weights_is_refused(tmp_path):
    """Bug: weights the card's network has no place for were ignored (no 'unexpected weights' check), so a
    card saying depth 1 over depth-2 weights loaded one Transformer block and silently dropped the other."""
    model = build_model("transunet", **TINY_TRANSUNET)
    lying = default_card("transunet", {**TINY_TRANSUNET, "depth": 1}, 64)
    path = save_model(tmp_path / "t.safetensors", model, lying)
    with pytest.raises(CheckpointError, match="depth 2 in the file, 1 here"):
        load_checkpoint(path)


# ------------------------------------------------------------------------- outputs never replace inputs
@pytest.mark.usefixtures("no_work")
def test_segment_refuses_a_reference_mask_as_its_output_even_with_overwrite(tmp_path, capsys):
    """Bug: --reference was left out of the inputs the output is checked against: `segment -o X --reference
    X --overwrite` overwrote the reference before (or instead of) comparing with it."""
    (tmp_path / "ct.nii.gz").write_bytes(b"never read")
    reference = tmp_path / "reference_liver.nii.gz"
    reference.write_bytes(b"the user's reference mask")
    err = run_error(capsys, ["segment", str(tmp_path / "ct.nii.gz"), "-o", str(reference), "--reference",
                             str(reference), "--overwrite"])
    assert "would replace the input" in err and str(reference) in err
    assert reference.read_bytes() == b"the user's reference mask"


def test_a_hard_link_of_an_input_is_the_same_file(tmp_path):
    """Bug: inputs were compared by resolved path (Path.resolve() ==), which a hard link passes: writing the
    output atomically would replace the file the input's other name points to... and the input too."""
    source = tmp_path / "ct.nii.gz"
    source.write_bytes(b"input")
    os.link(source, tmp_path / "linked.nii.gz")
    with pytest.raises(ValueError, match="would replace the input"):
        check_output_file(tmp_path / "linked.nii.gz", [source])
    check_output_file(tmp_path / "other.nii.gz", [source])  # a new name is fine


def test_a_case_insensitive_alias_of_an_input_is_the_same_file(tmp_path, monkeypatch):
    """Bug as above (names compared, not files): on a case-folding file system (macOS, Windows) CT.NII.GZ is
    ct.nii.gz.  Simulated here: os.stat folds case as such a file system does."""
    source = tmp_path / "ct.nii.gz"
    source.write_bytes(b"input")
    real_stat = os.stat

    def folding_stat(path, *args, **kwargs):
        path = Path(os.fspath(path))
        if path.parent == tmp_path and path.name.lower() == source.name:
            path = source
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", folding_stat)
    with pytest.raises(ValueError, match="would replace the input"):
        check_output_file(tmp_path / "CT.NII.GZ", [source])


# --------------------------------------------------------------------------------------- truncated files
def _small_ct() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 400, size=(20, 18, 6)).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0])


def test_a_nii_missing_its_last_100_bytes_is_refused(tmp_path):
    """Bug: the declared size left out vox_offset (the 352 header bytes), so a .nii short by less than its
    header passed and ITK zero-filled the missing voxels."""
    path = write_volume(tmp_path / "ct.nii", *_small_ct())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_volume(path)


def test_a_zero_pixdim_is_refused_not_read_as_one(tmp_path):
    """Bug: only negative pixdim was refused (< 0 instead of <= 0); ITK reads a zero pixdim as 1.0 mm, so
    volumes and distances came out wrong without a word."""
    array, _ = _small_ct()
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_zooms((0.8, 0.8, 2.5))
    path = tmp_path / "ct.nii"
    nib.Nifti1Image(array, None, header=header).to_filename(str(path))
    assert np.allclose(read_volume(path).spacing, [0.8, 0.8, 2.5])  # premise: the file reads
    data = bytearray(path.read_bytes())
    data[76 + 4 * 2: 80 + 4 * 2] = np.float32(0.0).tobytes()  # pixdim[2]: the j spacing
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="spacing"):
        read_volume(path)


def test_a_raw_nrrd_shorter_than_its_header_says_is_refused(tmp_path):
    """Bug: the raw data available was counted from the start of the file, not from the end of the header,
    so a raw NRRD short by less than its header passed check_complete: the check every volume write runs
    before its rename (ITK writes truncated files on a full disk without raising).  ITK's reader happens to
    notice this one too; the write check has only check_complete."""
    from polycl.io.integrity import IncompleteFileError, check_complete

    array, _ = _small_ct()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path), useCompression=False)
    check_complete(path)  # premise: the whole file passes
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IncompleteFileError, match="truncated"):
        check_complete(path)
    with pytest.raises(ValueError, match="truncated"):
        read_volume(path)


# ----------------------------------------------------------------------------------- sparse finetuning
def _painted_case(painted: list[int], slices: int = 12, size: int = 32):
    """CT [i, j, k] with a disc 'organ' on every slice, its label only on ``painted`` (disc radius grows with
    k, so a slice's label area names it)."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ct = np.full((size, size, slices), -50, np.int16)
    ct[:3] = -1000  # some air: a CT's intensity range
    label = np.zeros((size, size, slices), np.uint8)
    for k in range(slices):
        disc = (i - size / 2) ** 2 + (j - size / 2) ** 2 < (4 + k) ** 2
        ct[..., k][disc] = 80
        if k in painted:
            label[..., k] = disc
    matrix = np.diag([1.5, 1.5, 3.0, 1.0])
    return Volume(ct, matrix, "case"), Volume(label, matrix)


def test_epoch_0_scores_the_initial_model_on_the_held_out_slices(tmp_path, monkeypatch):
    """Bug: the initial model was scored on the training slices (evaluate_slices(model, train, ...)), so a
    finetune compared epoch 0 measured on one set with epochs measured on another."""
    import polycl.training.finetuning as finetuning
    from polycl.training.config import FinetuneConfig

    ct, label = _painted_case([1, 3, 5, 7, 9])
    init = save_model(tmp_path / "init.safetensors", build_model("polycl_unet", **TINY_UNET),
                      default_card("polycl_unet", TINY_UNET, 32))
    scored = []
    evaluate_slices = finetuning.evaluate_slices

    def spy(model, data, batch_size):
        scored.append(sorted(int(m.sum()) for m in data.masks))
        return evaluate_slices(model, data, batch_size)

    monkeypatch.setattr(finetuning, "evaluate_slices", spy)
    config = FinetuneConfig(architecture="polycl_unet", architecture_args=TINY_UNET, input_size=32, epochs=1,
                            batch_size=4, lr=1e-4, augment=False, device="cpu", slices="annotated")
    result = finetuning.finetune([(ct, label)], tmp_path / "m.safetensors", config, init=init)
    held = result.card["data"]["slices_used"][0]["validation"]
    assert held and len(scored) == 2  # epoch 0 (the initial model), then epoch 1
    assert scored[0] == sorted(int(label.array[..., k].sum()) for k in held) == scored[1]


def test_no_scan_ever_has_all_its_painted_slices_held_out():
    """Bug: the per-scan guard let the last painted slice of a scan go (> instead of >=), leaving a scan
    with nothing to train on for some seeds.  Seeded property test over many scan layouts and seeds."""
    from polycl.training.sparse import SliceSelection, held_out_painted

    rng = np.random.default_rng(26)
    for seed in range(500):  # many small scans: totals up to 24 hold out up to 4 slices
        counts = rng.integers(1, 4, size=rng.integers(1, 9))
        selections = [SliceSelection(tuple(range(n)), (True,) * n) for n in counts]
        held = held_out_painted(selections, seed)
        total = int(counts.sum())
        assert len(held) == len(set(held)) <= max(1, total // 5) if total >= 3 else not held
        for scan, n in enumerate(counts):
            kept = n - sum(1 for s, _ in held if s == scan)
            assert kept >= 1, f"seed {seed}: scan {scan} has all {n} painted slices held out ({held})"


def test_val_fraction_zero_holds_nothing_out():
    """Bug: slice_plan ignored val_fraction (always held one in five out), so `--val-fraction 0` still
    withheld a painted slice from training."""
    from polycl.training.config import FinetuneConfig
    from polycl.training.sparse_training import slice_plan

    pair = _painted_case([1, 3, 5, 7, 9])
    held_out = slice_plan([pair], FinetuneConfig(slices="annotated", val_fraction=0.2))[0]
    assert held_out["validation"]  # premise: five painted slices hold one out by default
    plan = slice_plan([pair], FinetuneConfig(slices="annotated", val_fraction=0))[0]
    assert plan["validation"] == [] and plan["painted"] == [1, 3, 5, 7, 9]


# ------------------------------------------------------------------------------------- slice suggestion
def test_suggestions_keep_their_spacing_from_painted_slices():
    """Bug: spread_ranking kept suggestions apart from each other only, not from the painted (excluded)
    slices: the slices next to a painted one, which it already teaches, were suggested first."""
    from polycl.suggest import spread_ranking

    scores = np.array([0.0, 0.9, 0.85, 0.8, 0.1, 0.1, 0.7, 0.1, 0.1, 0.6, 0.0])
    assert spread_ranking(scores, 2, excluded=[1], gap=3) == [6, 9]
    assert spread_ranking(scores, 1, excluded=[1]) == [6]  # automatic gap: 9 slices // (1 + 1 + 1) = 3


def test_a_slice_score_is_normalised_by_a_typical_liver_area_not_its_own():
    """Bug: each slice's summed uncertainty was divided by its own liver area, so a slice with a small liver
    and the same uncertain border outranked one with a large liver."""
    from polycl.suggest import slice_scores

    size = 64
    probability = np.zeros((3, size, size), np.float32)
    probability[0, 10:50, 10:50] = 1.0  # liver areas 1600, 400, 900 px
    probability[1, 20:40, 20:40] = 1.0
    probability[2, 15:45, 15:45] = 1.0
    probability[:, 60:62, 0:50] = 0.5  # the same 100 undecided pixels (variance 1 each) on every slice
    scores = slice_scores(probability)
    np.testing.assert_allclose(scores, [100 / 900] * 3, rtol=1e-6)  # median liver area: 900 px


# ---------------------------------------------------------------------------------------- field of view
def _rectangle_body(height_mm: float, width_mm: float, spacing: tuple[float, float], shape: tuple[int, int],
                    slices: int = 4) -> np.ndarray:
    """Canonical (slices, H, W) HU volume: a height x width mm rectangle of soft tissue (0 HU) in air."""
    rows = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
    cols = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]
    body = (np.abs(rows)[:, None] < height_mm / 2) & (np.abs(cols)[None, :] < width_mm / 2)
    return np.repeat(np.where(body, 0, -1000).astype(np.int16)[None], slices, 0)


def _fov_segmenter(size_mm: float = 400.0):
    from polycl.inference import Segmenter

    card = default_card("polycl_unet", TINY_UNET, 32, field_of_view_mm=size_mm)
    return Segmenter(build_model("polycl_unet", **TINY_UNET), card, "cpu")


@pytest.mark.parametrize("permutation, flips", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))])
def test_share_of_the_body_outside_the_square_on_anisotropic_pixels(permutation, flips):
    """Bug: body_outside used the row spacing for columns and vice versa.  A 300 x 500 mm (rows x columns)
    body on 0.5 x 1.0 mm pixels has 1 - 400/500 = 20 % outside a 400 mm square (33 % with swapped
    spacings), whatever the array's axis order."""
    spacing = (0.5, 1.0)
    canonical = _rectangle_body(300, 500, spacing, (640, 540))
    array, matrix = reoriented(canonical, canonical_matrix((2.5, *spacing)), permutation, flips)
    orientation = CanonicalOrientation.from_matrix(matrix)
    segmenter = _fov_segmenter()
    view, notes = segmenter.field_of_view(orientation.to_canonical(array), matrix, orientation)
    assert view.spacing == spacing
    assert view.body_outside(orientation.to_canonical(array)) == pytest.approx(0.20, abs=0.01)
    assert notes and "% of the body lies outside the model's 400 mm field of view" in notes[0]


@pytest.mark.parametrize("width_mm, warns", [(404, False), (430, True)])
def test_field_of_view_warning_threshold(width_mm, warns):
    """Bug: the warning threshold moved (BODY_OUTSIDE_WARNING 0.02 -> 0.1): a CT with 7 % of its body
    outside the square lost the only hint that nothing there is labelled.  1 % outside: no warning."""
    spacing = (0.5, 0.5)  # the share is sampled every 4th pixel: 2 mm steps here
    canonical = _rectangle_body(300, width_mm, spacing, (640, 900))
    matrix = canonical_matrix((2.5, *spacing))
    orientation = CanonicalOrientation.from_matrix(matrix)
    view, notes = _fov_segmenter().field_of_view(canonical, matrix, orientation)
    assert view.body_outside(canonical) == pytest.approx(1 - 400 / width_mm, abs=0.006)
    assert bool(notes) == warns
    if warns:
        assert f"{1 - 400 / width_mm:.0%} of the body lies outside the model's 400 mm field of view" in notes[0]


# ------------------------------------------------------------------------------------------------ DICOM SEG
@pytest.fixture(scope="module")
def dicom_series(data_dir):
    """The 20-slice CT series and a liver mask with a band on one side (a flip would show) and slices 0 and 7
    empty: emptied after the band, so they stay empty (tests/test_dicom_seg_overlay.py's fixture refills
    them)."""
    pytest.importorskip("highdicom")
    from polycl.io.dicom import choose_series
    from polycl.io.volumes import read_mask

    folder = data_dir / "dicom" / "totalseg_series"
    ct = read_volume(folder)
    mask = read_mask(data_dir / "labeled" / "totalseg_dcm_liver.nii.gz", ct).array.copy()
    mask[:40, :, :] = 1
    mask[:, :, [0, 7]] = 0
    return ct, mask, choose_series(folder).files


def _frames_by_slice(seg, ct: Volume) -> dict[int, tuple[np.ndarray, str]]:
    """Source slice k -> (frame pixels, referenced SOP Instance UID), k from each frame's plane position."""
    from polycl.io.base import LPS_TO_RAS

    ijk_from_lps = np.linalg.inv(LPS_TO_RAS @ ct.ijk_to_ras)
    out = {}
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = np.append(np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float), 1.0)
        k = int(round((ijk_from_lps @ position)[2]))
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out[k] = (seg.pixel_array[number], uid)
    return out


def test_dicom_seg_of_a_series_in_shuffled_file_order_is_the_same_seg(dicom_series):
    """Bug: the series' datasets put in volume order with the inverse permutation ([datasets[n] for n in
    order] instead of datasets[order.index(n)]): invisible while the files arrive sorted, as every test
    gave them; shuffled, frames referenced the wrong source images."""
    from polycl.io.dicom_seg import build_dicom_seg

    ct, mask, files = dicom_series
    order = np.random.default_rng(7).permutation(len(files))
    assert not np.array_equal(order[order], np.arange(len(files)))  # not its own inverse
    straight = build_dicom_seg(mask, ct.ijk_to_ras, files, "PolyCLSlicer", "v1")
    shuffled = build_dicom_seg(mask, ct.ijk_to_ras, [files[i] for i in order], "PolyCLSlicer", "v1")
    a, b = _frames_by_slice(straight, ct), _frames_by_slice(shuffled, ct)
    assert sorted(a) == sorted(b) == list(range(len(files)))
    for k in a:
        assert np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1], f"slice {k} differs"
        assert np.array_equal(b[k][0], mask[:, :, k].T)


def test_dicom_seg_empty_slices_give_empty_frames_of_their_own(dicom_series):
    """Bug: empty frames omitted (omit_empty_frames=True) or filled from a neighbour; the module's contract is
    one frame per source slice, an empty slice's frame holding no liver.  The fixture of
    tests/test_dicom_seg_overlay.py meant to test this refilled every slice (mask[:40] = 1 after emptying)."""
    from polycl.io.dicom_seg import build_dicom_seg

    ct, mask, files = dicom_series
    assert not mask[:, :, [0, 7]].any() and mask[:, :, 1].any() and mask[:, :, 6].any()  # premise
    seg = build_dicom_seg(mask, ct.ijk_to_ras, files, "PolyCLSlicer", "v1")
    frames = _frames_by_slice(seg, ct)
    assert int(seg.NumberOfFrames) == len(files) and sorted(frames) == list(range(len(files)))
    assert not frames[0][0].any() and not frames[7][0].any()
    assert all(np.array_equal(frames[k][0], mask[:, :, k].T) for k in frames)


# -------------------------------------------------------------------------------------------- .seg.nrrd
def test_seg_nrrd_header_extent_and_colour_range(tmp_path):
    """Bugs: the segment extent written as 0..n (one voxel past the grid) and the colour in 0-255; Slicer
    reads the extent as the segment's bounds and the colour as 0-1 floats."""
    from polycl.io.seg_nrrd import LIVER_COLOR, write_segmentation

    mask = np.zeros((5, 7, 3), np.uint8)
    mask[1:3, 2:5, 1] = 1
    path = write_segmentation(tmp_path / "liver.seg.nrrd", mask, np.diag([0.8, 0.7, 2.5, 1.0]))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert reader.GetMetaData("Segment0_Extent").split() == ["0", "4", "0", "6", "0", "2"]
    colour = [float(v) for v in reader.GetMetaData("Segment0_Color").split()]
    assert all(0.0 <= c <= 1.0 for c in colour)
    np.testing.assert_allclose(colour, LIVER_COLOR, atol=1e-5)


# ------------------------------------------------------------------------------------------------ metrics
def test_hausdorff_is_measured_to_the_other_masks_surface():
    """Bug: distances were taken to the other mask (distance transform of ~mask), not to its surface: a
    prediction with a 10-voxel hole inside a solid reference scored HD 0 instead of 9 mm."""
    reference = np.ones((30, 30, 30), np.uint8)
    prediction = reference.copy()
    prediction[10:20, 10:20, 10:20] = 0
    result = hausdorff(prediction, reference, np.eye(4))
    assert result["hd_mm"] == pytest.approx(9.0) and result["hd95_mm"] == pytest.approx(9.0)


def _permuted_matrix(rotation: bool) -> np.ndarray:
    """Array axis 0 runs superior (2.5 mm), axis 1 right-left (0.7 mm), axis 2 anterior-posterior (0.8 mm);
    optionally rotated obliquely.  No diagonal element is the spacing of its axis."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[0, -0.7, 0], [0, 0, -0.8], [2.5, 0, 0]], float)
    if rotation:
        matrix[:3, :3] = oblique_matrix((1, 1, 1), (0.2, -0.15, 0.1))[:3, :3] @ matrix[:3, :3]
    return matrix


@pytest.mark.parametrize("rotation", [False, True])
def test_hausdorff_and_slice_dice_on_permuted_and_oblique_matrices(rotation):
    """Bugs: spacing read off the matrix diagonal (np.diag) instead of its column norms, and 2D slice Dice
    along array axis 2 instead of the axial axis the direction matrix names (here array axis 0)."""
    matrix = _permuted_matrix(rotation)
    a = np.zeros((12, 20, 20), np.uint8)
    a[2:8, 5:15, 5:15] = 1
    b = np.zeros_like(a)
    b[5:11, 5:15, 5:15] = 1  # shifted 3 voxels along axis 0 (the slice axis): 7.5 mm
    assert hausdorff(a, b, matrix)["hd_mm"] == pytest.approx(7.5)
    c = np.zeros_like(a)
    c[2:8, 5:15, 8:18] = 1  # shifted 3 voxels along axis 2 (anterior-posterior, 0.8 mm): 2.4 mm
    assert hausdorff(a, c, matrix)["hd_mm"] == pytest.approx(2.4)
    metrics = evaluate(a, b, matrix)
    axial = per_slice_dice(a, b, axis=0)
    assert metrics["mean_slice_dice_2d"] == pytest.approx(float(axial.mean()))
    assert not np.isclose(axial.mean(), per_slice_dice(a, b, axis=2).mean())  # premise: the axis matters


# ----------------------------------------------------------------------------------------------- TransUNet
def test_transunet_position_table_keeps_its_orientation_and_bicubic_mode():
    """Bugs: the learnt table reshaped with rows and columns swapped (invisible on a square target grid) and
    another interpolation mode than the documented bicubic.  Checked on an asymmetric 3 x 6 token grid."""
    torch.manual_seed(0)
    encoder = build_model("transunet", **TINY_TRANSUNET).encoder  # learnt for 64 px: a 4 x 4 grid
    grid = encoder.config.grid
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    table = torch.randn(grid, grid, encoder.config.hidden)
    table[..., 0], table[..., 1] = rows, cols  # channel 0 holds the row, channel 1 the column
    with torch.no_grad():
        encoder.pos_embed.copy_(table.reshape(1, grid * grid, -1))
        resized = encoder.position_embedding(3, 6)
    assert resized.shape == (1, 18, encoder.config.hidden)
    tokens = resized.reshape(3, 6, -1)  # row-major tokens, as the encoder flattens its (3, 6) map
    assert torch.all(tokens[1:, :, 0] > tokens[:-1, :, 0]) and torch.allclose(tokens[:, :1, 0], tokens[:, :, 0])
    assert torch.all(tokens[:, 1:, 1] > tokens[:, :-1, 1]) and torch.allclose(tokens[:1, :, 1], tokens[:, :, 1])
    expected = F.interpolate(table.permute(2, 0, 1)[None], size=(3, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(tokens, expected[0].permute(1, 2, 0))

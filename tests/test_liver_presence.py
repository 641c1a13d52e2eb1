"""No liver in view (issue 20): the presence rules on phantoms in any orientation, the confidence code, and real
liver-free CT through the engine, the CLI (text and --json), the worker's pipeline and the panel's report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import oblique_matrix
from polycl.geometry import CanonicalOrientation
from polycl.inference import encode_probability, mean_probability
from polycl.presence import IMPLAUSIBLE, MIN_LIVER_ML, NONE, assess_liver, lateral_position


def phantom(liver_side: float = 1.0, liver_mm: tuple[float, float, float] = (60.0, 50.0, 60.0),
            slices: int = 40, spacing: float = 3.0, liver_z: tuple[int, int] = (0, 40)):
    """Canonical (z, y, x) CT: a 300 mm wide body ellipse at 40 HU in air, a liver-shaped box whose centre lies
    ``liver_side`` x 75 mm to the patient's right (canonical x index grows towards the patient's left), on axial
    slices ``liver_z`` (by default all: a liver the scan cuts at both ends)."""
    size = 128
    ct = np.full((slices, size, size), -1000, np.int16)
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    body = ((xx - centre) * spacing / 150) ** 2 + ((yy - centre) * spacing / 110) ** 2 <= 1
    ct[:, body] = 40
    mask = np.zeros_like(ct, np.uint8)
    cx = centre - liver_side * 75 / spacing
    half = [m / spacing / 2 for m in liver_mm]
    mask[liver_z[0]:liver_z[1], int(centre - half[1]):int(centre + half[1]),
         int(cx - half[0]):int(cx + half[0])] = 1
    matrix = np.diag([-spacing, -spacing, spacing, 1.0])[:, [2, 1, 0, 3]]  # canonical -> RAS (z, y, x) axes
    return ct, mask, matrix


def canonical_to(ct, mask, matrix, permutation, flips):
    """The same phantom as an [i, j, k] array in another axis order / direction, with its matching matrix."""
    matrix = np.asarray(matrix, float).copy()
    for axis in flips:
        ct, mask = np.flip(ct, axis), np.flip(mask, axis)
        column = matrix[:3, axis].copy()
        matrix[:3, 3] += column * (ct.shape[axis] - 1)
        matrix[:3, axis] = -column
    order = list(permutation)
    return (np.ascontiguousarray(np.transpose(ct, order)), np.ascontiguousarray(np.transpose(mask, order)),
            np.column_stack([matrix[:, order], matrix[:, 3]]))


def test_phantom_geometry_is_what_it_claims():
    ct, mask, matrix = phantom()
    centre = matrix[:3, :3] @ np.argwhere(mask).mean(0) + matrix[:3, 3]
    body = matrix[:3, :3] @ np.argwhere(ct > -300).mean(0) + matrix[:3, 3]
    assert centre[0] - body[0] == pytest.approx(75, abs=3)  # RAS x grows towards the patient's right
    assert CanonicalOrientation.from_matrix(matrix).slice_axis == 0


@pytest.mark.parametrize("permutation, flips", [((0, 1, 2), ()), ((2, 1, 0), (0,)), ((1, 2, 0), (1, 2)),
                                                ((2, 0, 1), (0, 1, 2))])
def test_rules_hold_in_every_axis_order_and_direction(permutation, flips):
    for side, expected in ((1.0, "found"), (-1.0, NONE)):
        ct, mask, matrix = canonical_to(*phantom(liver_side=side), permutation, flips)
        check = assess_liver(mask, 0.97, ct, matrix)
        assert check.status == expected, (side, check)
        assert check.lateral == pytest.approx(side * 0.5, abs=0.08)


def test_lateral_position_on_an_oblique_anisotropic_grid():
    ct, mask, matrix = phantom()
    tilted = oblique_matrix(spacing=(3.0, 3.0, 3.0), angles=(0.0, 0.0, 0.2))
    # same voxels, rotated 0.2 rad about the z axis: the body's centre line turns with them
    assert lateral_position(mask, ct, tilted @ np.linalg.inv(np.diag([3.0, 3.0, 3.0, 1.0])) @ matrix) == \
        pytest.approx(lateral_position(mask, ct, matrix), abs=0.1)


def test_a_field_of_view_that_cuts_the_body_has_no_midline_to_judge_by():
    """A small field of view centred off the midline: the body's centre in view is not the patient's midline."""
    ct, mask, matrix = phantom(liver_side=0.4)
    shift = np.eye(4)
    shift[1, 3], shift[2, 3] = 30, 40
    cut_ct, cut_mask = ct[:, 30:98, 40:90], mask[:, 30:98, 40:90]  # 150 x 204 mm: body on most of each side
    check = assess_liver(cut_mask, 0.97, cut_ct, matrix @ shift)
    assert check.lateral is None and check.status == "found", check
    assert assess_liver(mask, 0.97, ct, matrix).lateral == pytest.approx(0.2, abs=0.08)  # whole body: judged


def test_a_few_millilitres_are_no_liver_whatever_the_confidence():
    ct, mask, matrix = phantom(liver_mm=(9, 9, 30))  # 2.4 mL
    check = assess_liver(mask, 0.99, ct, matrix)
    assert check.status == NONE and check.volume_ml < MIN_LIVER_ML
    assert check.message.startswith("no liver found: only")


def test_a_small_region_needs_confidence_and_a_liver_like_place():
    ct, mask, matrix = phantom(liver_mm=(30, 30, 120))  # 108 mL cut by both scan ends
    assert assess_liver(mask, 0.95, ct, matrix).status != NONE
    assert assess_liver(mask, 0.85, ct, matrix).status == NONE  # unsure
    ct, mask, matrix = phantom(liver_side=1.8, liver_mm=(30, 30, 120))  # at the body's right wall
    check = assess_liver(mask, 0.95, ct, matrix)
    assert check.status == NONE and "edge" in check.reason and check.lateral > 0.75


def test_whole_extent_in_view_needs_a_whole_liver_volume():
    ct, mask, matrix = phantom(liver_mm=(60, 50, 60), liver_z=(8, 32))  # 207 mL, ends inside the scan
    check = assess_liver(mask, 0.97, ct, matrix)
    assert check.whole_extent and check.status == IMPLAUSIBLE and "both ends" in check.message
    ct, mask, matrix = phantom(liver_mm=(30, 30, 60), liver_z=(8, 32))  # 54 mL, confident, in place: no liver
    check = assess_liver(mask, 0.97, ct, matrix)
    assert check.whole_extent and check.status == NONE and "far less than a whole liver" in check.reason
    ct, mask, matrix = phantom(liver_mm=(60, 50, 60), liver_z=(0, 40))  # the scan cuts it: a partial liver
    assert assess_liver(mask, 0.97, ct, matrix).status == "found"
    ct, mask, matrix = phantom(liver_mm=(160, 150, 120), liver_z=(0, 40))  # 2.9 L in 120 mm: fine
    assert assess_liver(mask, 0.97, ct, matrix).status == "found"


def test_confidence_code_is_the_mask_exactly_and_the_mean_within_a_step():
    generator = torch.Generator().manual_seed(0)
    probability = torch.rand(4, 64, 64, generator=generator)
    probability[0, 0, :5] = torch.tensor([0.5, 0.49999, 0.50001, 0.0, 1.0])
    for threshold in (0.5, 0.3):
        codes = encode_probability(probability, threshold).numpy()
        assert codes.dtype == np.uint8
        np.testing.assert_array_equal(codes >= 128, (probability > threshold).numpy())
        mask = (probability > threshold).numpy()
        assert mean_probability(codes, mask, threshold) == pytest.approx(float(probability.numpy()[mask].mean()),
                                                                     abs=(1 - threshold) / 128)
    assert mean_probability(codes, np.zeros_like(mask), 0.3) == 0.0


# ------------------------------------------------------------------------------------------ real CT
def canonical_crop(volume, first: int, last: int):
    """Canonical axial slices first..last (0 = most inferior) of a volume, with a correct matrix."""
    from polycl.io import Volume

    orientation = CanonicalOrientation.from_matrix(volume.ijk_to_ras)
    matrix = orientation.canonical_matrix(volume.ijk_to_ras, volume.array.shape)
    pick = np.eye(4)
    pick[0, 3] = first
    array = orientation.to_canonical(volume.array)[first:last + 1]
    return Volume(np.ascontiguousarray(array), matrix @ pick, volume.source)


@pytest.fixture(scope="module")
def pelvis(data_dir, tmp_path_factory):
    """The lowest 30 slices of TotalSegmentator's thorax-abdomen-pelvis CT: pelvis, no liver."""
    from polycl.io import read_volume, write_volume

    crop = canonical_crop(read_volume(data_dir / "unlabeled" / "totalseg_full_ct.nii.gz"), 0, 29)
    path = tmp_path_factory.mktemp("pelvis") / "pelvis.nii.gz"
    write_volume(path, crop.array, crop.ijk_to_ras)
    return path, crop


@pytest.fixture(scope="module")
def segmenter():
    from polycl.inference import Segmenter

    return Segmenter.from_checkpoint(None, device="cpu")


def test_liver_free_crops_of_real_ct_give_an_empty_mask(data_dir, segmenter, pelvis):
    from polycl.io import read_volume

    lung2 = read_volume(data_dir / "unlabeled" / "pyradiomics_lung2_ct.nrrd")
    aorta = read_volume(data_dir / "unlabeled" / "totalseg_aorta_cta_ct.nii.gz")
    for name, crop in (("pelvis", pelvis[1]), ("chest", canonical_crop(lung2, 24, 60)),
                       ("upper chest", canonical_crop(aorta, 130, 190))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = segmenter.segment(crop.array, crop.ijk_to_ras)
        assert result.liver.status == NONE and not result.mask.any(), (name, result.liver)
        assert any(note.startswith("no liver found") for note in result.warnings)
        assert any(str(w.message).startswith("no liver found") for w in caught)


def test_livers_in_view_are_found(labeled_case, segmenter):
    for case in ("totalseg_sm", "dcmqi_3slice"):
        ct, reference = labeled_case(case)
        result = segmenter.segment(ct.array, ct.ijk_to_ras)
        assert result.liver.found and result.mask.any(), (case, result.liver)


def test_cli_says_no_liver_found_in_text_and_json(pelvis, tmp_path, capsys):
    from polycl.cli import main
    from polycl.io import read_mask

    path, _ = pelvis
    assert main(["segment", str(path), "-o", str(tmp_path / "a.nii.gz"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "no liver found" in out.out and "empty mask" in out.out
    assert not read_mask(tmp_path / "a.nii.gz").array.any()
    assert main(["segment", str(path), "-o", str(tmp_path / "b.nii.gz"), "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["liver_found"] is False and summary["liver"]["status"] == NONE and summary["liver_ml"] == 0
    assert any(note.startswith("no liver found") for note in summary["warnings"])


def test_every_engine_warning_reaches_cli_json_and_the_worker_result(labeled_case, tmp_path, capsys):
    """The field-of-view note (the 500 mm body of totalseg_dcm is wider than the 400 mm square) is in the engine's
    warnings, `segment` text (once) and --json, and the worker pipeline's result."""
    from polycl import pipeline
    from polycl.cli import main
    from polycl.io import write_volume

    ct = canonical_crop(labeled_case("totalseg_dcm")[0], 8, 11)  # 4 slices: the same body width, less work
    write_volume(tmp_path / "wide.nii.gz", ct.array, ct.ijk_to_ras)
    out = pipeline.segment(pipeline.ModelCache(), ct.array, ct.ijk_to_ras, device="cpu")
    assert any("field of view" in note for note in out.warnings) and out.liver["status"] == "found"
    assert main(["segment", str(tmp_path / "wide.nii.gz"), "-o", str(tmp_path / "m.nii.gz"), "--device", "cpu"]) == 0
    assert sum("field of view" in line for line in capsys.readouterr().err.splitlines()) == 1
    assert main(["segment", str(tmp_path / "wide.nii.gz"), "-o", str(tmp_path / "n.nii.gz"), "--device", "cpu",
                 "--json"]) == 0
    assert any("field of view" in note for note in json.loads(capsys.readouterr().out)["warnings"])


def test_panel_report_says_no_liver_found():
    pytest.importorskip("slicer")
    from PolyCLSlicerLib.report import SegmentReport

    report = SegmentReport(None, "s", "Liver", 0, 0.0, 1.2, [], ["no liver found: only 1.0 mL were labelled"],
                           liver={"status": NONE, "reason": "only 1.0 mL were labelled"})
    assert not report.liverFound and report.summary().startswith("No liver found: only 1.0 mL")
    assert "Warning: no liver found" not in report.summary()  # said once
    found = SegmentReport(None, "s", "Liver", 10, 1500.0, 1.2, [3, 4], [], liver={"status": "found"})
    assert found.liverFound and found.summary().startswith("'Liver': 1500.0 ml")

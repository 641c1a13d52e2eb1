"""The bundled starter model on a CT it was never trained on (unlabeled/ircad01, issues 9 and 20).

ircad01 (3D-IRCADb-01, CC BY-NC-ND) is kept out of the starter's training data; its expert liver mask
(``validation/ircad01_liver.nii.gz``, evaluation only) gives a Dice / HD95 floor.  The anatomy checks hold
without it: the whole liver (it is fully in view) at a plausible volume, on the patient's right, inside the
liver's axial extent (no kidney below the tip, no heart above the dome; ``bench/presence_flags.json``) and
covering that extent from tip to dome.  A left-right mirror, a wrong intensity window or a lost tip breaks them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from polycl.geometry import CanonicalOrientation, voxel_spacing
from polycl.inference import Segmenter
from polycl.io.volumes import read_volume

FLAGS = json.loads((Path(__file__).resolve().parents[1] / "bench" / "presence_flags.json").read_text())["ircad01"]
# version 6 labels 1.51 L on ircad01, its expert mask 1.49 L (version 5: 1.49 L, version 3: 1.27 L; version 1's
# 1.61 L held kidney and heart); the range is the reference +-20 %
LITRES = (1.2, 1.8)
# version 6 scored 0.940 / 15.1 mm once against the expert mask, at 1 and 2 threads (version 5: 0.936 / 14.2 mm,
# version 4: 0.936 / 12.9 mm, version 3: 0.896 / 17.7 mm): a mirror (Dice 0), a W2000 window (0.688 / 68 mm) or
# ten lost end slices (0.928) fall below these; 0.9 mm of HD95 headroom for the fp32 path of CPUs without bf16
MIN_DICE, MAX_HD95_MM = 0.93, 16.0
MIN_RIGHTWARD_MM = 40.0  # liver centroid lies this far to the patient's right of the body's centre


@pytest.fixture(scope="module")
def ircad01(data_dir):
    path = data_dir / "unlabeled" / "ircad01_ct.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found (unseen-CT regression test)")
    return read_volume(path)


@pytest.fixture(scope="module")
def starter_mask(ircad01) -> np.ndarray:
    """The bundled starter's mask of ircad01 (segmented once for every test here)."""
    return Segmenter.from_checkpoint(None, device="cpu").segment(ircad01.array, ircad01.ijk_to_ras).mask > 0


def liver_anatomy(array: np.ndarray, ijk_to_ras: np.ndarray, mask: np.ndarray) -> dict:
    """Volume, left-right position and per-slice presence of a liver mask, in world terms."""
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    per_slice = orientation.to_canonical(mask).reshape(mask.shape[orientation.slice_axis], -1).sum(1)
    body = array > -300

    def centroid_x(where: np.ndarray) -> float:  # RAS x grows towards the patient's right
        ijk = np.argwhere(where).mean(0)
        return float((ijk_to_ras @ np.append(ijk, 1.0))[0])

    return {"litres": float(mask.sum() * np.prod(voxel_spacing(ijk_to_ras)) / 1e6),
            "rightward_mm": centroid_x(mask) - centroid_x(body) if mask.any() else 0.0,
            "per_slice": per_slice}


def assert_plausible_liver(anatomy: dict) -> None:
    assert LITRES[0] <= anatomy["litres"] <= LITRES[1], f"liver volume {anatomy['litres']:.2f} L"
    assert anatomy["rightward_mm"] >= MIN_RIGHTWARD_MM, f"liver centroid {anatomy['rightward_mm']:.0f} mm right"
    per_slice = anatomy["per_slice"]
    for first, last in FLAGS["absent"]:
        assert per_slice[first:last + 1].sum() == 0, f"mask below the liver tip: {per_slice[first:last + 1]}"
    for first, last in FLAGS["present"]:
        assert np.count_nonzero(per_slice[first:last + 1]) == last - first + 1, "liver slices without mask"


def test_starter_against_the_expert_mask_of_an_unseen_ct(ircad01, starter_mask, data_dir):
    from polycl.io.volumes import read_mask
    from polycl.metrics import evaluate

    path = data_dir / "validation" / "ircad01_liver.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found (expert mask of the unseen CT)")
    reference = read_mask(path, ircad01).array
    metrics = evaluate(starter_mask, reference, ircad01.ijk_to_ras)
    assert metrics["dice"] >= MIN_DICE and metrics["hd95_mm"] <= MAX_HD95_MM, metrics


def test_starter_finds_the_whole_liver_and_nothing_else_on_an_unseen_ct(ircad01, starter_mask):
    anatomy = liver_anatomy(ircad01.array, ircad01.ijk_to_ras, starter_mask)
    assert_plausible_liver(anatomy)


def test_starter_gives_the_same_liver_when_the_scan_has_a_500_mm_field_of_view(ircad01, starter_mask):
    """The same unseen CT padded with air from its 292 mm to a 500 mm reconstruction field of view (a
    whole-body or large-patient scan): the starter's 400 mm field of view keeps the liver's size in network
    pixels, so the mask stays put (version 2 resized whole slices: 1.21 -> 1.41 L, 6 liver slices lost)."""
    segmenter = Segmenter.from_checkpoint(None, device="cpu")
    assert CanonicalOrientation.from_matrix(ircad01.ijk_to_ras).slice_axis == 2
    pad = (877 - 512) // 2  # 877 px x 0.57 mm = 500 mm
    padded = np.pad(ircad01.array, ((pad, pad), (pad, pad), (0, 0)), constant_values=-1000)
    matrix = ircad01.ijk_to_ras.copy()
    matrix[:3, 3] -= matrix[:3, :3] @ np.array([pad, pad, 0])
    padded_mask = segmenter.segment(padded, matrix).mask > 0
    assert_plausible_liver(liver_anatomy(padded, matrix, padded_mask))
    small, large = starter_mask, padded_mask[pad:pad + 512, pad:pad + 512]
    assert 2 * (small & large).sum() / (small.sum() + large.sum()) > 0.98

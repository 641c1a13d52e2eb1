"""``polycl suggest`` (issue 10): the slices to paint next are where the starter model is actually wrong.

A real labelled CT gets two slices corrupted with strong noise; the test first checks the premise (the
starter's Dice on those slices drops), then that suggest ranks exactly those first, never returns an
annotated slice, and numbers slices along the input array (a flipped copy gives mirrored indices).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from polycl.cli.main import main as polycl
from polycl.inference import Segmenter
from polycl.io.volumes import write_mask, write_volume
from polycl.metrics import per_slice_dice
from polycl.suggest import spread_ranking, suggest_slices

K0, K1 = 6, 22  # totalseg_sm slices kept (16, all with liver): small enough for CPU tests
CORRUPTED = (3, 12)  # array slices (of the crop) with noise added


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_torch_thread):
    """One torch thread."""


@pytest.fixture(scope="module")
def corrupted_case(labeled_case):
    ct, liver = labeled_case("totalseg_sm")
    array = ct.array[:, :, K0:K1].astype(np.float32)
    matrix = np.array(ct.ijk_to_ras, float)
    matrix[:3, 3] = matrix[:3, :3] @ np.array([0, 0, K0]) + matrix[:3, 3]
    rng = np.random.default_rng(0)
    for k in CORRUPTED:
        array[:, :, k] += rng.normal(0, 150, array[:, :, k].shape)
    return array, np.ascontiguousarray(liver.array[:, :, K0:K1]), matrix


@pytest.fixture(scope="module")
def starter():
    return Segmenter.from_checkpoint(None, "cpu")


def flipped_k(array: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same patient, k stored superior -> inferior."""
    out = np.array(matrix, float)
    out[:3, 3] = matrix[:3, :3] @ np.array([0, 0, array.shape[2] - 1]) + matrix[:3, 3]
    out[:3, 2] = -matrix[:3, 2]
    return np.ascontiguousarray(array[:, :, ::-1]), out


def test_suggest_ranks_the_slices_where_the_starter_is_wrong(corrupted_case, starter):
    array, reference, matrix = corrupted_case
    slice_dice = per_slice_dice(starter.segment(array, matrix).mask, reference, axis=2)
    clean = np.delete(slice_dice, CORRUPTED)
    assert slice_dice[list(CORRUPTED)].max() < np.median(clean) - 0.05  # premise: the starter fails there
    found = suggest_slices(starter, array, matrix, count=3)
    assert set(found.slices[:2]) == set(CORRUPTED)
    assert found.scores == sorted(found.scores, reverse=True) and all(0 <= k < array.shape[2] for k in found.slices)

    painted = np.zeros_like(reference)
    painted[:, :, CORRUPTED[0]] = reference[:, :, CORRUPTED[0]]
    avoided = suggest_slices(starter, array, matrix, count=4, annotated=[CORRUPTED[0]])
    assert CORRUPTED[0] not in avoided.slices and avoided.slices[0] == CORRUPTED[1]

    mirrored, mirrored_matrix = flipped_k(array, matrix)
    again = suggest_slices(starter, mirrored, mirrored_matrix, count=3)
    last = array.shape[2] - 1
    assert again.slices == [last - k for k in found.slices]
    np.testing.assert_allclose(again.scores, found.scores, rtol=1e-4)


def test_cli_suggest_json_excludes_annotated_slices(corrupted_case, tmp_path, capsys):
    array, reference, matrix = corrupted_case
    write_volume(tmp_path / "ct.nii.gz", array.astype(np.int16), matrix)
    painted = np.zeros_like(reference)
    painted[:, :, CORRUPTED[1]] = reference[:, :, CORRUPTED[1]]
    write_mask(tmp_path / "painted.nii.gz", painted, matrix)
    assert polycl(["suggest", str(tmp_path / "ct.nii.gz"), "--count", "2", "--json", "--device", "cpu",
                   "--annotated", str(tmp_path / "painted.nii.gz")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"slices", "scores"} and len(result["slices"]) == len(result["scores"]) == 2
    assert all(isinstance(k, int) and 0 <= k < array.shape[2] for k in result["slices"])
    assert CORRUPTED[1] not in result["slices"] and result["slices"][0] == CORRUPTED[0]
    assert result["scores"] == sorted(result["scores"], reverse=True)
    assert polycl(["suggest", str(tmp_path / "ct.nii.gz"), "--count", "0"]) == 2
    assert "--count 0 must be at least 1" in capsys.readouterr().err


def test_spread_ranking_spacing_exclusion_and_order():
    scores = np.array([0.0, 0.9, 0.8, 0.7, 0.1, 0.6, 0.5, 0.0])
    assert spread_ranking(scores, 2, gap=2) == [1, 3]  # 2 is too close to 1
    assert spread_ranking(scores, 3, excluded=[1], gap=2) == [2, 3, 5]  # 2 only once the spacing is relaxed
    ranked = spread_ranking(scores, 6, excluded=[1], gap=3)  # too few far apart: spacing relaxes, still ranked
    assert 1 not in ranked and 0 not in ranked and 7 not in ranked and len(ranked) == 5
    assert [scores[k] for k in ranked] == sorted((scores[k] for k in ranked), reverse=True)


def test_suggestions_stay_inside_the_liver_and_off_the_volume_ends():
    """Issue 22: on a 20-slice CT the ranking gave slices 0, 1, 2 (the volume's end, a sliver of liver)."""
    from polycl.geometry import CanonicalOrientation
    from polycl.suggest import inner_liver_scores, spread_ranking

    orientation = CanonicalOrientation.from_matrix(np.diag([1.0, 1.0, 2.0, 1.0]))  # k = axial, inferior first
    scores = np.zeros(20)
    scores[0:18] = np.linspace(1.0, 0.1, 18)  # the model is least sure at the inferior end of the volume
    inner = inner_liver_scores(scores, orientation, (8, 8, 20))
    assert inner[0] == 0 and inner[1] == 0 and inner[17] == 0 and inner[5] == scores[5]  # ends and the outer 10 %
    chosen = spread_ranking(inner, 3, excluded=[3, 10, 16])
    assert chosen and min(chosen) >= 2 and all(abs(a - b) >= 2 for a in chosen for b in [*chosen, 3, 10, 16]
                                                if a != b)
    flipped = inner_liver_scores(scores[::-1], CanonicalOrientation.from_matrix(np.diag([1.0, 1.0, -2.0, 1.0])),
                                 (8, 8, 20))
    np.testing.assert_array_equal(flipped, inner[::-1])  # by anatomy, not by array order

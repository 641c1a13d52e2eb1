"""SAM box-refinement benchmark: LiteMedSAM seconds per slice (naive vs optimised), Dice before/after.

Run:  .venv/bin/python bench/refine.py [--data DIR] [--slices 4] [--coarse block polycl] [--threads N]

In one run on this machine:
  1. per liver slice, on ``--slices`` mid-liver slices of totalseg_dcm (512x512): the encoder and the
     decoder of the naive path (fp32 eager, BatchNorm unfolded, one decoder call per box, no cache)
     and of the shipped path (BatchNorm folded, channels-last, bf16 autocast where the CPU runs bf16
     natively, boxes of a slice decoded in one call); the two are interleaved slice by slice so
     that other load on the machine hits both alike;
  2. end-to-end ``refine_volume`` on every labelled case with the shipped path: seconds per slice,
     3D Dice of the coarse mask and of the refined mask, boxes that fell back to the coarse mask,
     then the same call again (embedding cache hit) and peak RSS.
Coarse masks: ``block`` = the reference block-downsampled to ``--block-mm`` in-plane and upsampled
(the issue's deliberately coarsened mask); ``polycl`` = the bundled starter PolyCL model's output
(note: the starter was trained on these three cases, so its Dice is optimistic).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CASES, data_root, machine, peak_rss_mb  # noqa: E402  (also puts polycl on sys.path)

from polycl import sam_refine as sr  # noqa: E402
from polycl.io import read_mask, read_volume, voxel_spacing  # noqa: E402
from polycl.metrics import dice  # noqa: E402
from polycl.preprocessing import CanonicalOrientation  # noqa: E402


def block_coarsen(mask: np.ndarray, ijk_to_ras: np.ndarray, block_mm: float) -> np.ndarray:
    """Majority-vote block downsampling in the axial plane, upsampled by repetition."""
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    canonical = orientation.to_canonical(mask > 0)
    spacing = voxel_spacing(orientation.canonical_matrix(ijk_to_ras, mask.shape))
    factor = max(1, int(round(block_mm / float(np.mean(spacing[1:])))))
    _, h, w = canonical.shape
    padded = np.pad(canonical, [(0, 0), (0, (-h) % factor), (0, (-w) % factor)])
    blocks = padded.reshape(len(padded), padded.shape[1] // factor, factor, padded.shape[2] // factor, factor)
    coarse = (blocks.mean((2, 4)) >= 0.5).repeat(factor, 1).repeat(factor, 2)[:, :h, :w]
    return np.ascontiguousarray(orientation.from_canonical(coarse.astype(np.uint8)))


def micro(ct, reference, ijk_to_ras, count: int) -> None:
    """Naive vs optimised encoder / decoder per slice, interleaved."""
    naive = sr.build_refiner("litemedsam", device="cpu", optimize=False)
    fast = sr.build_refiner("litemedsam", device="cpu", optimize=True)
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    canon_ct, canon_ref = orientation.to_canonical(ct), orientation.to_canonical(reference > 0)
    liver = np.flatnonzero(canon_ref.reshape(len(canon_ref), -1).any(1))
    picked = liver[len(liver) // 2 - count // 2:][:count]
    warm = sr.slice_to_rgb(canon_ct[picked[0]])
    for refiner in (naive, fast):  # first-call overheads out of the way
        refiner.embed([warm], use_cache=False)
    rows = {"naive": [], "optimised": []}
    agreement = []
    for z in picked:
        image = sr.slice_to_rgb(canon_ct[z])
        boxes, _ = sr.component_boxes(canon_ref[z], margin=2)
        masks = {}
        for label, refiner in (("naive", naive), ("optimised", fast)):
            start = time.perf_counter()
            embedding = refiner.embed([image], use_cache=False)[0]
            encoder = time.perf_counter() - start
            start = time.perf_counter()
            if label == "naive":
                parts = [refiner.decode(embedding, box[None])[0] for box in boxes]
                masks[label] = np.concatenate(parts).any(0)
            else:
                masks[label] = refiner.decode(embedding, boxes)[0].any(0)
            decoder = time.perf_counter() - start
            rows[label].append((encoder, decoder, len(boxes)))
        agreement.append(dice(masks["naive"], masks["optimised"]))
    print(f"\n1. per liver slice, totalseg_dcm 512x512, {len(picked)} slices, "
          f"{sum(r[2] for r in rows['naive'])} boxes (interleaved naive / optimised)")
    print(f"   {'path':<10} {'encoder s':>10} {'decoder s/box':>14} {'slice s':>8}")
    totals = {}
    for label, values in rows.items():
        enc = np.mean([v[0] for v in values])
        dec = np.sum([v[1] for v in values]) / max(1, sum(v[2] for v in values))
        per_slice = np.mean([v[0] + v[1] for v in values])
        totals[label] = per_slice
        print(f"   {label:<10} {enc:>10.3f} {dec:>14.3f} {per_slice:>8.3f}")
    print(f"   speed-up {totals['naive'] / totals['optimised']:.2f}x; mask agreement naive vs optimised: "
          f"mean 2D Dice {np.mean(agreement):.4f} (min {np.min(agreement):.4f})")


def end_to_end(root: Path, coarse_kinds: list[str], block_mm: float) -> None:
    refiner = sr.build_refiner("litemedsam", device="cpu")
    segmenter = None
    print(f"\n2. end-to-end refine_volume (LiteMedSAM, optimised, precision {refiner.precision})")
    print(f"   {'case':<13} {'coarse':<7} {'slices':>6} {'s/slice':>8} {'again s':>8} {'Dice coarse':>11} "
          f"{'Dice refined':>12} {'fallbacks':>9} {'worst slice (Dice)':>19}")
    for case in CASES:
        ct = read_volume(root / "labeled" / f"{case}_ct.nii.gz")
        reference = read_mask(root / "labeled" / f"{case}_liver.nii.gz", ct).array
        for kind in coarse_kinds:
            if kind == "block":
                coarse = block_coarsen(reference, ct.ijk_to_ras, block_mm)
            else:
                from polycl.inference import Segmenter

                segmenter = segmenter or Segmenter.from_checkpoint(None, "cpu")
                coarse = segmenter.segment(ct.array, ct.ijk_to_ras).mask
            refiner.cache.clear()
            result = sr.refine_volume(ct.array, ct.ijk_to_ras, coarse, refiner)
            again = sr.refine_volume(ct.array, ct.ijk_to_ras, coarse, refiner)
            assert again.cache_misses == 0
            refined_slices = max(1, sum(1 for s in result.slices if s.boxes))
            worst = result.worst(1, max_dice=1.0)
            worst_text = f"{worst[0].index} ({worst[0].dice:.2f})" if worst else "-"
            print(f"   {case:<13} {kind:<7} {refined_slices:>6} {result.seconds / refined_slices:>8.3f} "
                  f"{again.seconds:>8.2f} {dice(coarse, reference):>11.4f} {dice(result.mask, reference):>12.4f} "
                  f"{sum(s.fallbacks for s in result.slices):>9} {worst_text:>19}", flush=True)
    print(f"   peak RSS {peak_rss_mb():.0f} MB; cache {len(refiner.cache)} embeddings, "
          f"{refiner.cache.nbytes / 2**20:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shared data folder (default $POLYCL_DATA or ../shared/data)")
    parser.add_argument("--slices", type=int, default=4, help="slices for the naive/optimised timing")
    parser.add_argument("--coarse", nargs="+", default=["block", "polycl"], choices=["block", "polycl"])
    parser.add_argument("--block-mm", type=float, default=12.0, help="block size of the coarsened mask")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-micro", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data)
    print("machine:", machine())
    if not args.skip_micro:
        ct = read_volume(root / "labeled" / "totalseg_dcm_ct.nii.gz")
        reference = read_mask(root / "labeled" / "totalseg_dcm_liver.nii.gz", ct).array
        micro(ct.array, reference, ct.ijk_to_ras, args.slices)
        print(f"   peak RSS so far {peak_rss_mb():.0f} MB")
    end_to_end(root, args.coarse, args.block_mm)


if __name__ == "__main__":
    main()

"""LiteMedSAM box-refinement benchmark on a 512x512 CT: naive vs shipped, seconds per slice, RSS.

Run:  .venv/bin/python bench/refine.py [--data DIR] [--slices 6] [--threads N] [--cases] [--segment-rss]

In one run on this machine (coarse mask: the bundled starter PolyCL model on ircad01's middle 119
slices, 512x512, unseen in training):
  1. per liver slice on ``--slices`` mid-liver slices, naive, autocast and shipped interleaved slice by slice
     (other load on the machine hits both alike): naive = the plain fp32 path (BatchNorm unfolded,
     contiguous layout, one encoder call per slice, one decoder call per box); autocast = the path
     shipped before issue 25 (BatchNorm folded, channels-last, bf16 autocast); shipped = now (+ TinyViT's
     oneDNN-fused forwards of polycl.sam.tinyvit, the encoder in pure bf16 only where the CPU has it
     natively, encoder batches of ``--batch``, one decoder call per slice).  Encoder and decoder
     seconds, the ratio, GFLOP/s as a fraction of a fp32 matmul peak measured in the same run, and
     how many mask pixels differ from the naive path's;
  2. ``refine_volume`` over every liver slice of the coarse mask with the shipped path (what
     ``polycl segment --refine litemedsam`` runs): seconds per refined slice, fallbacks, peak RSS;
  3. ``--cases``: 3D Dice coarse -> refined on the labelled cases (block-coarsened reference);
  4. ``--segment-rss``: peak RSS and wall time of ``polycl segment --refine litemedsam`` on a
     512x512x300 CT (ircad01 resampled along z) in a child process; several minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CASES, data_root, machine, peak_rss_mb  # noqa: E402  (also puts polycl on sys.path)
from inference import cut_119, matmul_peak, run_cli  # noqa: E402

from polycl.geometry import (
    CanonicalOrientation,  # noqa: E402
    voxel_spacing,
)
from polycl.io.volumes import read_mask, read_volume, write_volume  # noqa: E402
from polycl.metrics import dice  # noqa: E402
from polycl.sam import refine as sr  # noqa: E402


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


def model_flops(refiner: sr.SamRefiner, boxes: int = 1) -> tuple[float, float]:
    """FLOPs of one encoder pass (256x256) and of the decoder per box."""
    from torch.utils.flop_counter import FlopCounterMode

    image = np.zeros((512, 512, 3), np.uint8)
    with FlopCounterMode(display=False) as counter:
        embedding = refiner._encode([image])[0]
    encoder = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        refiner._decode(embedding, np.tile(np.array([[100, 100, 300, 300]], np.float32), (boxes, 1)))
    return encoder, float(counter.get_total_flops()) / boxes


def coarse_ircad(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ircad01's middle 119 slices and the starter PolyCL model's mask of them."""
    from polycl.inference import Segmenter

    array, matrix = cut_119(root)
    array = np.ascontiguousarray(array)
    mask = Segmenter.from_checkpoint(None, "cpu").segment(array, matrix).mask
    return array, matrix, np.asarray(mask, np.uint8)


def autocast_refiner(batch: int) -> sr.SamRefiner:
    """The path shipped before issue 25: BatchNorm folded, channels-last, vendored forwards, bf16 autocast."""
    from polycl.devices import resolve_precision

    refiner = sr.build_refiner("litemedsam", device="cpu", optimize=False, encoder_batch=batch)
    sr.fuse_conv_bn(refiner.sam.image_encoder)
    refiner.sam.image_encoder.to(memory_format=torch.channels_last)
    refiner.optimize = True  # channels-last input batches
    refiner.precision = resolve_precision("auto", refiner.device)  # autocast to bf16 where native
    return refiner


def per_slice(array: np.ndarray, matrix: np.ndarray, coarse: np.ndarray, count: int, batch: int,
              peak: float, repeats: int = 1) -> dict[str, float]:
    """Naive vs the issue-12 path vs the shipped one, encoder / decoder per slice, interleaved slice by slice."""
    refiners = {"naive": sr.build_refiner("litemedsam", device="cpu", optimize=False),
                "autocast": autocast_refiner(batch),
                "shipped": sr.build_refiner("litemedsam", device="cpu", optimize=True, encoder_batch=batch)}
    orientation = CanonicalOrientation.from_matrix(matrix)
    ct, mask = orientation.to_canonical(array), orientation.to_canonical(coarse > 0)
    liver = np.flatnonzero(mask.reshape(len(mask), -1).any(1))
    picked = liver[max(0, len(liver) // 2 - count // 2):][:count]
    encoder_flops, decoder_flops = model_flops(refiners["naive"])
    for refiner in refiners.values():  # first-call overheads out of the way
        refiner.embed([sr.slice_to_rgb(ct[picked[0]])], use_cache=False)
    times = {label: [0.0, 0.0] for label in refiners}
    best = {label: [np.inf, np.inf] for label in refiners}
    boxes_total, differing = 0, {label: 0 for label in refiners}
    for start in range(0, len(picked), batch):
        chunk = picked[start:start + batch]
        images = [sr.slice_to_rgb(ct[z]) for z in chunk]
        boxes = [sr.component_boxes(mask[z])[0] for z in chunk]
        boxes_total += sum(len(b) for b in boxes)
        results = {}
        for _ in range(repeats):
            for label, refiner in refiners.items():
                began = time.perf_counter()
                embeddings = ([refiner.embed([image], use_cache=False)[0] for image in images] if label == "naive"
                              else refiner.embed(images, use_cache=False))
                middle = time.perf_counter()
                if label == "naive":  # one decoder call per box
                    masks = [np.concatenate([refiner.decode(e, box[None])[0] for box in b]) for e, b in
                             zip(embeddings, boxes, strict=True)]
                else:
                    masks = [refiner.decode(e, b)[0] for e, b in zip(embeddings, boxes, strict=True)]
                best[label] = [min(best[label][0], middle - began), min(best[label][1], time.perf_counter() - middle)]
                results[label] = masks
        for label in refiners:
            times[label][0] += best[label][0]
            times[label][1] += best[label][1]
            best[label] = [np.inf, np.inf]
            differing[label] += sum(int(np.count_nonzero(a != b)) for a, b in zip(results["naive"], results[label],
                                                                                  strict=True))
    n = len(picked)
    print(f"\n1. per liver slice, ircad01 512x512, {n} slices, {boxes_total} boxes, interleaved (best of {repeats} "
          f"per slice); encoder batch {batch}; precision: autocast {refiners['autocast'].precision}, shipped "
          f"{refiners['shipped'].precision}{' (pure bf16 encoder)' if refiners['shipped'].pure_bf16 else ''}")
    print(f"   model: encoder {encoder_flops / 1e9:.1f} GFLOP per slice (TinyViT at 256x256, stage 1 at full "
          f"256x256 resolution), decoder {decoder_flops / 1e9:.2f} GFLOP per box; fp32 matmul peak "
          f"{peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"   {'path':<10} {'encoder s':>10} {'decoder s':>10} {'slice s':>8} {'GFLOP/s':>8} {'of fp32':>8} "
          f"{'vs naive':>8} {'pixels != naive':>15}")
    totals = {}
    for label, (encoder, decoder) in times.items():
        slice_s = (encoder + decoder) / n
        totals[label] = slice_s
        rate = (encoder_flops * n + decoder_flops * boxes_total) / (encoder + decoder) / 1e9
        print(f"   {label:<10} {encoder / n:>10.3f} {decoder / n:>10.3f} {slice_s:>8.3f} {rate:>8.1f} "
              f"{rate / peak:>8.0%} {totals['naive'] / slice_s:>7.2f}x {differing[label]:>15d}")
    print("   paths: naive = plain fp32, vendored forwards, BatchNorm unfolded, one decoder call per box; autocast "
          "= the path shipped before issue 25 (BatchNorm folded, channels-last, bf16 autocast); shipped = now "
          "(+ oneDNN-fused TinyViT forwards, pure bf16 encoder where native)")
    return totals


def whole_volume(array: np.ndarray, matrix: np.ndarray, coarse: np.ndarray, batch: int) -> None:
    refiner = sr.build_refiner("litemedsam", device="cpu", encoder_batch=batch, cache_bytes=0)  # as the CLI
    result = sr.refine_volume(array, matrix, coarse, refiner)
    refined = max(1, sum(1 for s in result.slices if s.prompted))  # slices that were encoded
    print(f"\n2. refine_volume over the coarse mask (as `polycl segment --refine litemedsam`): {refined} slices "
          f"in {result.seconds:.1f} s = {result.seconds / refined:.3f} s per slice; encoder "
          f"{refiner.timings['encoder_s'] / refined:.3f} s, decoder {refiner.timings['decoder_s'] / refined:.3f} s "
          f"per slice; {sum(s.fallbacks for s in result.slices)} boxes kept the coarse mask, "
          f"{sum(s.cut_by_border for s in result.slices)} pieces cut by the image border; "
          f"peak RSS so far {peak_rss_mb():.0f} MB", flush=True)


def labelled_cases(root: Path, block_mm: float) -> None:
    refiner = sr.build_refiner("litemedsam", device="cpu")
    print(f"\n3. Dice on the labelled cases (reference block-coarsened to {block_mm:g} mm)")
    print(f"   {'case':<13} {'slices':>6} {'s/slice':>8} {'Dice coarse':>11} {'Dice refined':>12}")
    for case in CASES:
        ct = read_volume(root / "labeled" / f"{case}_ct.nii.gz")
        reference = read_mask(root / "labeled" / f"{case}_liver.nii.gz", ct).array
        coarse = block_coarsen(reference, ct.ijk_to_ras, block_mm)
        result = sr.refine_volume(ct.array, ct.ijk_to_ras, coarse, refiner)
        refined = max(1, sum(1 for s in result.slices if s.prompted))  # slices that were encoded
        print(f"   {case:<13} {refined:>6} {result.seconds / refined:>8.3f} {dice(coarse, reference):>11.4f} "
              f"{dice(result.mask, reference):>12.4f}", flush=True)


def segment_rss(root: Path) -> None:
    big = read_volume(root / "unlabeled" / "ircad01_ct.nii.gz")
    count = big.array.shape[2]
    index = np.round(np.linspace(0, count - 1, 300)).astype(int)
    matrix = big.ijk_to_ras.copy()
    matrix[:3, 2] *= (count - 1) / 299
    with tempfile.TemporaryDirectory(prefix="polycl-refine-bench-") as work:
        path = Path(work) / "ct300.nii.gz"
        write_volume(path, np.ascontiguousarray(big.array[:, :, index]), matrix)
        del big
        seconds, rss = run_cli(["segment", str(path), "-o", str(Path(work) / "liver.nii.gz"), "--refine",
                                "litemedsam", "--device", "cpu"])
    print(f"\n4. `polycl segment --refine litemedsam` on 512x512x300 (ircad01 resampled along z): "
          f"{seconds:.1f} s, peak RSS {rss:.0f} MB (goal <= 2560 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shared data folder (default $POLYCL_DATA or ../shared/data)")
    parser.add_argument("--slices", type=int, default=6, help="slices for the naive/shipped timing")
    parser.add_argument("--repeats", type=int, default=1, help="section 1: best of N per slice and path")
    parser.add_argument("--batch", type=int, default=sr.SamRefiner.DEFAULT_ENCODER_BATCH,
                        help="encoder batch of the shipped path")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-volume", action="store_true", help="skip section 2 (whole liver extent)")
    parser.add_argument("--cases", action="store_true", help="also section 3 (Dice on the labelled cases)")
    parser.add_argument("--block-mm", type=float, default=12.0, help="block size of the coarsened mask")
    parser.add_argument("--segment-rss", action="store_true", help="also section 4 (512x512x300 CLI run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = data_root(args.data)
    print("machine:", machine())
    peak = matmul_peak(torch.float32)
    array, matrix, coarse = coarse_ircad(root)
    per_slice(array, matrix, coarse, args.slices, args.batch, peak, args.repeats)
    if not args.skip_volume:
        whole_volume(array, matrix, coarse, args.batch)
    if args.cases:
        labelled_cases(root, args.block_mm)
    if args.segment_rss:
        segment_rss(root)
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

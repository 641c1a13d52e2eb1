"""Inference-side levers of the starter model, measured leave-one-case-out (issue 20).

Run (after ``bench/starter_loo.py --out DIR``, which leaves ``DIR/without_<case>.safetensors``):
  nice -n 10 .venv/bin/python bench/starter_levers.py --folds DIR [--fold-of totalseg_sm=OTHER_DIR ...]

Each held-out case is segmented by the fold that never saw it; the probability map is then turned into a
mask in several ways and scored (3D Dice, HD95 mm, missed FN % and false FP % of the reference voxels):
* the threshold (0.3-0.6; the shipped rule is 0.5);
* smoothing the probability across slices (a Gaussian of 2, 4, 8 mm along the patient's axial axis: a 2D
  network decides each slice alone);
* filling holes in each axial slice of the mask;
* averaging the probabilities of several field-of-view sizes (test-time augmentation; ``--fovs``).
The largest 3D component is kept in every row, as ``Segmenter.segment`` does.  Choose by the mean over the
folds, never by ``validation/``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (polycl on sys.path)
    CASES,
    EXTRA_CASES,
    data_root,
    labelled_files,
    machine,
    missed_and_false_pct,
)

from polycl.geometry import CanonicalOrientation, voxel_spacing  # noqa: E402
from polycl.inference import Segmenter  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.masks import keep_largest_component  # noqa: E402
from polycl.metrics import dice, hausdorff  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
SMOOTHING_MM = (0.0, 2.0, 4.0, 8.0)


def held_out_probabilities(checkpoint: Path, ct, fovs: list[float]) -> dict[float, np.ndarray]:
    """Canonical (slice, row, column) probabilities of one CT, per field-of-view size in mm."""
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
    canonical = orientation.to_canonical(ct.array)
    probabilities = {}
    for fov in fovs:
        segmenter.field_of_view_mm = fov
        view, _ = segmenter.field_of_view(canonical, ct.ijk_to_ras, orientation)
        probabilities[fov] = segmenter.predict_slices(canonical, view=view)
    return probabilities


def to_mask(probability: np.ndarray, slice_mm: float, threshold: float, smoothing_mm: float,
            fill_holes: bool) -> np.ndarray:
    """Canonical probability -> mask by one lever setting (largest 3D component kept)."""
    if smoothing_mm and probability.shape[0] > 1:
        probability = ndimage.gaussian_filter1d(probability, smoothing_mm / slice_mm, axis=0, mode="nearest")
    mask = keep_largest_component(probability > threshold)
    if fill_holes:
        mask = np.stack([ndimage.binary_fill_holes(axial) for axial in mask])
    return mask


def score(mask: np.ndarray, reference: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Dice, HD95 mm, FN %, FP % (of the reference voxels)."""
    return np.array([dice(mask, reference), hausdorff(mask, reference, matrix)["hd95_mm"],
                     *missed_and_false_pct(mask, reference)])


def fold_checkpoints(folds: Path, overrides: list[str], cases: list[str]) -> dict[str, Path]:
    """held-out case -> fold checkpoint (``--fold-of CASE=DIR`` takes one case's fold from another run)."""
    where = {case: folds for case in cases}
    for item in overrides:
        case, _, folder = item.partition("=")
        where[case] = Path(folder)
    found = {case: where[case] / f"without_{case}.safetensors" for case in cases}
    missing = [str(path) for path in found.values() if not path.is_file()]
    if missing:
        sys.exit("missing fold checkpoints (run bench/starter_loo.py --out DIR first): " + ", ".join(missing))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=Path, required=True, help="bench/starter_loo.py --out folder")
    parser.add_argument("--fold-of", nargs="*", default=[], metavar="CASE=DIR")
    parser.add_argument("--cases", nargs="+", default=list(CASES + EXTRA_CASES), choices=CASES + EXTRA_CASES)
    parser.add_argument("--fovs", nargs="+", type=float, default=[340.0, 370.0, 400.0, 430.0, 460.0],
                        help="field-of-view sizes (mm) averaged by the test-time-augmentation row")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine(), flush=True)
    data = data_root(args.data)
    rows: dict[str, list[np.ndarray]] = {}
    for case, checkpoint in fold_checkpoints(args.folds, args.fold_of, args.cases).items():
        ct_file, mask_file = labelled_files(data, case)
        ct = read_volume(ct_file)
        orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
        reference = orientation.to_canonical(read_mask(mask_file, ct).array > 0)
        matrix = orientation.canonical_matrix(ct.ijk_to_ras, ct.array.shape)
        slice_mm = float(voxel_spacing(matrix)[0])
        probabilities = held_out_probabilities(checkpoint, ct, sorted({400.0, *args.fovs}))
        shipped = probabilities[400.0]
        for threshold, smoothing, fill in itertools.product(THRESHOLDS, SMOOTHING_MM, (False, True)):
            label = f"threshold {threshold}, smoothing {smoothing:g} mm" + (", holes filled" if fill else "")
            rows.setdefault(label, []).append(score(to_mask(shipped, slice_mm, threshold, smoothing, fill),
                                                    reference, matrix))
        average = np.mean([probabilities[fov] for fov in args.fovs], axis=0)
        label = "field-of-view TTA " + "/".join(f"{fov:g}" for fov in args.fovs) + " mm"
        rows.setdefault(label, []).append(score(to_mask(average, slice_mm, 0.5, 0.0, False), reference, matrix))
        print(f"{case}: done", flush=True)
    print(f"\n{'lever (mean over ' + str(len(args.cases)) + ' held-out cases)':<62} Dice   HD95   FN %   FP %")
    for label, scores in sorted(rows.items(), key=lambda item: -np.mean(item[1], axis=0)[0]):
        mean = np.mean(scores, axis=0)
        shipped = "  <- shipped" if label == "threshold 0.5, smoothing 0 mm" else ""
        print(f"{label:<62} {mean[0]:.3f} {mean[1]:6.1f} {mean[2]:6.1f} {mean[3]:6.1f}{shipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

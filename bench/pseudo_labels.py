"""Pseudo liver labels for unlabelled shared CTs by one-slice LiteMedSAM propagation (issue 9).

Run:  nice -n 10 .venv/bin/python bench/pseudo_labels.py --out /tmp/pseudo [--cases totalseg_full ...]

Each case is seeded on one mid-liver axial slice (canonical index, 0 = most inferior) with either a
reference label (``totalseg_full`` holds the same scan as ``labeled/totalseg_sm``: its TotalSegmentator
label covers canonical slices 82-111, so that label is kept and only the tip below is propagated)
or the largest 2D component of the starter model's mask on that slice.  The mask is propagated with
the bundled LiteMedSAM box chaining and its default stop rules, then written as
``<case>_liver.nii.gz`` on the CT's grid with a coronal check image and a JSON line of the
acceptance figures (volume, axial extent, slice count).  Accept a pseudo-label only after
looking at the check image: the volume must be 0.9-3.0 L when the liver is fully in view and the
axial extent must agree with ``bench/presence_flags.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import data_root, machine
from scipy import ndimage

from polycl.geometry import (
    CanonicalOrientation,  # noqa: E402
    voxel_spacing,
)
from polycl.inference import Segmenter  # noqa: E402
from polycl.io.volumes import read_mask, read_volume, write_mask  # noqa: E402
from polycl.sam.propagation import propagate_from_annotation  # noqa: E402
from polycl.sam.refine import array_slice_index  # noqa: E402

# case -> (CT path under the data folder, canonical seed slice, seed source)
SEEDS = {
    "totalseg_full": ("unlabeled/totalseg_full_ct.nii.gz", 82, "labeled/totalseg_sm"),
    "totalseg_aorta_cta": ("unlabeled/totalseg_aorta_cta_ct.nii.gz", 22, "starter"),
    "ircad01": ("unlabeled/ircad01_ct.nii.gz", 100, "starter"),  # evaluation only (CC BY-NC-ND)
}
TOTALSEG_SM_OFFSET = 82  # canonical slice of totalseg_full where labeled/totalseg_sm starts


def largest_2d(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        raise ValueError("the seed slice has no mask")
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def seed_and_kept(case: str, data: Path, canonical_ct: np.ndarray, ct) -> tuple[np.ndarray, np.ndarray]:
    """(canonical seed mask on one slice, canonical label to keep as it is) for one case."""
    _, seed_z, source = SEEDS[case]
    seed = np.zeros(canonical_ct.shape, bool)
    kept = np.zeros(canonical_ct.shape, bool)
    orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
    if source == "starter":
        mask = Segmenter.from_checkpoint(None, device="cpu").segment(ct.array, ct.ijk_to_ras).mask
        seed[seed_z] = largest_2d(orientation.to_canonical(mask)[seed_z] > 0)
        return seed, kept
    label_ct = read_volume(data / f"{source}_ct.nii.gz")
    label = read_mask(data / f"{source}_liver.nii.gz", label_ct)
    canonical_label = CanonicalOrientation.from_matrix(label_ct.ijk_to_ras).to_canonical(label.array) > 0
    kept[TOTALSEG_SM_OFFSET:TOTALSEG_SM_OFFSET + len(canonical_label)] = canonical_label
    same_scan = orientation.to_canonical(ct.array)[TOTALSEG_SM_OFFSET:TOTALSEG_SM_OFFSET + len(canonical_label)]
    assert np.array_equal(same_scan, CanonicalOrientation.from_matrix(label_ct.ijk_to_ras).to_canonical(label_ct.array))
    seed[seed_z] = kept[seed_z]
    return seed, kept


def check_image(path: Path, canonical_ct: np.ndarray, mask: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.flatnonzero(mask.any((0, 2)))
    columns = np.flatnonzero(mask.any((0, 1)))
    cuts = [int(np.median(rows)) if len(rows) else canonical_ct.shape[1] // 2,
            int(np.median(columns)) if len(columns) else canonical_ct.shape[2] // 2]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, image, overlay, name in ((axes[0], canonical_ct[:, cuts[0]], mask[:, cuts[0]], "coronal"),
                                     (axes[1], canonical_ct[:, :, cuts[1]], mask[:, :, cuts[1]], "sagittal")):
        ax.imshow(np.clip((image + 160) / 400, 0, 1), cmap="gray", origin="lower", aspect="auto")
        if overlay.any():
            ax.contour(overlay, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{title} {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=list(SEEDS), choices=list(SEEDS))
    args = parser.parse_args()
    data = data_root(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    for case in args.cases:
        started = time.perf_counter()
        ct = read_volume(data / SEEDS[case][0])
        orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
        canonical_ct = orientation.to_canonical(ct.array)
        seed, kept = seed_and_kept(case, data, canonical_ct, ct)
        seed_z = SEEDS[case][1]
        result = propagate_from_annotation(
            ct.array, ct.ijk_to_ras, orientation.from_canonical(seed.astype(np.uint8)), engine="litemedsam",
            direction="down" if kept.any() else "both", device="cpu")
        propagated = orientation.to_canonical(result.mask) > 0
        label = np.where(kept.any((1, 2))[:, None, None], kept, propagated)
        write_mask(args.out / f"{case}_liver.nii.gz", orientation.from_canonical(label.astype(np.uint8)),
                   ct.ijk_to_ras)
        check_image(args.out / f"{case}_pseudo.png", canonical_ct, label, case)
        present = np.flatnonzero(label.any((1, 2)))
        litres = float(label.sum() * np.prod(voxel_spacing(ct.ijk_to_ras)) / 1e6)
        print(json.dumps({"case": case, "seed_canonical_slice": seed_z,
                          "seed_array_slice": array_slice_index(orientation, ct.array.shape, seed_z),
                          "litres": round(litres, 3), "extent_canonical": [int(present[0]), int(present[-1])],
                          "slices": int(len(present)), "stops": result.stops,
                          "minutes": round((time.perf_counter() - started) / 60, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

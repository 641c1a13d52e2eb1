"""Plausibility of a liver model on the unlabelled shared CTs (issue 9), with check images.

Run:  .venv/bin/python bench/starter_plausibility.py [--checkpoint FILE] [--pseudo DIR] [--images docs/starter_checks]

Per CT (all slices in canonical order, 0 = most inferior), with the model's mask (largest 3D component):
* volume in litres; the 0.9-3.0 L rule applies only where the whole liver is in view (``FULL_VIEW``);
* ``off_slices`` / ``off_voxels``: mask on slices that ``bench/presence_flags.json`` marks liver-free
  (pelvis, chest with the heart; extents checked by eye on coronal check images).  The heart lies above
  the liver dome and the kidneys' lower poles below the liver tip, so a model that labels them reaches
  into those ranges;
* ``present_missed``: slices flagged liver-present that have no mask (a lost dome or tip);
* with ``--pseudo DIR`` (``bench/pseudo_labels.py`` output, an approximate reference): Dice, HD95 and
  ``outside_10mm``, the voxels more than 10 mm from the reference liver (heart, kidney, stomach blobs
  beside the liver on the same slices).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_root, machine  # noqa: E402  (also puts polycl on sys.path)

from polycl.geometry import (
    CanonicalOrientation,  # noqa: E402
    voxel_spacing,
)
from polycl.inference import Segmenter  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.metrics import evaluate  # noqa: E402

CASES = {
    "ircad01": "ircad01_ct.nii.gz",
    "totalseg_full": "totalseg_full_ct.nii.gz",
    "totalseg_aorta_cta": "totalseg_aorta_cta_ct.nii.gz",
    "pyradiomics_lung1": "pyradiomics_lung1_ct.nrrd",
    "pyradiomics_lung2": "pyradiomics_lung2_ct.nrrd",
}
FULL_VIEW = {"ircad01"}  # whole liver inside the scan (others cut the dome or the tip)
VOLUME_RANGE_L = (0.9, 3.0)


def flagged(flags: dict, key: str, count: int) -> np.ndarray:
    out = np.zeros(count, bool)
    for first, last in flags.get(key, []):
        out[first:last + 1] = True
    return out


def check_case(segmenter: Segmenter, ct_path: Path, flags: dict, reference: Path | None) -> tuple[dict, tuple]:
    ct = read_volume(ct_path)
    orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
    mask = segmenter.segment(ct.array, ct.ijk_to_ras).mask
    canonical = orientation.to_canonical(mask) > 0
    count = len(canonical)
    on_slice = canonical.reshape(count, -1).sum(1)
    absent, present = flagged(flags, "absent", count), flagged(flags, "present", count)
    spacing = voxel_spacing(ct.ijk_to_ras)
    litres = float(mask.sum() * np.prod(spacing) / 1e6)
    row = {"litres": round(litres, 3), "off_slices": int((on_slice[absent] > 0).sum()),
           "off_voxels": int(on_slice[absent].sum()), "present_missed": int((on_slice[present] == 0).sum()),
           "extent": [int(z) for z in np.flatnonzero(on_slice)[[0, -1]]] if on_slice.any() else None}
    reference_canonical = None
    if reference is not None and reference.is_file():
        ref = read_mask(reference, ct)
        row.update({k: round(v, 3) for k, v in evaluate(mask, ref.array, ct.ijk_to_ras).items()
                    if k in ("dice", "hd95_mm")})
        distance = ndimage.distance_transform_edt(ref.array == 0, sampling=spacing)
        row["outside_10mm"] = int(((distance > 10) & (mask > 0)).sum())
        reference_canonical = orientation.to_canonical(ref.array) > 0
    row["plausible"] = bool(row["off_voxels"] == 0 and row["present_missed"] == 0 and row.get("outside_10mm", 0) == 0
                            and (ct_path.name.split("_ct")[0] not in FULL_VIEW
                                 or VOLUME_RANGE_L[0] <= litres <= VOLUME_RANGE_L[1]))
    return row, (orientation.to_canonical(ct.array), canonical, reference_canonical, absent)


def check_image(path: Path, key: str, views: tuple, spacing_ratio: float) -> None:
    """Coronal and sagittal reformats through the mask, model in red, reference in cyan, liver-free range in blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, mask, reference, absent = views
    source = mask if mask.any() else ct > 0
    row = int(np.median(np.flatnonzero(source.any((0, 2)))))
    column = int(np.median(np.flatnonzero(source.any((0, 1)))))
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    for ax, cut, name in ((axes[0], np.s_[:, row, :], "coronal"), (axes[1], np.s_[:, :, column], "sagittal")):
        ax.imshow(np.clip((ct[cut] + 160) / 400, 0, 1), cmap="gray", origin="lower", aspect=spacing_ratio)
        if reference is not None and reference[cut].any():
            ax.contour(reference[cut], levels=[0.5], colors="c", linewidths=0.6)
        if mask[cut].any():
            ax.contour(mask[cut], levels=[0.5], colors="r", linewidths=0.6)
        for z in np.flatnonzero(absent):
            ax.axhspan(z - 0.5, z + 0.5, xmin=0, xmax=0.03, color="b", lw=0)
        ax.set_title(f"{key} {name}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--checkpoint", help="default: the bundled starter model")
    parser.add_argument("--pseudo", type=Path, help="bench/pseudo_labels.py output (approximate references)")
    parser.add_argument("--images", type=Path, help="write one check PNG per CT here")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    data = data_root(args.data)
    flags = json.loads((ROOT / "bench" / "presence_flags.json").read_text())
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    print(machine(), flush=True)
    rows = {}
    for key in args.cases:
        reference = args.pseudo / f"{key}_liver.nii.gz" if args.pseudo else None
        rows[key], views = check_case(segmenter, data / "unlabeled" / CASES[key], flags.get(key, {}), reference)
        print(json.dumps({"case": key, **rows[key]}), flush=True)
        if args.images:
            args.images.mkdir(parents=True, exist_ok=True)
            ct = read_volume(data / "unlabeled" / CASES[key])
            spacing = voxel_spacing(CanonicalOrientation.from_matrix(ct.ijk_to_ras).canonical_matrix(
                ct.ijk_to_ras, ct.array.shape))
            check_image(args.images / f"{key}.png", key, views, spacing[0] / spacing[1])
    print("\n| CT | liver L | mask on liver-free slices (slices / voxels) | flagged liver slices missed | "
          "Dice / HD95 mm vs pseudo-reference | voxels > 10 mm outside it | plausible |")
    print("|---|---|---|---|---|---|---|")
    for key, row in rows.items():
        versus = f"{row['dice']:.3f} / {row['hd95_mm']:.1f}" if "dice" in row else "-"
        print(f"| {key} | {row['litres']:.2f}{'' if key in FULL_VIEW else ' (cut)'} | {row['off_slices']} / "
              f"{row['off_voxels']} | {row['present_missed']} | {versus} | {row.get('outside_10mm', '-')} | "
              f"{'yes' if row['plausible'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Liver presence (issue 20): the default pipeline on CT with no liver in view and on small fields of view.

Run:  nice -n 10 .venv/bin/python bench/liver_presence.py [--checkpoint CKPT] [--json rows.jsonl]

Rows (canonical slices, 0 = most inferior; every crop keeps a correct IJK->RAS matrix):
* liver-free: the ``absent`` slice ranges of ``bench/presence_flags.json`` (pelvis of ``totalseg_full`` and
  ``ircad01``, chest of ``totalseg_aorta_cta`` and both ``pyradiomics_lung`` scans, the upper chest of the aorta
  CTA) and a left-side crop of each whole-liver CT beyond the body's midline (+30 % of its half-width: spleen,
  stomach, left kidney), kept when its reference holds < 5 mL of liver;
* liver in view: each labelled case whole, and square fields of view of 150-250 mm (outside: air, as a scanner's
  reconstruction circle leaves it) centred on the right half of the body, the reference cropped alike.
Expected: an empty mask with "no liver found" on the liver-free rows, the liver found (and its Dice) on the
others.  ``ircad01``'s mask (validation/) is read only to label its crops; nothing here trains or selects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_root, machine  # noqa: E402  (also puts polycl on sys.path)
from train_starter import canonical_volume  # noqa: E402

from polycl.geometry import voxel_spacing  # noqa: E402
from polycl.inference import Segmenter  # noqa: E402
from polycl.io import Volume, read_mask, read_volume  # noqa: E402
from polycl.metrics import dice  # noqa: E402

WHOLE_LIVER = {"chaos_ctset3": "labeled-extra", "ircad01": None}
LABELLED = {"totalseg_sm": "labeled", "totalseg_dcm": "labeled", "dcmqi_3slice": "labeled",
            "chaos_ctset3": "labeled-extra", "totalsegds_s0009": "labeled-extra"}
UNLABELLED = {"totalseg_full": "totalseg_full_ct.nii.gz", "totalseg_aorta_cta": "totalseg_aorta_cta_ct.nii.gz",
              "pyradiomics_lung1": "pyradiomics_lung1_ct.nrrd", "pyradiomics_lung2": "pyradiomics_lung2_ct.nrrd",
              "ircad01": "ircad01_ct.nii.gz"}
FIELDS_MM = (150, 200, 250)


def crop(volume: Volume, slices: slice = slice(None), rows: slice = slice(None),
         columns: slice = slice(None)) -> Volume:
    """A box of a canonical volume with its matrix moved to the box's first voxel."""
    start = np.array([s.start or 0 for s in (slices, rows, columns)] + [1.0])
    matrix = volume.ijk_to_ras.copy()
    matrix[:, 3] = volume.ijk_to_ras @ start
    return Volume(np.ascontiguousarray(volume.array[slices, rows, columns]), matrix, volume.source)


def square_field(ct: Volume, mask: Volume | None, size_mm: float) -> tuple[Volume, Volume | None]:
    """A size_mm square, centred 1/3 of the body's half-width right of its midline; air outside, on every slice."""
    body = ct.array > -300
    spacing = voxel_spacing(ct.ijk_to_ras)  # canonical: (z, y, x); x index grows towards the patient's left
    columns = np.flatnonzero(body.any(axis=(0, 1)))
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    centre_x = (columns[0] + columns[-1]) / 2 - (columns[-1] - columns[0]) / 6
    centre_y = (rows[0] + rows[-1]) / 2
    half_x, half_y = size_mm / 2 / spacing[2], size_mm / 2 / spacing[1]
    y0, y1 = int(max(0, centre_y - half_y)), int(min(ct.array.shape[1], centre_y + half_y))
    x0, x1 = int(max(0, centre_x - half_x)), int(min(ct.array.shape[2], centre_x + half_x))
    box = (slice(None), slice(y0, y1), slice(x0, x1))
    return crop(ct, *box), None if mask is None else crop(mask, *box)


def row(segmenter: Segmenter, name: str, ct: Volume, reference: Volume | None, expect_liver: bool) -> dict:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segmenter.segment(ct.array, ct.ijk_to_ras)
    out = {"crop": name, "expected": "liver" if expect_liver else "no liver", **result.liver.as_dict(),
           "mask_ml": float(result.mask.sum() * np.prod(voxel_spacing(ct.ijk_to_ras)) / 1000),
           "seconds": round(time.perf_counter() - started, 1)}
    if reference is not None:
        out["reference_ml"] = float(reference.array.sum() * np.prod(voxel_spacing(ct.ijk_to_ras)) / 1000)
        out["dice"] = dice(result.mask, reference.array) if expect_liver else None
    out["ok"] = bool((result.liver.status != "none") == expect_liver)
    return out


def liver_free_rows(segmenter: Segmenter, data: Path, flags: dict) -> list[dict]:
    rows = []
    for case, file in UNLABELLED.items():
        ct = canonical_volume(read_volume(data / "unlabeled" / file))
        for first, last in flags[case]["absent"]:
            if last - first >= 4:
                rows.append(row(segmenter, f"{case} slices {first}-{last}", crop(ct, slice(first, last + 1)), None,
                                False))
        if case == "totalseg_aorta_cta":
            rows.append(row(segmenter, f"{case} upper chest 130-190", crop(ct, slice(130, 191)), None, False))
    for case, folder in WHOLE_LIVER.items():
        ct, mask = labelled(data, case, folder)
        body = np.flatnonzero((ct.array > -300).any(axis=(0, 1)))
        start = int((body[0] + body[-1]) / 2 + 0.3 * (body[-1] - body[0]) / 2)
        left = crop(ct, columns=slice(start, None))
        reference = crop(mask, columns=slice(start, None))
        reference_ml = reference.array.sum() * np.prod(voxel_spacing(ct.ijk_to_ras)) / 1000
        rows.append(row(segmenter, f"{case} left side (spleen, stomach)", left, reference, reference_ml >= 5))
    return rows


def labelled(data: Path, case: str, folder: str | None) -> tuple[Volume, Volume]:
    if folder is None:  # ircad01: CT in unlabeled/, its expert mask in validation/ (evaluation only)
        ct = read_volume(data / "unlabeled" / f"{case}_ct.nii.gz")
        return canonical_volume(ct), canonical_volume(read_mask(data / "validation" / f"{case}_liver.nii.gz", ct))
    ct = read_volume(data / folder / f"{case}_ct.nii.gz")
    return canonical_volume(ct), canonical_volume(read_mask(data / folder / f"{case}_liver.nii.gz", ct))


def liver_rows(segmenter: Segmenter, data: Path) -> list[dict]:
    rows = []
    for case, folder in {**LABELLED, "ircad01": None}.items():
        ct, mask = labelled(data, case, folder)
        rows.append(row(segmenter, f"{case} whole", ct, mask, True))
        if case in ("chaos_ctset3", "ircad01", "totalseg_dcm"):
            for size in FIELDS_MM:
                small_ct, small_mask = square_field(ct, mask, size)
                rows.append(row(segmenter, f"{case} {size} mm field of view", small_ct, small_mask, True))
    return rows


def lateral_text(lateral: float | None) -> str:
    return "cut" if lateral is None else f"{lateral:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="segmentation checkpoint (default: the bundled starter model)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON lines")
    args = parser.parse_args()
    data = data_root(args.data)
    flags = json.loads((ROOT / "bench" / "presence_flags.json").read_text())
    print(machine(), flush=True)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    rows = liver_free_rows(segmenter, data, flags) + liver_rows(segmenter, data)
    print("\n| CT / crop | expected | status | mask mL | confidence | lateral | Dice | reason |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dice_text = f"{r['dice']:.3f}" if r.get("dice") is not None else "–"
        print(f"| {r['crop']} | {r['expected']} | {r['status']}{'' if r['ok'] else ' ✗'} | {r['mask_ml']:.1f} | "
              f"{r['confidence']:.2f} | {lateral_text(r['lateral'])} | {dice_text} | {r['reason'] or '–'} |")
    wrong = [r["crop"] for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(wrong)} of {len(rows)} as expected" + (f"; wrong: {', '.join(wrong)}" if wrong else ""))
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Leave-one-case-out evaluation of the starter-model recipe on the labelled shared cases.

Run:  .venv/bin/python bench/starter_loo.py [--data DIR] [--epochs 80] [--out DIR]

For each labelled case: `polycl finetune` with the starter recipe on the other two cases, then
`polycl segment` the held-out case and report 3D Dice, HD and HD95 (mm) against its mask.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))

from polycl.cli import main as polycl  # noqa: E402
from polycl.inference import Segmenter  # noqa: E402
from polycl.io import read_mask, read_volume  # noqa: E402
from polycl.metrics import evaluate  # noqa: E402
from polycl.samples import data_dir  # noqa: E402

CASES = ("totalseg_sm", "totalseg_dcm", "dcmqi_3slice")
STARTER_RECIPE = ["--size", "128", "--batch-size", "4", "--dropout", "0.1", "--val-fraction", "0", "--seed", "0"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="polycl-loo-")))
    args = parser.parse_args()
    labeled = args.data / "labeled"
    rows = []
    for held_out in CASES:
        train = [case for case in CASES if case != held_out]
        checkpoint = args.out / f"without_{held_out}.safetensors"
        started = time.perf_counter()
        code = polycl(["finetune", "--images", *[str(labeled / f"{c}_ct.nii.gz") for c in train],
                       "--labels", *[str(labeled / f"{c}_liver.nii.gz") for c in train], "-o", str(checkpoint),
                       "--epochs", str(args.epochs), "--overwrite", *STARTER_RECIPE])
        if code:
            return code
        minutes = (time.perf_counter() - started) / 60
        ct = read_volume(labeled / f"{held_out}_ct.nii.gz")
        reference = read_mask(labeled / f"{held_out}_liver.nii.gz", ct)
        mask = Segmenter.from_checkpoint(checkpoint).segment(ct.array, ct.ijk_to_ras).mask
        metrics = evaluate(mask, reference.array, ct.ijk_to_ras)
        rows.append({"held_out": held_out, "train": train, "train_minutes": round(minutes, 1), **metrics})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| held-out case | trained on | 3D Dice | HD95 mm | HD mm | train min |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['held_out']} | {' + '.join(row['train'])} | {row['dice']:.3f} | {row['hd95_mm']:.1f} | "
              f"{row['hd_mm']:.1f} | {row['train_minutes']} |")
    mean = sum(r["dice"] for r in rows) / len(rows)
    print(f"\nmean leave-one-case-out 3D Dice: {mean:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Leave-one-case-out evaluation of the starter-model recipe on the labelled shared cases.

Run:  nice -n 10 .venv/bin/python bench/starter_loo.py --pseudo /tmp/pseudo [--recipe pseudo] [--jobs 3] [--out DIR]

For each labelled case: ``bench/train_starter.py --exclude CASE`` (the recipe of the bundled starter,
without that case and without any other scan of the same patient), then segment the held-out case
and report 3D Dice, HD and HD95 (mm), missed (FN) and false (FP) voxels in % of the reference against its
mask.  ``--cases`` also takes the ``labeled-extra/`` cases (train with ``--extra-cases`` to use the others).
``--recipe labelled`` is the previous starter's data (the three labelled cases only).  ``--jobs`` trains
the folds in parallel processes.
``--init-folds`` chains stages: each fold starts from the earlier stage's fold of the same held-out case,
so a warm-started recipe stays leave-one-case-out; ``--resume`` keeps the folds an interrupted run
finished.  Other options go to ``train_starter.py``, e.g. ``--architecture transunet`` for the TransUNet row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (polycl on sys.path)
    CASES,
    EXTRA_CASES,
    ROOT,
    data_root,
    labelled_files,
    machine,
    missed_and_false_pct,
)

from polycl.inference import Segmenter  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.metrics import evaluate  # noqa: E402


def fold_finished(out: Path, case: str) -> bool:
    """True when an earlier run into ``out`` trained this fold to the end (its log says it wrote it)."""
    log = out / f"without_{case}.log"
    return (out / f"without_{case}.safetensors").is_file() and log.is_file() and "\nwrote " in log.read_text()


def train_folds(args: argparse.Namespace, extra: list[str]) -> dict[str, float | str]:
    """Train one checkpoint per held-out case (``--jobs`` at a time); minutes per fold ("reused" with --resume)."""
    started, minutes, running = {}, {}, {}
    pending = list(args.cases)
    while pending or running:
        while pending and len(running) < args.jobs:
            case = pending.pop(0)
            if args.resume and fold_finished(args.out, case):
                minutes[case] = "reused"
                continue
            command = [sys.executable, str(ROOT / "bench" / "train_starter.py"), "--recipe", args.recipe,
                       "--exclude", case, "-o", str(args.out / f"without_{case}.safetensors"), *extra]
            if args.pseudo:
                command += ["--pseudo", str(args.pseudo)]
            if args.init_folds:
                command += ["--init", str(args.init_folds / f"without_{case}.safetensors")]
            log = open(args.out / f"without_{case}.log", "w")  # noqa: SIM115  (closed with the process)
            running[case] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
            started[case] = time.perf_counter()
        time.sleep(5)
        for case, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                if process.returncode:
                    sys.exit(f"fold without {case} failed; see {args.out / f'without_{case}.log'}")
                minutes[case] = round((time.perf_counter() - started[case]) / 60, 1)
                del running[case]
    return minutes


def main() -> int:
    # no abbreviations: ``--init`` must reach train_starter.py, not be taken as ``--init-folds``
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data", default=None)
    parser.add_argument("--recipe", default="pseudo", choices=["labelled", "negatives", "pseudo"])
    parser.add_argument("--pseudo", type=Path, help="bench/pseudo_labels.py output (recipe pseudo)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=CASES + EXTRA_CASES, default=list(CASES),
                        help="held-out cases to run (default: the three folds of labeled/)")
    parser.add_argument("--resume", action="store_true",
                        help="keep folds already trained into --out (an interrupted run) instead of retraining them")
    parser.add_argument("--init-folds", type=Path,
                        help="warm-start each fold from DIR/without_CASE.safetensors (an earlier --out: the "
                             "previous stage's fold that never saw CASE)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="polycl-loo-")))
    args, extra = parser.parse_known_args()  # anything else goes to bench/train_starter.py
    data = data_root(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine(), f"\nfolds in {args.out}", flush=True)
    minutes = train_folds(args, extra)
    rows = []
    for held_out in args.cases:
        ct_file, mask_file = labelled_files(data, held_out)
        ct = read_volume(ct_file)
        reference = read_mask(mask_file, ct)
        checkpoint = args.out / f"without_{held_out}.safetensors"
        segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
        mask = segmenter.segment(ct.array, ct.ijk_to_ras).mask
        metrics = evaluate(mask, reference.array, ct.ijk_to_ras)
        metrics["fn_pct"], metrics["fp_pct"] = missed_and_false_pct(mask, reference.array)
        rows.append({"held_out": held_out, "recipe": args.recipe, "architecture": segmenter.card["architecture"],
                     "train_minutes": minutes[held_out], **metrics})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| held-out case | recipe | backbone | 3D Dice | HD95 mm | HD mm | FN % | FP % | train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['held_out']} | {row['recipe']} | {row['architecture']} | {row['dice']:.3f} | "
              f"{row['hd95_mm']:.1f} | {row['hd_mm']:.1f} | {row['fn_pct']:.1f} | {row['fp_pct']:.1f} | "
              f"{row['train_minutes']} |")
    mean = {key: float(np.mean([r[key] for r in rows])) for key in ("dice", "hd95_mm", "hd_mm", "fn_pct", "fp_pct")}
    print(f"| mean of {len(rows)} | | | {mean['dice']:.3f} | {mean['hd95_mm']:.1f} | {mean['hd_mm']:.1f} | "
          f"{mean['fn_pct']:.1f} | {mean['fp_pct']:.1f} | |")
    print(f"\nmean leave-one-case-out 3D Dice: {mean['dice']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

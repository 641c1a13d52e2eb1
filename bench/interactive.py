"""Simulated user: paint k slices (copied from the reference), finetune sparsely, segment; suggest vs even.

Run:  .venv/bin/python bench/interactive.py [--cases totalseg_sm ...] [--ks 1 2 3 5]
      [--init-dir DIR] [--shift-hu 0] [--epochs 20] [--threads 2]

For each case and k, the painted slices are chosen either by ``polycl.suggest`` (the initial model's k
least reliable slices, spread along the liver) or evenly spaced along the reference liver; both runs
then finetune sparsely from the initial model and segment the whole case.
The initial model is ``DIR/without_<case>.safetensors`` when ``--init-dir`` holds one (a starter
trained without that case, e.g. from bench/starter_loo.py), else the bundled starter (which has seen
every labelled case: use ``--shift-hu`` to move the case out of its training domain).  Prints a
Markdown table (3D Dice, HD95 mm, wall seconds per run) with the CPU and load average: the machine
may be shared, and wall time scales with its load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CASES, EXTRA_CASES, data_root, labelled_files, machine
from finetune_sparse import evenly_spaced, painted_copy

from polycl.geometry import axial_axis
from polycl.inference import Segmenter
from polycl.io.base import Volume
from polycl.io.volumes import read_mask, read_volume
from polycl.metrics import evaluate
from polycl.nets.model_card import STARTER_CHECKPOINT
from polycl.suggest import suggest_slices
from polycl.training.config import FinetuneConfig
from polycl.training.finetuning import finetune
from polycl.training.sparse import annotated_slices
from polycl.training.sparse_training import recipe_defaults


def sparse_run(ct: Volume, reference: np.ndarray, painted: list[int], init: Path, epochs: int, out: Path) -> Path:
    config = FinetuneConfig(slices="annotated", epochs=epochs, device="cpu",
                            **{k: v for k, v in recipe_defaults("annotated").items() if k != "epochs"})
    label = Volume(painted_copy(reference, axial_axis(ct.ijk_to_ras), painted), ct.ijk_to_ras)
    return finetune([(ct, label)], out, config, init=init, overwrite=True).path


def simulate(ct: Volume, reference: np.ndarray, k: int, strategy: str, init: Path, epochs: int, folder: Path
             ) -> tuple[dict, float, list[int]]:
    """Paint k slices chosen by ``strategy`` ('suggest': the initial model's k least reliable slices, or
    'even'), finetune once; returns metrics, wall seconds (suggest + finetune + segment) and the slices."""
    started, liver = time.perf_counter(), annotated_slices(reference, ct.ijk_to_ras)
    if strategy == "even":
        painted = evenly_spaced(liver, k)
    else:
        found = suggest_slices(Segmenter.from_checkpoint(init, "cpu"), ct.array, ct.ijk_to_ras, k)
        painted = [s for s in found.slices if s in liver]  # a suggestion outside the liver cannot be painted
        painted += [s for s in evenly_spaced(liver, k) if s not in painted][:k - len(painted)]
    checkpoint = sparse_run(ct, reference, painted, init, epochs, folder / f"{strategy}_{k}.safetensors")
    mask = Segmenter.from_checkpoint(checkpoint, "cpu").segment(ct.array, ct.ijk_to_ras).mask
    return evaluate(mask, reference, ct.ijk_to_ras), time.perf_counter() - started, sorted(painted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--cases", nargs="+", default=[*CASES, *EXTRA_CASES])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--init-dir", type=Path)
    parser.add_argument("--shift-hu", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=recipe_defaults("annotated")["epochs"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    data, folder = data_root(args.data), Path(tempfile.mkdtemp(prefix="polycl-interactive-"))
    rows = ["| case | init | k | strategy | painted slices | 3D Dice | HD95 mm | wall s |", "|---" * 8 + "|"]
    dice_by_run: dict[tuple[int, str], list[float]] = {}
    for case in args.cases:
        ct_file, mask_file = labelled_files(data, case)
        ct = read_volume(ct_file)
        reference = read_mask(mask_file, ct).array
        if args.shift_hu:
            ct = Volume(ct.array.astype(np.float32) + args.shift_hu, ct.ijk_to_ras, ct.source)
        own = args.init_dir / f"without_{case}.safetensors" if args.init_dir else None
        init = own if own is not None and own.is_file() else STARTER_CHECKPOINT
        base = evaluate(Segmenter.from_checkpoint(init, "cpu").segment(ct.array, ct.ijk_to_ras).mask, reference,
                        ct.ijk_to_ras)
        rows.append(f"| {case} | {init.name} | 0 | - | - | {base['dice']:.3f} | {base['hd95_mm']:.1f} | - |")
        print(rows[-1], flush=True)
        for k in args.ks:
            for strategy in ("suggest", "even"):
                metrics, seconds, painted = simulate(ct, reference, k, strategy, init, args.epochs, folder)
                dice_by_run.setdefault((k, strategy), []).append(metrics["dice"])
                rows.append(f"| {case} | {init.name} | {k} | {strategy} | {painted} | {metrics['dice']:.3f} | "
                            f"{metrics['hd95_mm']:.1f} | {seconds:.0f} |")
                print(rows[-1], flush=True)
    for (k, strategy), values in sorted(dice_by_run.items()):
        rows.append(f"| mean of {len(values)} | | {k} | {strategy} | | {np.mean(values):.3f} | | |")
    print(f"\nshift {args.shift_hu:+g} HU, {args.epochs} epochs per finetune; {machine()}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

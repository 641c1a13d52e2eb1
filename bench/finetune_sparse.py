"""Sparse finetuning from a few painted slices: wall time and Dice on the slices nobody painted.

Run:  .venv/bin/python bench/finetune_sparse.py [--case totalseg_sm] [--init CKPT] [--painted 3]
      [--shift-hu 0] [--epochs 20] [--lr 1e-4] [--threads 2]

The painted slices are copied from the reference mask at evenly spaced array indices along the case's
axial axis (as a user would paint them); the finetune trains only on those (``slices="annotated"``).
Before/after: 3D Dice and mean 2D Dice over the *other* slices, plus the epoch-by-epoch trace.
``--shift-hu`` adds a constant to the CT (a contrast-phase shift the starter model has not seen), so
the run also shows a case where the initial model is wrong.  Prints the CPU, threads and load average:
the machine may be shared, and wall time scales with its load; process CPU seconds are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import data_root, machine  # noqa: E402  (sets sys.path)

from polycl.inference import Segmenter  # noqa: E402
from polycl.io.base import Volume  # noqa: E402
from polycl.io.volumes import read_mask, read_volume
from polycl.metrics import dice, per_slice_dice  # noqa: E402
from polycl.training.config import FinetuneConfig  # noqa: E402
from polycl.training.finetuning import finetune
from polycl.training.sparse import annotated_slices  # noqa: E402
from polycl.training.sparse_training import recipe_defaults  # noqa: E402


def evenly_spaced(slices: list[int], count: int) -> list[int]:
    """``count`` slices spread over ``slices`` (their middles when count is small)."""
    positions = (np.arange(count) + 0.5) * len(slices) / count
    return sorted({slices[int(p)] for p in positions})


def painted_copy(reference: np.ndarray, axis: int, keep: list[int]) -> np.ndarray:
    mask = np.zeros_like(reference)
    index = [slice(None)] * 3
    for k in keep:
        index[axis] = k
        mask[tuple(index)] = reference[tuple(index)]
    return mask


def scores(segmenter: Segmenter, ct: Volume, reference: np.ndarray, axis: int, others: list[int]) -> dict:
    mask = segmenter.segment(ct.array, ct.ijk_to_ras).mask
    rest = np.take(mask, others, axis), np.take(reference, others, axis)
    return {"dice_other_slices_3d": round(dice(*rest), 4),
            "mean_2d_dice_other_slices": round(float(per_slice_dice(mask, reference, axis)[others].mean()), 4)}


def main() -> int:
    defaults = recipe_defaults("annotated")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="data folder (default: $POLYCL_DATA or ../shared/data)")
    parser.add_argument("--case", default="totalseg_sm")
    parser.add_argument("--init", help="initial checkpoint (default: the bundled starter model)")
    parser.add_argument("--painted", type=int, default=3)
    parser.add_argument("--shift-hu", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=defaults["epochs"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    labeled = data_root(args.data) / "labeled"
    ct = read_volume(labeled / f"{args.case}_ct.nii.gz")
    reference = read_mask(labeled / f"{args.case}_liver.nii.gz", ct).array
    if args.shift_hu:
        ct = Volume((ct.array.astype(np.float32) + args.shift_hu), ct.ijk_to_ras, ct.source)
    from polycl.geometry import axial_axis

    axis = axial_axis(ct.ijk_to_ras)
    liver = annotated_slices(reference, ct.ijk_to_ras)
    painted = evenly_spaced(liver, args.painted)
    others = [k for k in range(ct.array.shape[axis]) if k not in painted]
    before = scores(Segmenter.from_checkpoint(args.init, "cpu"), ct, reference, axis, others)
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, slices="annotated",
                            seed=args.seed, device="cpu")
    trace = []
    output = Path(tempfile.mkdtemp(prefix="polycl-sparse-")) / "sparse.safetensors"
    init = args.init or str(Path(__import__("polycl").__file__).parent / "weights" / "polycl_liver_starter.safetensors")
    wall, cpu = time.perf_counter(), time.process_time()
    painted_label = Volume(painted_copy(reference, axis, painted), ct.ijk_to_ras)
    result = finetune([(ct, painted_label)], output, config, init=init,
                      progress=lambda r: trace.append((r.epoch, round(r.loss, 4), r.metrics.get("val_dice"))))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = scores(Segmenter.from_checkpoint(result.path, "cpu"), ct, reference, axis, others)
    row = {"case": args.case, "shift_hu": args.shift_hu, "init": Path(init).name, "painted": painted,
           "slices_used": result.card["data"]["slices_used"], "epochs": args.epochs, "lr": args.lr,
           "best_epoch": result.best_epoch, "initial_val_dice": result.card["data"].get("initial_val_dice"),
           "finetune_wall_s": round(wall, 1), "finetune_cpu_s": round(cpu, 1), "before": before, "after": after,
           "load_average_end": [round(x, 1) for x in os.getloadavg()]}
    print("epoch trace (epoch, loss, val Dice):", trace)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Low-label experiment: does self-supervised pretraining help when few labelled scans exist?

Run:  .venv/bin/python bench/low_label.py --quick            (64 px, few epochs: ~15 min on 2 CPU cores)
      .venv/bin/python bench/low_label.py                    (128 px, 20 + 40 epochs: hours on CPU)
      .venv/bin/python bench/low_label.py --with-labeled     (also pretrain on the fold's labelled CTs)

1. Pretrain one encoder per method (PolyCL-S/-O/-M, SimCLR, Pix2Rep) on ``shared/data/unlabeled``.
   PolyCL-O/-M take organ presence T(s) of those scans from ``bench/presence_flags.json``
   (slice-level flags annotated by eye; borderline slices unknown).  By default no labelled CT
   is used for pretraining, so no fold's held-out case leaks into any encoder;
   ``--with-labeled`` pretrains per fold on unlabeled + that fold's training cases (their masks
   give T(s)), as in the papers' in-domain setting.
2. Leave-one-case-out over the three labelled cases: finetune (soft Dice, the finetuning backend)
   from random init and from every pretrained encoder with 1 labelled scan and with all (= 2)
   remaining labelled scans, several seeds; segment the held-out case and score 3D Dice and HD95 (mm).
3. Print a MELBA-Table-4-like table (mean ± sd over folds x seeds) with wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))

from polycl.inference import Segmenter  # noqa: E402
from polycl.io.samples import data_dir  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.metrics import dice, hausdorff  # noqa: E402
from polycl.training.config import FinetuneConfig  # noqa: E402
from polycl.training.finetuning import finetune  # noqa: E402
from polycl.training.pretraining import PretrainConfig, build_slice_index, pretrain  # noqa: E402

CASES = ("totalseg_sm", "totalseg_dcm", "dcmqi_3slice")
METHODS = ("polycl-s", "polycl-o", "polycl-m", "simclr", "pix2rep")
FLAGS = ROOT / "bench" / "presence_flags.json"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pretrain_encoders(data: Path, out: Path, args, extra_cases: list[str], tag: str) -> dict[str, tuple[Path, float]]:
    """One encoder per method; returns method -> (checkpoint, seconds)."""
    paths = [data / "unlabeled"] + [data / "labeled" / f"{case}_ct.nii.gz" for case in extra_cases]
    index = build_slice_index(paths, flags=FLAGS, size=args.size)
    log(f"pretraining data {tag}: {index.summary()}")
    encoders = {}
    for method in args.methods:
        config = PretrainConfig(method=method, architecture=args.architecture, input_size=args.size,
                                epochs=args.pretrain_epochs,
                                batch_size=args.pretrain_batch, lr=args.pretrain_lr, save_every=0,
                                restart_epochs=max(1, args.pretrain_epochs), seed=0, device="cpu")
        started = time.perf_counter()
        result = pretrain(index, out / f"{tag}_{method}.ckpt", config, overwrite=True)
        seconds = time.perf_counter() - started
        losses = [round(r.loss, 3) for r in result.history]
        log(f"pretrained {method} ({tag}) in {seconds:.0f}s, loss per epoch {losses}")
        encoders[method] = (result.path, seconds)
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps({"kind": "pretrain", "method": method, "tag": tag, "seconds": round(seconds, 1),
                                     "loss_history": losses}) + "\n")
    return encoders


def train_sets(held_out: str, budget: str, seed: int) -> list[str]:
    others = [case for case in CASES if case != held_out]
    return others if budget == "all" else [others[seed % len(others)]]


def mean_sd(values: list[float], decimals: int = 3) -> str:
    """'mean ± sd' over the finite values, noting how many were empty (inf)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    sd = np.std(finite, ddof=1) if len(finite) > 1 else 0.0
    text = f"{np.mean(finite):.{decimals}f} ± {sd:.{decimals}f}"
    return text + (f" ({len(values) - len(finite)} empty)" if len(finite) < len(values) else "")


def make_table(rows: list[dict], inits: list[str], budgets: list[str], pretrain_seconds: dict[str, float]
               ) -> list[str]:
    """Markdown table: Dice and HD95 mean ± sd per budget, paired Dice difference vs random init, times."""
    def label(budget: str) -> str:
        return "1 scan" if budget == "1" else "all (2) scans"

    header = "| init | " + " | ".join(f"Dice ({label(b)}) | HD95 mm ({label(b)}) | ΔDice vs random ({label(b)})"
                                     for b in budgets) + " | pretrain s | finetune s/run |"
    lines = [header, "|" + "---|" * (3 * len(budgets) + 3)]
    random_dice = {(r["held_out"], r["budget"], r["seed"]): r["dice"] for r in rows if r["init"] == "random"}
    for name in inits:
        cells = []
        for budget in budgets:
            chosen = [r for r in rows if r["init"] == name and r["budget"] == budget]
            cells += [mean_sd([r["dice"] for r in chosen]), mean_sd([r["hd95_mm"] for r in chosen], decimals=1)]
            if name == "random":
                cells.append("—")
                continue
            deltas = [r["dice"] - random_dice[(r["held_out"], budget, r["seed"])] for r in chosen
                      if (r["held_out"], budget, r["seed"]) in random_dice]
            wins = sum(d > 0 for d in deltas)
            cells.append(f"{np.mean(deltas):+.3f} ± {np.std(deltas, ddof=1) if len(deltas) > 1 else 0:.3f} "
                         f"({wins}/{len(deltas)} better)" if deltas else "n/a")
        ft = [r["finetune_s"] for r in rows if r["init"] == name]
        pre = f"{pretrain_seconds[name]:.0f}" if name in pretrain_seconds else ("0" if name == "random" else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pre} | {np.mean(ft) if ft else float('nan'):.1f} |")
    return lines


def report(path: Path) -> int:
    """Re-print the table of a finished run from its results.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in records if r.get("kind") != "pretrain"]
    seconds: dict[str, list[float]] = {}
    for r in records:
        if r.get("kind") == "pretrain":
            seconds.setdefault(r["method"], []).append(r["seconds"])
    inits = ["random"] + [m for m in METHODS if any(r["init"] == m for r in rows)]
    budgets = [b for b in ("1", "all") if any(r["budget"] == b for r in rows)]
    print("\n".join(make_table(rows, inits, budgets, {m: float(np.mean(v)) for m, v in seconds.items()})))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="shared data folder (default $POLYCL_DATA)")
    parser.add_argument("--quick", action="store_true",
                        help="64 px, 4 pretraining + 12 finetuning epochs, 2 seeds (1 for all scans), 1 thread")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--pretrain-batch", type=int, default=20)
    parser.add_argument("--pretrain-lr", type=float, default=5e-4,
                        help="higher than the papers' 1e-4 because CPU runs are a few epochs, not 100")
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="finetuning seeds (1-scan budget: seed picks the scan)")
    parser.add_argument("--seeds-all", type=int, default=None, help="seeds for the all-scans budget (default --seeds)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--architecture", default="polycl_unet", choices=["polycl_unet", "resunet", "transunet"],
                        help="backbone for pretraining and finetuning (transunet: the CPU-sized preset)")
    parser.add_argument("--budgets", nargs="+", default=["1", "all"], choices=["1", "all"],
                        help="labelled scans for finetuning: 1 or all (= 2 in leave-one-case-out)")
    parser.add_argument("--with-labeled", action="store_true",
                        help="pretrain per fold on unlabeled + the fold's labelled training CTs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--report", type=Path, help="only print the table of a finished run's results.jsonl")
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    quick = {"size": 64, "pretrain_epochs": 4, "finetune_epochs": 12, "seeds": 2, "seeds_all": 1, "threads": 1}
    full = {"size": 128, "pretrain_epochs": 20, "finetune_epochs": 40, "seeds": 3, "seeds_all": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or data_dir()
    if data is None or not (Path(data) / "labeled").is_dir():
        print("low_label: shared data not found; set POLYCL_DATA or pass --data", file=sys.stderr)
        return 2
    data = Path(data)
    out = args.out or Path(tempfile.mkdtemp(prefix="polycl-lowlabel-"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"settings: {vars(args)}; work folder {out}; torch threads {torch.get_num_threads()}")
    bench_started = time.perf_counter()

    volumes = {}
    for case in CASES:
        ct = read_volume(data / "labeled" / f"{case}_ct.nii.gz")
        volumes[case] = (ct, read_mask(data / "labeled" / f"{case}_liver.nii.gz", ct))

    shared = None if args.with_labeled else pretrain_encoders(data, out, args, [], "unlabeled")
    rows = []
    results_file = out / "results.jsonl"
    seconds_by_method: dict[str, list[float]] = {}
    for held_out in CASES:
        encoders = shared or pretrain_encoders(data, out, args, [c for c in CASES if c != held_out],
                                               f"without_{held_out}")
        if shared is None or held_out == CASES[0]:
            for method, (_, pretrain_s) in encoders.items():
                seconds_by_method.setdefault(method, []).append(pretrain_s)
        inits = {"random": (None, 0.0), **encoders}
        ct, reference = volumes[held_out]
        for budget in args.budgets:
            for seed in range(args.seeds if budget == "1" else args.seeds_all):
                train = train_sets(held_out, budget, seed)
                for name, (checkpoint, _) in inits.items():
                    config = FinetuneConfig(architecture=args.architecture, input_size=args.size,
                                            epochs=args.finetune_epochs, batch_size=10,
                                            lr=1e-3, val_fraction=0.0, seed=seed, device="cpu",
                                            restart_epochs=args.finetune_epochs,
                                            architecture_args={"dropout": 0.1})
                    started = time.perf_counter()
                    result = finetune([volumes[c] for c in train], out / "ft.ckpt", config, init=checkpoint,
                                      overwrite=True)
                    seconds = time.perf_counter() - started
                    mask = Segmenter.from_checkpoint(result.path, device="cpu").segment(
                        ct.array, ct.ijk_to_ras).mask
                    distances = hausdorff(mask, reference.array, ct.ijk_to_ras)
                    row = {"init": name, "held_out": held_out, "budget": budget, "seed": seed, "train": train,
                           "dice": dice(mask, reference.array), "hd95_mm": distances["hd95_mm"],
                           "finetune_s": round(seconds, 1)}
                    rows.append(row)
                    with open(results_file, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    log(f"{held_out:13s} budget {budget:3s} seed {seed} {name:9s} Dice {row['dice']:.3f} "
                        f"HD95 {row['hd95_mm']:.1f} mm ({seconds:.0f}s)")

    pretrain_seconds = {m: float(np.mean(v)) for m, v in seconds_by_method.items()}  # per fold with --with-labeled
    budgets = [b for b in ("1", "all") if b in args.budgets]
    lines = make_table(rows, ["random", *args.methods], budgets, pretrain_seconds)
    total = (time.perf_counter() - bench_started) / 60
    note = (f"\n{len(CASES)} held-out cases x {args.seeds} seeds (1 scan; the seed picks which) / {args.seeds_all} "
            f"(all scans) per cell; input {args.size} px; "
            f"pretraining {args.pretrain_epochs} epochs (lr {args.pretrain_lr}, batch {args.pretrain_batch}); "
            f"finetuning {args.finetune_epochs} epochs; backbone {args.architecture}; total wall-clock {total:.1f} min "
            f"({torch.get_num_threads()} torch threads).")
    table = "\n".join(lines) + "\n" + note
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 25's performance table in one run: the package before issue 25 (baseline) vs the shipped one.

Run:  .venv/bin/python bench/performance_table.py [--data DIR] [--baseline-commit bb02c6f] [--repeats 3]
      (about 10-15 min on an idle 2-core machine; --skip-rss saves the two 512x512x300 runs, ~5 min)

Every row compares baseline and shipped in the same run, alternated where the row repeats; the baseline is the
``polycl`` package of ``--baseline-commit`` (``git archive``; the repository's main before issue 25's encoder
work), run as a separate ``python -m polycl.cli`` process exactly like the shipped one.  Rows:

  1. ``polycl segment`` end to end on a 512x512x119 cut of ircad01 (unseen), best of ``--repeats``;
  2. LiteMedSAM refinement inside ``segment --refine litemedsam``: refine seconds / refined slices (the CLI's
     own "refined N slices in S s" line), best of 2;
  3. the same per slice in-process (``bench/refine.per_slice``, 6 mid-liver slices interleaved): naive fp32,
     the pre-issue-25 path (bf16 autocast) and the shipped one; encoder seconds and GFLOP/s;
  4. finetune epoch, 119 slices at 128 px (``bench/finetune``): naive loop vs the shipped ``finetune``;
  5. peak RSS of ``segment --refine litemedsam`` on a 512x512x300 CT (ircad01 resampled along z);
  6. two ``polycl segment`` at once (each) vs one alone, both with their default thread settings.
The machine (CPU model, bf16 / AMX flags, cores, load) is printed first and the load again at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_root, machine  # noqa: E402  (also puts polycl on sys.path)
from inference import baseline_package, cut_119, matmul_peak, polycl_process  # noqa: E402

from polycl.io.volumes import read_volume, write_volume  # noqa: E402

BASELINE_COMMIT = "bb02c6f"  # main when issue 25's encoder / threads work began
REFINED = re.compile(r"refined (\d+) slices with \S+ in ([\d.]+) s")


def cpu_flags() -> str:
    """The CPU's bf16 / AMX / AVX-512 flags from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "flags unknown"
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni")
    present = set(flags.split(":", 1)[1].split())
    return " ".join(f"{flag}{'+' if flag in present else '-'}" for flag in wanted)


def segment_argv(ct: Path, out: Path, *extra: str) -> list[str]:
    return ["segment", str(ct), "-o", str(out), "--overwrite", "--device", "cpu", *extra]


def row(name: str, baseline: str, shipped: str, goal: str, note: str = "") -> None:
    print(f"| {name} | {baseline} | {shipped} | {goal} |{f' {note}' if note else ''}", flush=True)


def end_to_end(packages: dict[str, Path], ct: Path, work: Path, repeats: int) -> None:
    walls: dict[str, list[float]] = {label: [] for label in packages}
    for _ in range(repeats):
        for label, package in packages.items():
            walls[label].append(polycl_process(segment_argv(ct, work / f"{label}.nii.gz"), package)[0])
    best = {label: min(values) for label, values in walls.items()}
    row(f"`polycl segment`, end to end, best of {repeats}", f"{best['baseline']:.2f} s", f"{best['shipped']:.2f} s",
        "≤ 2.5 s", f"(all runs: {', '.join(f'{k} ' + '/'.join(f'{v:.1f}' for v in vs) for k, vs in walls.items())})")


def refine_in_segment(packages: dict[str, Path], ct: Path, work: Path, repeats: int = 2) -> None:
    per_slice: dict[str, list[float]] = {label: [] for label in packages}
    counts = {}
    for _ in range(repeats):
        for label, package in packages.items():
            *_, error = polycl_process(segment_argv(ct, work / f"{label}.nii.gz", "--refine", "litemedsam"),
                                      package)
            found = REFINED.search(error)
            if found is None:
                raise RuntimeError(f"no 'refined N slices' line from the {label} run: {error[-300:]}")
            counts[label] = int(found.group(1))
            per_slice[label].append(float(found.group(2)) / max(1, counts[label]))
    row(f"LiteMedSAM refinement inside `segment --refine litemedsam`, per liver slice ({counts['shipped']} "
        f"slices, best of {repeats})", f"{min(per_slice['baseline']):.3f} s", f"{min(per_slice['shipped']):.3f} s",
        "≤ 0.15 s")


def bench_refine_path(root: Path) -> None:
    from refine import coarse_ircad, per_slice

    array, matrix, coarse = coarse_ircad(root)
    peak = matmul_peak(torch.float32)
    totals = per_slice(array, matrix, coarse, 6, 1, peak, repeats=2)
    row("the same, `bench/refine.py` path, per slice (naive fp32 / pre-issue-25 autocast → shipped)",
        f"{totals['naive']:.3f} s / {totals['autocast']:.3f} s", f"{totals['shipped']:.3f} s", "–")


def finetune_epoch(root: Path) -> None:
    from finetune import naive_epochs, shipped_epochs, summary

    from polycl.inference import Segmenter
    from polycl.io.base import Volume
    from polycl.nets.checkpoints import load_checkpoint
    from polycl.nets.model_card import STARTER_CHECKPOINT
    from polycl.training.slices import slices_from_pairs

    cut, matrix = cut_119(root)
    pseudo = Segmenter.from_checkpoint(None, "cpu").segment(cut, matrix).mask
    pairs = [(Volume(cut, matrix, "ircad01"), Volume(pseudo, matrix, "ircad01"))]
    data = slices_from_pairs(pairs, 128)
    model, _ = load_checkpoint(STARTER_CHECKPOINT)
    naive = summary(naive_epochs(model, data.images, data.masks, 3), skip_first=True)[0]
    with tempfile.TemporaryDirectory(prefix="polycl-table-finetune-") as work:
        shipped = summary(shipped_epochs(pairs, 3, "auto", Path(work)), skip_first=True)[0]
    row("finetune epoch, 119 slices at 128 px (median of epochs 2-3; naive loop → shipped)", f"{naive:.2f} s",
        f"{shipped:.2f} s", "≤ 1.5 s")


def ct_300(root: Path, work: Path) -> Path:
    big = read_volume(root / "unlabeled" / "ircad01_ct.nii.gz")
    count = big.array.shape[2]
    index = np.round(np.linspace(0, count - 1, 300)).astype(int)
    matrix = big.ijk_to_ras.copy()
    matrix[:3, 2] *= (count - 1) / 299
    return write_volume(work / "ct300.nii.gz", np.ascontiguousarray(big.array[:, :, index]), matrix)


def peak_rss(packages: dict[str, Path], root: Path, work: Path) -> None:
    ct = ct_300(root, work)
    results = {label: polycl_process(segment_argv(ct, work / f"{label}300.nii.gz", "--refine", "litemedsam"),
                                      package)
               for label, package in packages.items()}
    row("peak RSS, segment + refine, 512×512×300", f"{results['baseline'][1] / 1024:.2f} GiB",
        f"{results['shipped'][1] / 1024:.2f} GiB", "≤ 1.5 GiB",
        f"(wall {results['baseline'][0]:.0f} s → {results['shipped'][0]:.0f} s)")


def contention(packages: dict[str, Path], ct: Path, work: Path, repeats: int) -> None:
    """Each of two ``segment`` at once vs one alone: baseline and shipped defaults, shipped with passive OpenMP."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_NUM_THREADS", "POLYCL_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    settings = {"baseline": (packages["baseline"], {}), "shipped": (packages["shipped"], {}),
                "passive": (packages["shipped"], {"OMP_WAIT_POLICY": "PASSIVE"})}
    cells = {}
    for label, (package, extra) in settings.items():
        alone, pair = [], []
        for _ in range(repeats):
            alone.append(polycl_process(segment_argv(ct, work / f"{label}-a.nii.gz"), package, {**env, **extra})[0])
            started = time.perf_counter()
            processes = [subprocess.Popen([sys.executable, "-m", "polycl.cli",
                                           *segment_argv(ct, work / f"{label}-{n}.nii.gz")],
                                          env={**env, **extra, "PYTHONPATH": str(package)},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in "bc"]
            for process in processes:
                if process.wait():
                    raise RuntimeError(f"{label}: a segment of the pair failed")
            pair.append(time.perf_counter() - started)
        cells[label] = f"{min(pair):.1f} s each vs {min(alone):.1f} s alone: {min(pair) / min(alone):.2f}×"
    row(f"two `polycl segment` of the 119-slice CT at once (best of {repeats})", cells["baseline"],
        f"{cells['shipped']}; OMP_WAIT_POLICY=PASSIVE {cells['passive']}", "≤ 3× alone")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="shared data folder (default $POLYCL_DATA or ../shared/data)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT, help="the baseline package's commit")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per package (best is printed)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the two 512x512x300 runs (row 5)")
    args = parser.parse_args()
    root = data_root(args.data)
    print(f"machine: {machine()}\nCPU flags: {cpu_flags()}")
    work = Path(tempfile.mkdtemp(prefix="polycl-table-"))
    baseline = baseline_package(args.baseline_commit, work)
    if baseline is None:
        return 2
    packages = {"baseline": baseline, "shipped": ROOT / "PolyCLSlicer"}
    cut, matrix = cut_119(root)
    ct = write_volume(work / "ct119.nii.gz", np.ascontiguousarray(cut), matrix)
    print(f"\nbaseline = polycl of {args.baseline_commit}; shipped = this checkout; CT: ircad01 512x512x119 cut\n")
    print("| figure | baseline | shipped | goal |\n|---|---|---|---|")
    end_to_end(packages, ct, work, args.repeats)
    refine_in_segment(packages, ct, work)
    bench_refine_path(root)
    finetune_epoch(root)
    if not args.skip_rss:
        peak_rss(packages, root, work)
    contention(packages, ct, work, 2)
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

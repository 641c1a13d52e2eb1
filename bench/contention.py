"""Contention (issue 25): two `polycl segment` at once on one machine vs one alone, per thread setting.

Run:  .venv/bin/python bench/contention.py [--data DIR] [--slices 119] [--repeats 2]

The CT is a 512 x 512 x N cut of ircad01 (as bench/inference.py).  For each setting the command runs alone,
then twice at once (two processes started together), alternated ``--repeats`` times; the best wall time is
printed with the ratio "each of two at once / alone" (fair sharing of the cores gives 2x).  Settings: the
default thread decision (polycl.threads: the CPUs the process may use), OpenMP's passive wait policy
(``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep instead of spinning), a short spin before sleeping
(``GOMP_SPINCOUNT=10000``; libgomp's default without a policy is 300000), and one thread per process.  A CPU-bound
competitor on every core (plain Python loops) is the last row.  Prints the machine, bf16 and load first.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_root, machine  # noqa: E402  (also puts polycl on sys.path)

from polycl.io import read_volume, write_volume  # noqa: E402

SETTINGS = {
    "default threads": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},  # libgomp (torch's pip wheels): spin ~1/30 of the default
    "1 thread per process": {"POLYCL_THREADS": "1"},
}


def segment_command(ct: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "polycl.cli", "segment", str(ct), "-o", str(out), "--overwrite", "--device", "cpu"]


def run_together(commands: list[list[str]], env: dict[str, str]) -> list[float]:
    """Start every command at once; the wall seconds of each."""
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for command in commands]
    walls = []
    for process in processes:
        _, error = process.communicate()
        if process.returncode:
            raise RuntimeError(error.decode()[-500:])
        walls.append(time.perf_counter() - started)
    return walls


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(10_000))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--slices", type=int, default=119)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine(), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="polycl-contention-"))
    ct = read_volume(data_root(args.data) / "unlabeled" / "ircad01_ct.nii.gz")
    path = folder / "ct.nii.gz"
    write_volume(path, np.ascontiguousarray(ct.array[:, :, :args.slices]), ct.ijk_to_ras)
    base_env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "POLYCL_THREADS",
                                                                               "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base_env["PYTHONPATH"] = str(ROOT / "PolyCLSlicer")
    one, two = [segment_command(path, folder / "a.nii.gz")], [segment_command(path, folder / f"{n}.nii.gz")
                                                             for n in "bc"]
    print(f"\n| setting (512x512x{args.slices}) | alone s | each of two at once s | ratio |\n|---|---|---|---|")
    for name, extra in SETTINGS.items():
        env = {**base_env, **extra}
        alone, together = [], []
        for _ in range(args.repeats):
            alone += run_together(one, env)
            together.append(max(run_together(two, env)))
        print(f"| {name} | {min(alone):.2f} | {min(together):.2f} | {min(together) / min(alone):.2f}x |",
              flush=True)
    env = base_env
    alone = min(run_together(one, env) for _ in range(args.repeats))[0]
    competitors = [multiprocessing.Process(target=burn, args=(3600,)) for _ in range(os.cpu_count() or 1)]
    for process in competitors:
        process.start()
    try:
        busy = min(run_together(one, env) for _ in range(args.repeats))[0]
    finally:
        for process in competitors:
            process.terminate()
    print(f"| default, beside {len(competitors)} CPU-bound processes | {alone:.2f} | {busy:.2f} | "
          f"{busy / alone:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

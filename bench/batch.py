"""Batch throughput (issue 23): `polycl segment` once per file (a cold process each) vs `polycl batch` on a Dask
LocalCluster with 1 worker (2 threads) and 2 workers (1 thread each), then a fault-injection run.

Run:  nice -n 10 .venv/bin/python bench/batch.py [--data DIR] [--rounds 2]

Configurations: `polycl segment` once per file (the baseline; default threads and OpenMP wait policy), the same
with ``OMP_WAIT_POLICY=PASSIVE`` (what the batch workers use: separates the warm model from the wait policy),
and `polycl batch` with 1 and 2 workers (``--configs`` picks some).  The cohort is 12 real CTs: the 6 larger
CTs of the shared data (ircad01, chaos_ctset3, the two pyradiomics chests, the TotalSegmentator CTA and s0009),
each twice under another name.  Each configuration runs the whole
cohort into an empty folder; the rounds alternate the order (A B C, C B A, ...) and the best wall time of each
is kept.  CPU-seconds are the user + system time of the command and all its processes (workers included,
``RUSAGE_CHILDREN``).  The fault run starts `polycl batch` with 2 workers and kill -9s the worker that is
segmenting the 5th case one second after it starts it; all 12 outputs must then equal the serial run's voxel for
voxel and summary.csv must show 2 attempts for that case.  Prints the machine, bf16 and the load average.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_root, machine  # noqa: E402  (also puts polycl on sys.path)

from polycl.io import read_mask, read_volume  # noqa: E402

SOURCES = ("unlabeled/ircad01_ct.nii.gz", "labeled-extra/chaos_ctset3_ct.nii.gz",
           "unlabeled/pyradiomics_lung1_ct.nrrd", "unlabeled/pyradiomics_lung2_ct.nrrd",
           "unlabeled/totalseg_aorta_cta_ct.nii.gz", "labeled-extra/totalsegds_s0009_ct.nii.gz")
POLYCL = [sys.executable, "-m", "polycl.cli"]
SERIAL = "serial `polycl segment` per file (2 threads)"
SERIAL_PASSIVE = "serial `polycl segment` per file, OMP_WAIT_POLICY=PASSIVE (as the workers)"
CONFIGS = {  # name: `polycl batch` options (None: `polycl segment` per file), extra environment
    SERIAL: (None, {}),
    SERIAL_PASSIVE: (None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "`polycl batch`, 1 worker x 2 threads": (["--workers", "1", "--threads-per-worker", "2"], {}),
    "`polycl batch`, 2 workers x 1 thread": (["--workers", "2", "--threads-per-worker", "1"], {}),
}


def make_cohort(data: Path, folder: Path, copies: int = 2) -> list[Path]:
    """Each source ``copies`` times (copies, so that every case reads its own file): 12 CT files by default."""
    folder.mkdir(parents=True)
    cases = []
    for copy in range(copies):
        for number, source in enumerate(SOURCES):
            suffix = ".nrrd" if source.endswith(".nrrd") else ".nii.gz"
            target = folder / f"case{copy * len(SOURCES) + number + 1:02d}{suffix}"
            shutil.copy(data / source, target)
            cases.append(target)
    return cases


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_serial(cases: list[Path], out: Path, env: dict) -> None:
    out.mkdir(parents=True)
    for case in cases:
        stem = case.name.split(".")[0]
        subprocess.run([*POLYCL, "segment", str(case), "-o", str(out / f"{stem}_liver.nii.gz")], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_batch(cohort: Path, out: Path, env: dict, options: list[str]) -> str:
    done = subprocess.run([*POLYCL, "batch", str(cohort), "-o", str(out), "--no-progress", *options], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-1500:] + done.stderr[-1500:])
    return done.stdout


def measure(name: str, cases: list[Path], cohort: Path, out: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one configuration over the whole cohort."""
    options, extra = CONFIGS[name]
    cpu, started = children_cpu(), time.perf_counter()
    if options is None:
        run_serial(cases, out, {**env, **extra})
    else:
        run_batch(cohort, out, {**env, **extra}, options)
    return time.perf_counter() - started, children_cpu() - cpu


def fault_run(cohort: Path, out: Path, env: dict, victim: str = "case05") -> tuple[float, dict]:
    """2 workers; kill -9 the worker that runs ``victim`` 1 s into it.  (wall seconds, summary rows)."""
    started = time.perf_counter()
    batch = subprocess.Popen([*POLYCL, "batch", str(cohort), "-o", str(out), "--workers", "2",
                              "--threads-per-worker", "1", "--no-progress"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    record = out / ".polycl-batch" / f"{victim}.attempts"
    while not (record.exists() and record.read_text().strip()):
        if batch.poll() is not None:
            raise RuntimeError("the batch ended before the victim case started")
        time.sleep(0.05)
    time.sleep(1.0)
    pid = int(record.read_text().split()[-1].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    print(f"  killed worker pid {pid} 1 s into {victim}", flush=True)
    stdout, stderr = batch.communicate()
    if batch.returncode:
        raise RuntimeError(stdout[-1500:] + stderr[-1500:])
    with open(out / "summary.csv", newline="") as handle:
        rows = {Path(row["input"]).name.split(".")[0]: row for row in csv.DictReader(handle)}
    return time.perf_counter() - started, rows


def load() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", type=int, nargs="+", default=list(range(len(CONFIGS))),
                        help="which configurations (0-based, in the table's order; 0 is the baseline)")
    parser.add_argument("--no-fault", action="store_true", help="skip the fault-injection run")
    parser.add_argument("--cases", type=int, default=12, choices=(6, 12), help="6: each CT once")
    args = parser.parse_args()
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="polycl-batch-bench-"))
    cohort = work / "cohort"
    cases = make_cohort(data_root(args.data), cohort, args.cases // len(SOURCES))
    slices = [read_volume(case).array.shape for case in cases[: len(SOURCES)]]
    print(f"cohort: {len(cases)} CTs = " + ", ".join("x".join(map(str, shape)) for shape in slices)
          + (" (each twice)" if len(cases) > len(SOURCES) else ""))
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "POLYCL_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "PolyCLSlicer")
    best: dict[str, tuple[float, float]] = {}
    names = [list(CONFIGS)[i] for i in sorted(set(args.configs) | {0})]
    for round_number in range(args.rounds):
        for name in names if round_number % 2 == 0 else names[::-1]:
            out = work / f"out-{list(CONFIGS).index(name)}-{round_number}"
            wall, cpu = measure(name, cases, cohort, out, env)
            print(f"  round {round_number + 1}: {name}: {wall:.1f} s wall, {cpu:.1f} CPU-s (load {load()})",
                  flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    serial_wall = best[names[0]][0]
    count = len(cases)
    print(f"\n| configuration ({count} CTs, best of {args.rounds}) | wall s | cases / min | CPU-s / case | "
          "speed-up vs serial |\n|---|---|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.1f} | {count * 60 / wall:.2f} | {cpu / count:.1f} | {serial_wall / wall:.2f}x |")

    if args.no_fault:
        shutil.rmtree(work)
        return 0
    serial_out = work / "out-0-0"
    fault_out = work / "fault"
    wall, rows = fault_run(cohort, fault_out, env)
    identical = [read_mask(fault_out / f"{case.name.split('.')[0]}_liver.nii.gz").array.tobytes() ==
                 read_mask(serial_out / f"{case.name.split('.')[0]}_liver.nii.gz").array.tobytes()
                 for case in cases]
    retried = {stem: row["attempts"] for stem, row in rows.items() if row["attempts"] != "1"}
    print(f"\nfault injection (2 workers, kill -9 mid-case): {wall:.1f} s wall; {sum(identical)}/{len(cases)} outputs "
          f"voxel-identical to the serial run; attempts > 1 in summary.csv: {retried or 'none'}; "
          f"statuses: {sorted({row['status'] for row in rows.values()})} (load {load()})")
    shutil.rmtree(work)
    return 0 if all(identical) and retried else 1


if __name__ == "__main__":
    sys.exit(main())

"""``polycl batch`` on a Dask LocalCluster with 2 worker processes, on small real CTs: outputs identical to
``polycl segment``, a broken input among good ones, a worker killed mid-case, resume after Ctrl-C; and the
dask-jobqueue configuration (the generated SLURM job script; no scheduler runs)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install -r requirements.txt)")

ENV = {**os.environ, "POLYCL_THREADS": "1"}  # a shared 2-core machine: one torch thread per worker


def summary_rows(folder: Path) -> dict[str, dict]:
    with open(folder / "summary.csv", newline="", encoding="utf-8") as handle:
        return {Path(row["input"]).name: row for row in csv.DictReader(handle)}


def polycl(*args: str, timeout: float = 240, threads: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polycl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, "POLYCL_THREADS": str(threads)})


def same_mask(a: Path, b: Path) -> bool:
    from polycl.io.volumes import read_mask

    first, second = read_mask(a), read_mask(b)
    return np.array_equal(first.array, second.array) and np.allclose(first.ijk_to_ras, second.ijk_to_ras)


@pytest.fixture(scope="module")
def cohort(data_dir, labeled_case, tmp_path_factory) -> Path:
    """Real CTs (whole totalseg_sm, dcmqi 3 slices, 8 slices of the 512x512 totalseg_dcm), the pelvis of a
    whole-body CT (no liver in view), a DICOM series folder and a corrupt file."""
    from test_liver_presence import canonical_crop
    from test_slicer_logic import crop

    from polycl.io.volumes import read_volume, write_volume

    folder = tmp_path_factory.mktemp("cohort")
    shutil.copy(data_dir / "labeled" / "totalseg_sm_ct.nii.gz", folder / "a_sm.nii.gz")
    shutil.copy(data_dir / "labeled" / "dcmqi_3slice_ct.nii.gz", folder / "b_dcmqi.nii.gz")
    wide, _ = labeled_case("totalseg_dcm")
    write_volume(folder / "c_wide.nrrd", *crop(wide.array, wide.ijk_to_ras, 8, 16))
    pelvis = canonical_crop(read_volume(data_dir / "unlabeled" / "totalseg_full_ct.nii.gz"), 0, 29)
    write_volume(folder / "d_pelvis.nii.gz", pelvis.array, pelvis.ijk_to_ras)
    series = folder / "e_series"
    series.mkdir()
    for dcm in sorted((data_dir / "dicom" / "dcmqi_3slice").glob("ct-3slice_*.dcm")):
        shutil.copy(dcm, series / dcm.name)
    (folder / "f_corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return folder


def test_batch_matches_segment_and_reports_a_broken_input(cohort, tmp_path):
    """Every good case's mask is voxel-identical to `polycl segment`'s (and a DICOM SEG made through a running
    scheduler, --scheduler, holds the same mask); the corrupt file is FAILED with the
    reader's message and the batch exits 1; the pelvis is 'no liver' with an empty mask; the DICOM series gets
    a DICOM SEG; each row names its worker and the torch threads it ran with: the 2 cores Dask gave it (Dask's
    nanny sets OMP_NUM_THREADS=1 in every worker; the warm-model plugin must set torch's threads)."""
    out = tmp_path / "out"
    env = {key: value for key, value in ENV.items() if key not in ("POLYCL_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-m", "polycl.cli", "batch", str(cohort), "-o", str(out), "--workers",
                           "2", "--threads-per-worker", "2", "--format", "nii.gz", "--format", "seg.nrrd",
                           "--no-progress"], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "5 of 6 processed, 0 skipped (outputs exist), 1 failed, 1 with no liver found" in done.stdout
    rows = summary_rows(out)
    assert rows["f_corrupt.nii.gz"]["status"] == "FAILED" and "not a readable" in rows["f_corrupt.nii.gz"]["warnings"]
    assert rows["d_pelvis.nii.gz"]["status"] == "no liver" and rows["d_pelvis.nii.gz"]["liver_ml"] == "0.0"
    assert "no liver found" in rows["d_pelvis.nii.gz"]["warnings"]
    assert "field of view" in rows["c_wide.nrrd"]["warnings"]  # the engine's notes reach the summary
    assert {row["status"] for name, row in rows.items() if name[0] in "abce"} == {"ok"}
    assert all(row["worker"].endswith("(2 threads)") and row["attempts"] == "1" for row in rows.values())
    for name, stem in (("a_sm.nii.gz", "a_sm"), ("c_wide.nrrd", "c_wide"), ("e_series", "e_series")):
        reference = tmp_path / f"{stem}_segment.nii.gz"
        # the workers' 2 threads: channels-last convolutions round differently per thread count (6 of 98 444
        # voxels of the DICOM series differ between 1 and 2 threads)
        single = polycl("segment", str(cohort / name), "-o", str(reference), threads=2)
        assert single.returncode == 0, single.stderr
        assert same_mask(out / f"{stem}_liver.nii.gz", reference), name
        assert same_mask(out / f"{stem}.seg.nrrd", reference), name
        assert float(rows[name]["liver_ml"]) > 0
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporaries, no attempt records left

    from distributed import Client, LocalCluster  # a running cluster: `--scheduler tcp://HOST:PORT`

    # 2 threads per worker, as the batch above: the DICOM SEG is compared with that batch's mask
    with LocalCluster(n_workers=2, threads_per_worker=2, resources={"polycl": 1}, dashboard_address=None) as running:
        with Client(running) as client:
            pids = {str(pid) for pid in client.run(os.getpid).values()}
        dicom = polycl("batch", str(cohort / "e_series"), "-o", str(out), "--format", "dcm", "--scheduler",
                       running.scheduler_address, "--no-progress", "--json")
    assert dicom.returncode == 0, dicom.stderr
    (row,) = json.loads(dicom.stdout)["cases"]
    assert row["status"] == "ok" and row["output"] == "e_series_liver.dcm"
    assert row["worker"].split()[0].rsplit(":", 1)[1] in pids  # one of that cluster's workers did it
    assert same_mask(out / "e_series_liver.dcm", out / "e_series_liver.nii.gz")  # DICOM SEG read back


def start_batch(cohort: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "polycl.cli", "batch", str(cohort), "-o", str(out),
                             "--workers", "2", "--threads-per-worker", "1", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True, preexec_fn=default_ctrl_c)


def default_ctrl_c() -> None:
    """SIGINT as in a terminal: a suite started in the background (``cmd &``) runs with SIGINT ignored, which a
    child inherits, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def long_cases(labeled_case, tmp_path_factory) -> Path:
    """Three real CTs that take a few seconds each (totalseg_sm tiled to 60 slices twice, and whole)."""
    from polycl.io.volumes import write_volume

    ct, _ = labeled_case("totalseg_sm")
    folder = tmp_path_factory.mktemp("long")
    for name, repeats in (("long1.nii.gz", 2), ("long2.nii.gz", 2), ("short.nii.gz", 1)):
        write_volume(folder / name, np.concatenate([ct.array] * repeats, axis=2), ct.ijk_to_ras)
    return folder


def test_a_worker_killed_mid_case_has_its_case_retried_and_nothing_lost(long_cases, tmp_path):
    """kill -9 of the worker that is segmenting a case: the case runs again on a worker, every output exists and
    equals `polycl segment`'s, summary.csv records 2 attempts for it, and no half-written file is left."""
    out = tmp_path / "out"
    batch = start_batch(long_cases, out)
    record = out / ".polycl-batch" / "long1.attempts"
    wait_for(lambda: record.exists() and record.read_text().strip())
    time.sleep(0.5)  # inside the case (reading the CT, loading the model, segmenting)
    pid = int(record.read_text().split()[-1].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = batch.communicate(timeout=240)
    assert batch.returncode == 0, stdout + stderr
    rows = summary_rows(out)
    assert rows["long1.nii.gz"]["attempts"] == "2" and rows["long1.nii.gz"]["status"] == "ok"
    assert "1 retried after a worker died" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["long1_liver.nii.gz", "long2_liver.nii.gz",
                                                     "short_liver.nii.gz", "summary.csv"]
    reference = tmp_path / "reference.nii.gz"
    assert polycl("segment", str(long_cases / "long1.nii.gz"), "-o", str(reference)).returncode == 0
    assert same_mask(out / "long1_liver.nii.gz", reference)


def test_ctrl_c_keeps_finished_cases_and_a_rerun_does_only_the_rest(long_cases, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) after the first output: exit 130, the
    finished outputs are complete, summary.csv lists the rest as 'not run'; the same command again segments
    only those, leaves the finished files untouched (same inode and mtime) and exits 0."""
    out = tmp_path / "out"
    batch = start_batch(long_cases, out)
    wait_for(lambda: any(out.glob("*_liver.nii.gz")))
    os.killpg(batch.pid, signal.SIGINT)
    stdout, stderr = batch.communicate(timeout=120)
    assert batch.returncode == 130, stdout + stderr
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*_liver.nii.gz")}
    rows = summary_rows(out)
    assert {row["status"] for row in rows.values()} <= {"ok", "not run"} and "not run" in str(rows)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.is_file()]
    rerun = start_batch(long_cases, out)
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stdout + stderr
    assert f"{3 - len(finished)} of 3 processed, {len(finished)} skipped" in stdout
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*_liver.nii.gz")
            if p.name in finished} == finished
    assert len(list(out.glob("*_liver.nii.gz"))) == 3
    assert {row["status"] for row in summary_rows(out).values()} <= {"ok", "skipped"}


def test_slurm_job_script_runs_one_case_per_worker_with_its_cores(monkeypatch):
    """dask-jobqueue's SLURM job script as `polycl batch --cluster slurm` makes it (nothing is submitted): 2
    worker processes of 4 threads each declaring the polycl resource, passive OpenMP threads, the partition,
    account, walltime and memory asked for; and the scheduler retries a dead worker's case `--retries` times."""
    pytest.importorskip("dask_jobqueue")
    from polycl.batch.cluster import jobqueue_cluster
    from polycl.cli.batch import cluster_from_args
    from polycl.cli.main import build_parser

    args = build_parser().parse_args(["batch", "in", "-o", "out", "--cluster", "slurm", "--jobs", "3", "--cores",
                                      "8", "--processes", "2", "--memory", "32GB", "--walltime", "04:00:00",
                                      "--queue", "short", "--account", "lab42", "--retries", "5"])
    options = cluster_from_args(args)
    assert options.system == "slurm" and options.jobs == 3
    with jobqueue_cluster(options.system, options.retries, **options.job) as cluster:
        script = cluster.job_script()
        assert cluster.scheduler.allowed_failures == 5
    for expected in ("#SBATCH -p short", "#SBATCH -A lab42", "#SBATCH -t 04:00:00", "#SBATCH --mem=30G",
                     "#SBATCH --cpus-per-task=8", "export OMP_WAIT_POLICY=PASSIVE", "--nworkers 2",
                     "--nthreads 4", "--resources polycl=1", "--memory-limit 14.90GiB"):
        assert expected in script, f"{expected!r} not in:\n{script}"


def test_local_cluster_size_follows_cpus_and_memory():
    from polycl.batch.cluster import GIB, local_size

    assert local_size(cpus=2, memory_bytes=24 * GIB) == (1, 2)  # workers of 2 threads (bench/batch.py)
    assert local_size(cpus=1, memory_bytes=24 * GIB) == (1, 1)
    assert local_size(cpus=32, memory_bytes=16 * GIB) == (4, 2)  # 4 GiB per worker
    assert local_size(workers=2, cpus=8, memory_bytes=64 * GIB) == (2, 4)
    assert local_size(threads_per_worker=1, cpus=8, memory_bytes=64 * GIB) == (8, 1)
    with pytest.raises(ValueError, match="at least 1"):
        local_size(workers=0, threads_per_worker=1, cpus=2, memory_bytes=GIB)


def test_a_case_whose_worker_died_every_time_is_failed_with_its_attempts(tmp_path):
    """Past --retries, Dask gives up with KilledWorker: the row is FAILED, says the worker died (killed or out
    of memory) and counts the attempts the workers recorded; the record is then removed."""
    from distributed.scheduler import KilledWorker

    from polycl.batch.cases import attempts_file, plan_cases
    from polycl.batch.runner import finished_row
    from polycl.batch.work import record_attempt

    (tmp_path / "big.nii.gz").write_bytes(b"")
    (case,) = plan_cases([tmp_path / "big.nii.gz"], tmp_path / "out", ["nii.gz"])
    for pid in (11, 12, 13):
        record_attempt(case, f"0@node:{pid}")

    class Future:
        def result(self):
            raise KilledWorker("polycl-case-0-big", "tcp://10.0.0.7:40000", 3)

    row = finished_row(case, Future())
    assert row.status == "FAILED" and row.attempts == "3" and "died on each of 3 attempts" in row.warnings
    assert "out of memory" in row.warnings and not attempts_file(case).exists()

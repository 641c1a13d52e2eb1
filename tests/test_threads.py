"""Threads that fit the machine (issue 25): the CPUs a process may use decide, not the host's core count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from polycl.threads import cgroup_cpu_quota, thread_count, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota():
    assert usable_cpus(affinity=set(range(64)), quota=2.0) == 2  # a 2-CPU container on a 64-core host
    assert usable_cpus(affinity=set(range(64)), quota=1.5) == 1  # rounded down: no thread beyond the quota
    assert usable_cpus(affinity=set(range(64)), quota=0.5) == 1
    assert usable_cpus(affinity={3, 5}, quota=8.0) == 2  # taskset / a SLURM allocation of 2 cores
    assert usable_cpus(affinity={3, 5}, quota=None) in (2, 2)


def test_thread_count_order_and_bad_values():
    assert thread_count(3, {"POLYCL_THREADS": "2", "OMP_NUM_THREADS": "1"}, usable=8) == 3
    assert thread_count(None, {"POLYCL_THREADS": "2", "OMP_NUM_THREADS": "1"}, usable=8) == 2
    assert thread_count(None, {"OMP_NUM_THREADS": "1"}, usable=8) == 1
    assert thread_count(None, {}, usable=8) == 8
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match="positive whole number"):
            thread_count(None, {"POLYCL_THREADS": bad}, usable=8)


def test_cli_applies_the_decision_before_torch_starts(tmp_path):
    code = ("import sys; from polycl.cli import main; import polycl.threads as t; "
            "t.usable_cpus = lambda *a, **k: 3; main(['sample', '--offline']); import polycl.inference, torch; "
            "print(torch.get_num_threads())")  # 3: what the process may use, not this machine's core count
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "POLYCL_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(ROOT / "PolyCLSlicer")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "3"
    env["POLYCL_THREADS"] = "0"
    done = subprocess.run([sys.executable, "-m", "polycl.cli", "info"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT / "PolyCLSlicer")})
    assert done.returncode == 2 and "POLYCL_THREADS='0' must be a positive whole number" in done.stderr


def test_the_worker_runs_with_passive_openmp_threads_unless_told_otherwise(monkeypatch):
    """bench/contention.py: two processes with spinning OpenMP threads took 3.15x as long as one alone, 1.15x
    with OMP_WAIT_POLICY=PASSIVE; the worker runs beside Slicer's threads and other workers."""
    sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
    from PolyCLSlicerLib.worker_client import WorkerClient

    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if preset is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", preset)
        client = WorkerClient(python=sys.executable, threads=1)
        try:
            pid = client.ensure_started().pid
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"OMP_WAIT_POLICY={expected}".encode() in environ
        finally:
            client.stop()


def test_command_line_openmp_threads_spin_briefly_unless_the_environment_says_otherwise():
    """bench/contention.py: GOMP_SPINCOUNT=10000 ran a lone segment as fast as libgomp's default and two at once
    at 1.65x instead of 2.02x; an explicit wait policy or spin count is left alone."""
    from polycl.threads import openmp_wait_defaults

    assert openmp_wait_defaults({}) == {"GOMP_SPINCOUNT": "10000"}
    assert openmp_wait_defaults({"OMP_WAIT_POLICY": "PASSIVE"}) == {}
    assert openmp_wait_defaults({"GOMP_SPINCOUNT": "0"}) == {}
    code = ("import os, sys\nfrom polycl.cli.main import main\nmain(sys.argv[1:])\n"
            "print('SPIN=' + os.environ.get('GOMP_SPINCOUNT', 'unset'))\n")
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT / "PolyCLSlicer")
    for argv, extra, expected in ((["info"], {}, "SPIN=10000"), (["info"], {"OMP_WAIT_POLICY": "ACTIVE"}, "SPIN=unset"),
                                  (["batch", "/no/such/folder", "-o", "/no/such/out"], {}, "SPIN=unset")):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                              env={**env, **extra})  # batch fails on its input, after the setting would be made
        assert expected in done.stdout, (argv, done.stdout[-200:], done.stderr[-400:])

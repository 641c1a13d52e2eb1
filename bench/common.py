"""Shared by the bench scripts: machine description, peak memory, the data folder."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))

from polycl.devices import cpu_supports_bf16  # noqa: E402
from polycl.nets.unet import InstanceNorm2d  # noqa: E402

CASES = ("totalseg_sm", "totalseg_dcm", "dcmqi_3slice")
EXTRA_CASES = ("chaos_ctset3", "totalsegds_s0009")  # labeled-extra/: whole liver; small field of view, partial liver


def labelled_files(data: Path, case: str) -> tuple[Path, Path]:
    """(CT, liver mask) of a labelled case: ``labeled/`` or, for EXTRA_CASES, ``labeled-extra/``."""
    folder = data / ("labeled-extra" if case in EXTRA_CASES else "labeled")
    return folder / f"{case}_ct.nii.gz", folder / f"{case}_liver.nii.gz"


def missed_and_false_pct(prediction, reference) -> tuple[float, float]:
    """(FN %, FP %): reference voxels the prediction missed and predicted voxels outside the reference, both in %
    of the reference's voxels."""
    predicted, liver = prediction > 0, reference > 0
    total = max(int(liver.sum()), 1)
    return 100.0 * int((liver & ~predicted).sum()) / total, 100.0 * int((predicted & ~liver).sum()) / total


def machine() -> str:
    """CPU model, cores, torch version and threads, bf16 support, current load."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"bf16 native: {cpu_supports_bf16()}; Python {platform.python_version()}; "
            f"load average {load[0]:.1f} {load[1]:.1f} at start")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def data_root(arg: str | os.PathLike | None = None) -> Path:
    """--data, else $POLYCL_DATA, else ../shared/data; exits with a message when none exists."""
    for candidate in (arg, os.environ.get("POLYCL_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    sys.exit("real CT data not found: pass --data or set POLYCL_DATA")


@contextlib.contextmanager
def torch_instance_norm():
    """The network as before issue 12: torch's instance_norm kernel instead of polycl's GroupNorm form."""
    fast = InstanceNorm2d.forward
    InstanceNorm2d.forward = torch.nn.InstanceNorm2d.forward
    try:
        yield
    finally:
        InstanceNorm2d.forward = fast

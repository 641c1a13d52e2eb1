"""Sample CT volumes: embedded in the package, from a local data folder, or downloaded with a SHA256 check.

The default sample ``totalseg_sm`` (CT + liver mask, TotalSegmentator test files, Apache-2.0; see
``sample_data/NOTICE.md``) ships inside the package, so it works offline on any machine.  Other
samples resolve: the user cache (checksum verified) -> a local data folder (``$POLYCL_DATA``, else
``../shared/data`` beside the repository or the working directory) -> download from the sample's URL
(atomic, checksum verified).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .base import atomic_write

REPOSITORY_ROOT = Path(__file__).resolve().parents[3]
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "sample_data"
DATA_ENV = "POLYCL_DATA"


@dataclass(frozen=True)
class Sample:
    name: str
    filename: str
    sha256: str
    description: str
    url: str | None = None  # None: only available from a local data folder
    local_path: str | None = None  # relative to the data folder
    label_path: str | None = None  # reference liver mask, relative to the data folder
    embedded: bool = False  # shipped in sample_data/ as <filename> and <name>_liver.nii.gz


SAMPLES: dict[str, Sample] = {
    sample.name: sample
    for sample in (
        Sample("totalseg_dcm", "totalseg_dcm_ct.nii.gz",
               "d0f08634bac2b47a94941890fc399141bf5e64228957b3dfa827116465369f5a",
               "20-slice abdominal CT through the liver, 512x512, 0.98x0.98x2 mm (TotalSegmentator test series)",
               local_path="labeled/totalseg_dcm_ct.nii.gz", label_path="labeled/totalseg_dcm_liver.nii.gz"),
        Sample("totalseg_sm", "totalseg_sm_ct.nii.gz",
               "68dd27de0963491c187781a6042cfdad1ee01788f888cdcb9fc1ce4ce5c6e381",
               "30-slice abdominal CT, 3 mm isotropic, with liver mask (TotalSegmentator test files, "
               "Apache-2.0; embedded, works offline)",
               local_path="labeled/totalseg_sm_ct.nii.gz", label_path="labeled/totalseg_sm_liver.nii.gz",
               embedded=True),
        Sample("dcmqi_3slice", "dcmqi_3slice_ct.nii.gz",
               "7e72a44ddd66ad89a4eacc2d3ca0c1bbb0d4720bfa57074ad6849dc1d52e8bb6",
               "3 liver CT slices (QIICR dcmqi test data)",
               local_path="labeled/dcmqi_3slice_ct.nii.gz", label_path="labeled/dcmqi_3slice_liver.nii.gz"),
        Sample("CTLiver", "CTLiver.nrrd",
               "e16eae0ae6fefa858c5c11e58f0f1bb81834d81b7102e021571056324ef6f37e",
               "Abdominal CT, Medical Segmentation Decathlon liver_100 (CC BY-SA 4.0), 3D Slicer sample data",
               url="https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/"
                   "e16eae0ae6fefa858c5c11e58f0f1bb81834d81b7102e021571056324ef6f37e"),
    )
}
DEFAULT_SAMPLE = "totalseg_sm"


def cache_dir() -> Path:
    """Per-user cache folder ($POLYCL_CACHE, else the platform's user cache dir)."""
    if os.environ.get("POLYCL_CACHE"):
        return Path(os.environ["POLYCL_CACHE"])
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("polycl"))
    except ImportError:
        return Path.home() / ".cache" / "polycl"


def data_dirs() -> list[Path]:
    """Candidate local data folders, in priority order (existing ones only)."""
    candidates = []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    candidates += [REPOSITORY_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return [path for path in dict.fromkeys(candidates) if path.is_dir()]


def data_dir() -> Path | None:
    """The first existing local data folder, or None."""
    found = data_dirs()
    return found[0] if found else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download to ``target`` atomically; the file appears only when its checksum matches."""

    def fetch(temp: Path) -> None:
        with open(temp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        actual = sha256_of(temp)
        if actual != sha256:
            raise ValueError(f"downloaded {url} has SHA256 {actual}, expected {sha256}; not kept")

    return atomic_write(target, fetch)


def fetch_sample(name: str = DEFAULT_SAMPLE, allow_download: bool = True) -> Path:
    """Local path of a sample CT (cache, local data folder, or download — in that order)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    sample = SAMPLES[name]
    if sample.embedded:
        embedded = EMBEDDED_DIR / sample.filename
        if sha256_of(embedded) != sample.sha256:
            raise ValueError(f"{embedded} does not match the checksum of sample {name}; reinstall polycl")
        return embedded
    cached = cache_dir() / sample.filename
    if cached.is_file() and sha256_of(cached) == sample.sha256:
        return cached
    for folder in data_dirs():
        if sample.local_path and (folder / sample.local_path).is_file():
            local = folder / sample.local_path
            if sha256_of(local) != sample.sha256:
                raise ValueError(f"{local} does not match the checksum of sample {name}")
            return local
    if sample.url is None:
        raise FileNotFoundError(
            f"sample {name} is only available from a local data folder; set ${DATA_ENV} to the folder "
            "holding labeled/ (e.g. ../shared/data)"
        )
    if not allow_download:
        raise FileNotFoundError(f"sample {name} is not cached and downloading is disabled")
    try:
        return download(sample.url, cached, sample.sha256)
    except OSError as error:
        raise FileNotFoundError(
            f"cannot download sample {name} ({error}); offline, use the embedded sample {DEFAULT_SAMPLE}"
        ) from None


def sample_label(name: str) -> Path | None:
    """Reference liver mask of an embedded or local sample, if any."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    sample = SAMPLES[name]
    if sample.embedded:
        return EMBEDDED_DIR / f"{sample.name}_liver.nii.gz"
    for folder in data_dirs():
        if sample.label_path and (folder / sample.label_path).is_file():
            return folder / sample.label_path
    return None

"""The module's sample data: a small abdominal CT with its reference liver, in Slicer's Sample Data module.

The files are published at ``SAMPLE_DATA_URL`` and are copies of ``labeled/totalseg_sm_*`` in the
project's data folder (``SAMPLE_LOCAL``); the checksums are SampleData's ``SHA256:<hex>`` notation.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_URL = "https://github.com/PolyCLSlicer/SlicerPolyCL"  # publishing repository (index: name starts Slicer)
SAMPLE_DATA_URL = f"{PROJECT_URL}/releases/download/sample-data-v1"
SAMPLE_NAME = "PolyCLLiverCT"
SAMPLE_CT = ("PolyCLLiverCT.nii.gz", "SHA256:68dd27de0963491c187781a6042cfdad1ee01788f888cdcb9fc1ce4ce5c6e381")
SAMPLE_LIVER = ("PolyCLLiverCT_liver.nii.gz", "SHA256:0700c3e4ab7acf8a979ebfeb1b4858737aa8995538e4ce31b8e9b16d71697c9f")
SAMPLE_LOCAL = {SAMPLE_CT[0]: "labeled/totalseg_sm_ct.nii.gz", SAMPLE_LIVER[0]: "labeled/totalseg_sm_liver.nii.gz"}
THUMBNAIL = Path(__file__).resolve().parent.parent / "Resources" / "Icons" / "PolyCLSlicer.png"


def register() -> None:
    """Register the sample CT (+ reference liver segmentation) in the Sample Data module, category PolyCL."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PolyCL",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(THUMBNAIL),
        uris=[f"{SAMPLE_DATA_URL}/{SAMPLE_CT[0]}", f"{SAMPLE_DATA_URL}/{SAMPLE_LIVER[0]}"],
        fileNames=[SAMPLE_CT[0], SAMPLE_LIVER[0]],
        checksums=[SAMPLE_CT[1], SAMPLE_LIVER[1]],
        nodeNames=[SAMPLE_NAME, f"{SAMPLE_NAME} reference"],
        loadFileTypes=["VolumeFile", "SegmentationFile"],
    )


def sha256(path: str | os.PathLike) -> str:
    """Checksum in Slicer's SampleData notation (``SHA256:<hex>``)."""
    from polycl.io.samples import sha256_of

    return f"SHA256:{sha256_of(Path(path))}"


def local_files(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(CT, liver mask) copies of the sample in the project's data folder."""
    root = Path(data_dir)
    return root / SAMPLE_LOCAL[SAMPLE_CT[0]], root / SAMPLE_LOCAL[SAMPLE_LIVER[0]]

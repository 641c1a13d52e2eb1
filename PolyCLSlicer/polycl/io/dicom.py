"""DICOM series folders: find the image series, pick one, refuse series with missing slices.

GDCM (through SimpleITK) groups the files of a folder by series.  Non-image series (SEG, RTSTRUCT,
SR, ...) are skipped; several image series need an explicit choice (``series`` = 1-based number or
SeriesInstanceUID, ``polycl segment --series``); a gap in the slice positions is refused, because ITK
would spread the remaining slices evenly over the gap and every voxel beyond it would sit at the
wrong place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

POSITION, ORIENTATION = "0020|0032", "0020|0037"
GAP_FACTOR = 1.5  # a step this many times the median slice step means missing slices


class DicomSeriesError(ValueError):
    """The folder holds no usable image series, several, or a series with missing slices."""


@dataclass
class Series:
    uid: str
    files: list[str]
    modality: str
    description: str
    is_image: bool

    def label(self, number: int) -> str:
        description = f" {self.description!r}" if self.description else ""
        files = f"{len(self.files)} file{'' if len(self.files) == 1 else 's'}"
        return f"[{number}] {self.modality or '?'}{description}, {files}, UID {self.uid or '(empty)'}"


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def list_series(folder: Path) -> list[Series]:
    """Every series GDCM finds in ``folder`` (not recursive), image series first."""
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        modality = _tag(reader, "0008|0060")
        is_image = bool(_tag(reader, POSITION)) and modality not in ("SEG", "RTSTRUCT", "SR", "PR", "KO", "REG")
        series.append(Series(uid, files, modality, _tag(reader, "0008|103e"), is_image))
    return sorted(series, key=lambda s: not s.is_image)


def choose_series(folder: Path, series: str | int | None = None) -> Series:
    """The image series to read: the only one, or the one ``series`` names (1-based number or UID)."""
    found = list_series(folder)
    images = [s for s in found if s.is_image]
    if not images:
        others = "; ".join(f"{s.modality} {s.description!r}" for s in found) or "no DICOM files"
        raise DicomSeriesError(f"{folder}: folder holds no DICOM image series ({others}); "
                               "point at the folder of the CT series")
    listing = "; ".join(s.label(n) for n, s in enumerate(images, 1))
    if series is None or str(series) == "":
        if len(images) > 1:
            raise DicomSeriesError(f"{folder}: folder holds {len(images)} DICOM image series: {listing}; "
                                   "choose one with --series NUMBER or --series UID")
        return images[0]
    text = str(series).strip()
    if text.isdigit() and 1 <= int(text) <= len(images):
        return images[int(text) - 1]
    matches = [s for s in images if s.uid == text]
    if not matches:
        raise DicomSeriesError(f"{folder}: no image series {text!r}; the folder holds {listing}")
    return matches[0]


def read_series(folder: Path, series: str | int | None = None) -> sitk.Image:
    """Read one image series as a 3D image after checking its slice positions are evenly spaced."""
    chosen = choose_series(folder, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(chosen.files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    if len(chosen.files) >= 3:
        positions = [reader.GetMetaData(i, POSITION) if reader.HasMetaDataKey(i, POSITION) else ""
                     for i in range(len(chosen.files))]
        orientation = reader.GetMetaData(0, ORIENTATION) if reader.HasMetaDataKey(0, ORIENTATION) else ""
        check_slice_positions(folder, positions, orientation)
    return image


def _numbers(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.replace(" ", "").split("\\") if v], float)


def check_slice_positions(folder: Path, positions: list[str], orientation: str) -> None:
    """Refuse a series whose slice positions along the slice normal have gaps or duplicates."""
    try:
        cosines = _numbers(orientation)
        points = np.array([_numbers(p) for p in positions])
    except ValueError:
        return
    if cosines.shape != (6,) or points.ndim != 2 or points.shape[1] != 3:
        return
    normal = np.cross(cosines[:3], cosines[3:])
    along = np.sort(points @ normal)
    steps = np.diff(along)
    step = float(np.median(steps))
    if step <= 1e-6:
        raise DicomSeriesError(f"{folder}: several slices share one position; the folder mixes series or "
                               "holds duplicates; export the series alone")
    bad = np.flatnonzero((steps > GAP_FACTOR * step) | (steps < step / GAP_FACTOR))
    if bad.size:
        first = int(bad[0])
        raise DicomSeriesError(
            f"{folder}: slices missing in the series: a {steps[first]:.2f} mm step between positions "
            f"{along[first]:.2f} and {along[first + 1]:.2f} mm where the spacing is {step:.2f} mm "
            f"({bad.size} irregular step(s)); export the complete series"
        )

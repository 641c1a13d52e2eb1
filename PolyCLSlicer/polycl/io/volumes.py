"""Reading and writing volumes and masks through SimpleITK: NIfTI, NRRD / .seg.nrrd, MHA, DICOM series
folders and DICOM SEG (the volume type and atomic writing live in ``io.base``)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .base import (
    MASK_SUFFIXES,
    Volume,
    VolumeReadError,
    atomic_write,
    binary_uint8,
    ijk_to_ras_from_image,
    image_from_array,
    native_stderr,
)
from .dicom import DicomSeriesError
from .integrity import IncompleteFileError, check_axes, check_complete


def _read_image(path: Path, series: str | int | None = None) -> sitk.Image:
    if path.is_dir():
        from .cases import VOLUME_SUFFIXES
        from .dicom import read_series

        files = [child for child in path.iterdir() if child.is_file() and not child.name.startswith(".")]
        volumes = [child for child in files if child.name.lower().endswith(VOLUME_SUFFIXES)]
        if volumes and len(volumes) == len(files):  # nothing else: no DICOM file (they may have no extension)
            raise VolumeReadError(f"{path}: a folder of {len(volumes)} volume file(s), not a DICOM series; give one "
                                  "file, or segment them all with PolyCLSlicer/Scripts/batch.py --input FOLDER")

        return read_series(path, series)
    check_complete(path)
    return sitk.ReadImage(str(path))


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN into 0; read float NIfTI data with nibabel to catch it."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise VolumeReadError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them first")


READ_ERRORS = (  # (pattern in ITK's message or its stderr output, what to tell the user)
    (r"fread got only|expected \d+ bytes but received|data not read completely|unexpected end of file",
     "the file is truncated (an interrupted download or copy?); re-download or re-export it"),
    (r"couldn't open .* for reading|Cannot open data file",
     "its data file is missing; keep the data file (.raw / .zraw) beside the header"),
    (r"Unable to determine ImageIO reader", "not a readable image (unknown format or corrupt file); "
     "expected NIfTI, NRRD, MHA or a DICOM series folder"),
    (r"Zero-valued spacing|spacing \(0\) invalid", "voxel spacing in the header is zero; fix the header's spacing"),
    (r"Bad direction, determinant is 0|No orthonormal definition",
     "direction matrix in the header is singular or not orthonormal; fix the header's geometry"),
)


def explain_read_error(path: Path, text: str) -> str:
    """One-line reason for an ITK read failure (its message + what it printed)."""
    for pattern, reason in READ_ERRORS:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return f"{path}: {reason}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{path}: cannot read as an image ({lines[-1] if lines else 'unreadable'})"


def read_volume(path: str | os.PathLike, series: str | int | None = None) -> Volume:
    """Read a 3D scalar volume (file or DICOM series folder) as [i, j, k] array + IJK->RAS.

    ``series`` picks one image series of a DICOM folder holding several (1-based number or UID).
    Broken files (truncated, missing data file, degenerate geometry) raise VolumeReadError.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: no such file or folder")
    try:
        with native_stderr() as printed:
            image = _read_image(path, series)
    except (IncompleteFileError, DicomSeriesError) as error:
        raise VolumeReadError(str(error)) from None
    except RuntimeError as error:
        raise VolumeReadError(explain_read_error(path, f"{error}\n{''.join(printed)}")) from None
    if "".join(printed).strip():
        warnings.warn(f"{path}: reader said: {''.join(printed).strip().splitlines()[-1]}", stacklevel=2)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector);"
            " a CT must be a single-channel scalar volume"
        )
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise VolumeReadError(
            f"{path}: is {image.GetDimension()}D with size {image.GetSize()}; a 3D CT volume is required"
        )
    if min(image.GetSize()) < 1:
        raise VolumeReadError(f"{path}: has a zero-size dimension (size {image.GetSize()}); it holds no voxels")
    matrix = ijk_to_ras_from_image(image)
    try:
        check_axes(matrix[:3, :3], f"{path}: direction matrix")
    except IncompleteFileError as error:
        raise VolumeReadError(str(error)) from None
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    if np.issubdtype(array.dtype, np.floating) and path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_finite(path)
    return Volume(array=array, ijk_to_ras=matrix, source=str(path))


def write_volume(path: str | os.PathLike, array: np.ndarray, ijk_to_ras: np.ndarray, compress: bool = True) -> Path:
    """Write an [i, j, k] array on the given grid; the file appears atomically (temp + rename).

    ``compress=False`` writes raw data (fast hand-over between processes of one session).
    """
    path = Path(path)
    if not path.name.lower().endswith(MASK_SUFFIXES):
        raise ValueError(f"{path}: unsupported output extension; use one of {', '.join(MASK_SUFFIXES)}")
    if np.asarray(array).ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {np.shape(array)}")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = image_from_array(array, ijk_to_ras)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    atomic_write(path, lambda temp: sitk.WriteImage(image, str(temp), useCompression=compress), suffix=suffix)
    return path


def write_mask(path: str | os.PathLike, mask: np.ndarray, ijk_to_ras: np.ndarray, compress: bool = True) -> Path:
    """Write a binary mask (uint8 0/1) on exactly the given grid; ``.seg.nrrd`` gets a Liver segment."""
    if str(path).lower().endswith(".seg.nrrd"):
        from .seg_nrrd import write_segmentation

        return write_segmentation(path, mask, ijk_to_ras, compress=compress)
    return write_volume(path, binary_uint8(mask), ijk_to_ras, compress)


def read_mask(path: str | os.PathLike, reference: Volume | None = None, label: int | None = None) -> Volume:
    """Read a liver mask as binary 0/1; check it lies on the reference grid if given.

    Any single non-zero value is the liver (0/1, 0/255).  A file holding several label values needs
    ``label`` (the liver's value), or a .seg.nrrd with exactly one segment named like 'liver';
    otherwise it is refused rather than guessed.  A DICOM SEG file gives its liver segment, placed on the
    reference grid by its frames' positions (``polycl.io.dicom_seg``).
    """
    from .dicom_seg import is_dicom_seg, read_dicom_seg

    if is_dicom_seg(path):
        volume = read_dicom_seg(path, reference)
        if reference is not None:
            check_same_grid(volume, reference, what=f"{path}")
        return volume
    volume = read_volume(path)
    array = volume.array
    if label is None:
        values = np.unique(array[array != 0])
        if values.size > 1:
            label = _liver_label_from_segments(Path(path))
            if label is None:
                listed = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
                raise VolumeReadError(
                    f"{path}: holds {values.size} label values ({listed}) and none is named liver; save the "
                    "liver alone as a 0/1 mask (or name its segment 'Liver' in a .seg.nrrd)")
    volume.array = (array != 0 if label is None else array == label).astype(np.uint8)
    if reference is not None:
        check_same_grid(volume, reference, what=f"{path}")
    return volume


def _liver_label_from_segments(path: Path) -> int | None:
    """The label value of the one segment named like 'liver' in a .seg.nrrd header, else None."""
    if not path.name.lower().endswith(".nrrd"):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    found = []
    for key in reader.GetMetaDataKeys():
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if match and "liver" in reader.GetMetaData(key).lower():
            value_key = f"Segment{match.group(1)}_LabelValue"
            if reader.HasMetaDataKey(value_key):
                found.append(int(reader.GetMetaData(value_key)))
    return found[0] if len(found) == 1 else None


def check_same_grid(volume: Volume, reference: Volume, what: str = "mask", tol_mm: float = 1e-3) -> None:
    """Raise when two volumes do not share shape and IJK->RAS."""
    if volume.array.shape != reference.array.shape:
        raise ValueError(f"{what}: shape {volume.array.shape} differs from the image's {reference.array.shape}")
    if not np.allclose(volume.ijk_to_ras, reference.ijk_to_ras, atol=tol_mm):
        raise ValueError(f"{what}: geometry (IJK->RAS) differs from the image's; resample it onto the image grid")

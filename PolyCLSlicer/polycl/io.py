"""Volume I/O through SimpleITK: NIfTI, NRRD / .seg.nrrd, MHA and DICOM series folders.

Convention of the whole core package: a volume is an array indexed ``[i, j, k]`` plus a 4x4
IJK->RAS matrix (direction x spacing, origin).  SimpleITK works in LPS and returns arrays in
``[k, j, i]`` order; this module is the only place that translates.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MASK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


class VolumeReadError(ValueError):
    """The file or folder cannot be read as a 3D scalar volume."""


@dataclass
class Volume:
    """A 3D scalar array indexed [i, j, k] and its IJK->RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    source: str = ""

    @property
    def spacing(self) -> np.ndarray:
        return voxel_spacing(self.ijk_to_ras)


def voxel_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Spacing in mm along i, j, k (column norms of the matrix)."""
    return np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)


def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """4x4 IJK->RAS of a 3D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), float)[None, :]
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix


def image_from_array(array: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """SimpleITK image (LPS) from an [i, j, k] array and its IJK->RAS matrix."""
    validate_matrix(ijk_to_ras)
    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, float)
    spacing = voxel_spacing(ijk_to_lps)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing[None, :]).ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


def validate_matrix(ijk_to_ras: np.ndarray) -> None:
    """Reject matrices that cannot describe a voxel grid."""
    matrix = np.asarray(ijk_to_ras, float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"IJK->RAS must be a finite 4x4 matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise ValueError("IJK->RAS matrix is singular (zero spacing or degenerate directions)")


def _read_image(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise VolumeReadError(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            raise VolumeReadError(
                f"{path}: folder holds {len(series)} DICOM series; point at a folder with one series"
            )
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN into 0; read float NIfTI data with nibabel to catch it."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise VolumeReadError(f"{path}: {bad} voxels are NaN or infinite; fix or mask them first")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar volume (file or DICOM series folder) as [i, j, k] array + IJK->RAS."""
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: no such file or folder")
    try:
        image = _read_image(path)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise VolumeReadError(f"{path}: cannot read as an image ({first_line})") from None
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
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    if np.issubdtype(array.dtype, np.floating) and path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_finite(path)
    return Volume(array=array, ijk_to_ras=ijk_to_ras_from_image(image), source=str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Call ``write(temp_path)`` beside ``path``, then rename it over ``path``.

    Readers never see a partial file and a failed or interrupted write leaves the old file intact.
    ``suffix`` is the temporary file's extension (writers that pick the format from it need it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp_name))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def write_volume(path: str | os.PathLike, array: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write an [i, j, k] array on the given grid; the file appears atomically (temp + rename)."""
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
    atomic_write(path, lambda temp: sitk.WriteImage(image, str(temp), useCompression=True), suffix=suffix)
    return path


def write_mask(path: str | os.PathLike, mask: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write a binary mask (uint8 0/1) on exactly the given grid."""
    return write_volume(path, (np.asarray(mask) > 0).astype(np.uint8), ijk_to_ras)


def read_mask(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read a label volume as a binary mask; check it lies on the reference grid if given."""
    volume = read_volume(path)
    volume.array = (volume.array > 0).astype(np.uint8)
    if reference is not None:
        check_same_grid(volume, reference, what=f"{path}")
    return volume


def check_same_grid(volume: Volume, reference: Volume, what: str = "mask", tol_mm: float = 1e-3) -> None:
    """Raise when two volumes do not share shape and IJK->RAS."""
    if volume.array.shape != reference.array.shape:
        raise ValueError(f"{what}: shape {volume.array.shape} differs from the image's {reference.array.shape}")
    if not np.allclose(volume.ijk_to_ras, reference.ijk_to_ras, atol=tol_mm):
        raise ValueError(f"{what}: geometry (IJK->RAS) differs from the image's; resample it onto the image grid")

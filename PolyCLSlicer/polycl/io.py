"""Volume I/O through SimpleITK: NIfTI, NRRD / .seg.nrrd, MHA and DICOM series folders.

Convention of the whole core package: a volume is an array indexed ``[i, j, k]`` plus a 4x4
IJK->RAS matrix (direction x spacing, origin).  SimpleITK works in LPS and returns arrays in
``[k, j, i]`` order; this module is the only place that translates.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicom import DicomSeriesError
from .integrity import IncompleteFileError, check_axes, check_complete

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


def _read_image(path: Path, series: str | int | None = None) -> sitk.Image:
    if path.is_dir():
        from .dicom import read_series

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


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Collect what C++ code (ITK, MetaIO, GDCM, NIfTI) prints on file descriptor 2 meanwhile.

    Yields a list that holds the captured text afterwards; with no usable fd 2 it stays empty.  fd 2 is
    process-wide, so only the main thread redirects it (two threads swapping it could lose stderr).
    """
    captured: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield captured
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


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


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work, an output that could not be written or would destroy an input.

    Checks: not one of ``inputs``; not an existing non-file (folder, device such as /dev/full); its
    directory exists and accepts a new file (probed by creating one, so it also holds for root on a
    read-only file system).
    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise ValueError(f"{path}: the output would replace the input {source}; choose another output name")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: exists and is not a regular file; choose a file name for the output")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: the output folder does not exist; create it first or choose another")
    try:
        handle, probe = tempfile.mkstemp(prefix=".polycl-probe.", dir=parent)
    except OSError as error:
        raise PermissionError(f"{parent}: cannot write in the output folder ({error.strerror or error}); "
                              "choose a writable folder") from None
    os.close(handle)
    os.unlink(probe)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _create_temp_file(folder: Path, prefix: str, suffix: str) -> str:
    """A new empty file in ``folder`` with the permissions of any new file (0666 minus the umask).

    ``tempfile.mkstemp`` creates 0600 files; reading the umask to widen them means setting it, which
    races with other threads creating files.  Opening with mode 0666 lets the kernel apply it.
    """
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: cannot create a temporary file")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Call ``write(temp_path)`` beside ``path``, then rename it over ``path``.

    Readers never see a partial file and a failed or interrupted write leaves the old file intact.
    ``suffix`` is the temporary file's extension (writers that pick the format from it need it).
    A volume format's temp file is checked complete before the rename (ITK writes truncated NIfTI /
    NRRD files on a full disk without raising); write failures become one OSError saying so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = _create_temp_file(path.parent, f".{path.name}.", suffix)
    try:
        try:
            with native_stderr():  # ITK prints write errors (e.g. "NWAD: wrote only ...") and goes on
                write(Path(temp_name))
            check_complete(Path(temp_name))
        except IncompleteFileError:
            raise OSError(f"{path}: writing failed, the file came out incomplete (disk full?); "
                          "nothing was written") from None
        except (OSError, RuntimeError) as error:
            if type(error).__name__ == "Cancelled":
                raise
            reason = " ".join(str(error).split())[-160:] or type(error).__name__
            raise OSError(f"{path}: writing failed ({reason}); nothing was written; "
                          "check free disk space and permissions") from None
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


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
    return write_volume(path, (np.asarray(mask) > 0).astype(np.uint8), ijk_to_ras, compress)


def read_mask(path: str | os.PathLike, reference: Volume | None = None, label: int | None = None) -> Volume:
    """Read a liver mask as binary 0/1; check it lies on the reference grid if given.

    Any single non-zero value is the liver (0/1, 0/255).  A file holding several label values needs
    ``label`` (the liver's value), or a .seg.nrrd with exactly one segment named like 'liver';
    otherwise it is refused rather than guessed.  A DICOM SEG file gives its liver segment, placed on the
    reference grid by its frames' positions (``polycl.dicom_seg``).
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

"""The volume type, grid helpers and atomic file writing shared by every reader and writer.

Convention of the whole core package: a volume is an array indexed ``[i, j, k]`` plus a 4x4
IJK->RAS matrix (direction x spacing, origin).  SimpleITK works in LPS and returns arrays in
``[k, j, i]`` order; ``io`` is the only place that translates.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..geometry import voxel_spacing
from ..masks import is_binary
from .integrity import IncompleteFileError, check_complete

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



def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """4x4 IJK->RAS of a 3D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), float)[None, :]
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix



def binary_uint8(mask: np.ndarray) -> np.ndarray:
    """A mask as uint8 0/1: itself when it already is (the masks polycl makes), else one copy."""
    mask = np.asarray(mask)
    return mask if mask.dtype == np.uint8 and is_binary(mask) else np.greater(mask, 0).view(np.uint8)


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

"""Finding CT volumes and their label files by name: the one rule ``pretrain`` and ``finetune`` share.

A case ``name`` is stored as ``name_ct.nii.gz`` (or ``_0000`` / ``_image``, or no marker) beside
``name_liver.nii.gz`` (or ``_label(s)`` / ``_mask`` / ``_seg``, or ``.seg.nrrd``).  Folders expand to
their CT files (label files skipped) or, when they hold DICOM files, to one DICOM series folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_MARKERS = ("_liver", "_label", "_labels", "_mask", "_seg")
CT_MARKERS = ("_ct", "_0000", "_image")


class CaseDiscoveryError(ValueError):
    """No usable volumes under the given paths."""


def strip_suffix(name: str) -> str:
    """File name without its volume extension (``.seg.nrrd`` included)."""
    lower = name.lower()
    for suffix in (".seg.nrrd",) + VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name(path: str | os.PathLike) -> str:
    """``totalseg_sm_ct.nii.gz`` and ``totalseg_sm_liver.nii.gz`` -> ``totalseg_sm``; a DICOM folder -> its name."""
    stem = strip_suffix(Path(path).name)
    for marker in CT_MARKERS + LABEL_MARKERS:
        if stem.lower().endswith(marker):
            return stem[: -len(marker)]
    return stem


def is_label_file(path: str | os.PathLike) -> bool:
    """Whether a file name marks a label volume (``_liver``, ``_mask``, ... or ``.seg.nrrd``)."""
    name = Path(path).name.lower()
    return name.endswith(".seg.nrrd") or strip_suffix(name).endswith(LABEL_MARKERS)


def is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES) and not path.name.startswith(".")


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: Path) -> bool:
    """A folder holding DICOM files (``.dcm`` or files with the DICM preamble; first 20 files checked)."""
    if not path.is_dir():
        return False
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")][:20]
    return any(_is_dicom_file(p) for p in files)


def _expand(paths: Iterable[str | os.PathLike], from_folder: Callable[[Path], list[Path]], what: str) -> list[Path]:
    """Files as given, folders through ``from_folder``; resolved, without repeats; an error when none is found."""
    paths = list(paths)
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CaseDiscoveryError(f"{path}: no such file or folder")
        found.extend([path] if path.is_file() else from_folder(path))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise CaseDiscoveryError(f"no {what} found in {', '.join(str(p) for p in paths)}")
    return unique


def _ct_volumes_in(folder: Path) -> list[Path]:
    """A folder's volume files except label files; else the folder itself or its subfolders as DICOM series."""
    files = sorted(p for p in folder.iterdir() if is_volume_file(p) and not is_label_file(p))
    if files:
        return files
    if is_dicom_folder(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if is_dicom_folder(p))


def _label_volumes_in(folder: Path) -> list[Path]:
    """A folder's label files, or all its volume files if none is marked as a label."""
    volumes = sorted(p for p in folder.iterdir() if is_volume_file(p) or p.name.lower().endswith(".seg.nrrd"))
    return [p for p in volumes if is_label_file(p)] or volumes


def find_volumes(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into CT volumes (volume files except label files; DICOM folders)."""
    return _expand(paths, _ct_volumes_in, "CT volumes")


def find_label_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Label volumes: files as given; a folder gives its label files, or all its volume files if none is marked."""
    return _expand(paths, _label_volumes_in, "label volumes")


def _ct_volumes_and_series_in(folder: Path) -> list[Path]:
    """A folder's CT volume files and DICOM series subfolders, or the folder itself when it holds DICOM files."""
    if is_dicom_folder(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if (is_volume_file(p) and not is_label_file(p))
                  or (not p.name.startswith(".") and is_dicom_folder(p)))


def find_ct_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Like :func:`find_volumes`, but a folder gives its CT files and its DICOM series subfolders together
    (a cohort folder mixing both, as ``polycl batch`` takes it)."""
    return _expand(paths, _ct_volumes_and_series_in, "CT volumes")

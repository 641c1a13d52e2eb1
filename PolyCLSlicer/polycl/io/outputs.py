"""A liver mask written to every file a user asked for: mask volumes (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``,
``.mha``), DICOM SEG (``.dcm``, referencing the input series) and the overlay PNG; each file atomically.
``polycl segment``, ``propagate`` and ``polycl batch`` write through here."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import Volume

DICOM_SUFFIXES = (".dcm",)


def wants_dicom_seg(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path).lower().endswith(DICOM_SUFFIXES)


def write_liver_outputs(targets: Sequence[str | os.PathLike], volume: Volume, mask: np.ndarray, *,
                        algorithm: str, version: str, dicom_source: list[str] | None = None,
                        overlay: str | os.PathLike | None = None, name: str = "", automatic: bool = True
                        ) -> tuple[list[str], list[str]]:
    """Write ``mask`` to each target (format from its suffix) and the overlay; (paths written, notes of the
    DICOM SEG writer such as UIDs generated for a series without them)."""
    from .volumes import write_mask

    written, notes = [], []
    for target in targets:
        if wants_dicom_seg(target):
            from .dicom_seg import write_dicom_seg

            if dicom_source is None:
                raise ValueError(f"{target}: a DICOM SEG needs the files of the input DICOM series")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                write_dicom_seg(target, mask, volume.ijk_to_ras, dicom_source, algorithm, version, automatic)
            notes.extend(dict.fromkeys(str(warning.message) for warning in caught))
        else:
            write_mask(target, mask, volume.ijk_to_ras)
        written.append(str(target))
    if overlay:
        from .overlay import liver_caption, write_overlay

        caption = liver_caption(name or Path(str(volume.source).rstrip("/")).name, mask, volume.ijk_to_ras)
        write_overlay(overlay, volume.array, mask, volume.ijk_to_ras, caption)
        written.append(str(overlay))
    return written, notes

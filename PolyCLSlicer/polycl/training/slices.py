"""Training slices from (CT, mask) pairs: canonical, windowed, resized or field-of-view resampled."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..field_of_view import FieldOfView
from ..geometry import CanonicalOrientation
from ..io.base import Volume
from ..io.volumes import check_same_grid
from ..nets.unet25d import stack_context
from ..preprocessing import middle_slices, resize_slices, validate_ct, window


@dataclass
class SliceSet:
    """Windowed slices (N, 1, S, S), masks (N, 1, S, S) and the scan index of each slice."""

    images: torch.Tensor
    masks: torch.Tensor
    scan_ids: np.ndarray



def slices_from_pairs(pairs: list[tuple[Volume, Volume]], size: int, middle_fraction: float | None = None,
                      keep: list[list[int]] | None = None, context: int = 1,
                      field_of_view_mm: float | None = None) -> SliceSet:
    """Canonical, windowed, resized slices of every (CT, mask) pair (only canonical slices ``keep[scan]``);
    with ``context`` > 1 each image holds its adjacent CT slices as channels (``polycl.nets.unet25d``), taken from
    the whole CT even where they are not kept themselves.  With ``field_of_view_mm`` each scan's square of
    that many mm around its body is resampled to ``size`` (``polycl.field_of_view``), else the whole slice."""
    if keep is not None and len(keep) != len(pairs):
        raise ValueError(f"{len(keep)} lists of training slices for {len(pairs)} scans")
    images, masks, scan_ids = [], [], []
    for scan, (ct, label) in enumerate(pairs):
        for note in validate_ct(ct.array, ct.source or f"scan {scan}"):
            warnings.warn(note, stacklevel=2)
        check_same_grid(label, ct, what=f"label of {ct.source or f'scan {scan}'}")
        orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
        ct_slices = orientation.to_canonical(ct.array)
        label_slices = orientation.to_canonical(label.array) > 0
        rows = np.arange(len(ct_slices))
        if middle_fraction:
            rows = rows[middle_slices(len(ct_slices), middle_fraction)]
        if keep is not None:
            rows = rows[keep[scan]]
        image = window(torch.from_numpy(stack_context(ct_slices, rows, context).astype(np.float32)))
        mask = torch.from_numpy(np.ascontiguousarray(label_slices[rows], np.float32))[:, None]
        if field_of_view_mm:
            view = FieldOfView.of_volume(ct_slices, ct.ijk_to_ras, orientation, field_of_view_mm)
            images.append(view.to_network(image, size, rows))
            masks.append((view.to_network(mask, size, rows, mode="nearest") > 0.5).float())
        else:
            images.append(resize_slices(image, size))
            masks.append((resize_slices(mask, size, mode="nearest") > 0.5).float())
        scan_ids.append(np.full(len(rows), scan))
    return SliceSet(torch.cat(images), torch.cat(masks), np.concatenate(scan_ids))

"""Binary mask post-processing: bounding box and largest connected component (ITK, no scipy)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every non-zero voxel; None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)



def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest fully connected (26 in 3D) component of a binary mask, as bool.

    Labelled by ITK (multi-threaded, no scipy import) inside the mask's bounding box only: a liver
    fills a small part of a CT, so most of the volume is never scanned.
    """
    mask = np.asarray(mask) != 0
    box = bounding_box(mask)
    if box is None:
        return mask
    crop = sitk.GetImageFromArray(np.ascontiguousarray(mask[box], np.uint8))
    by_size = sitk.RelabelComponent(sitk.ConnectedComponent(crop, True), 0, True)  # label 1: the largest
    kept = np.zeros_like(mask)
    kept[box] = sitk.GetArrayFromImage(by_size == 1) != 0
    return kept

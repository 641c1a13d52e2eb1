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



def is_binary(mask: np.ndarray) -> bool:
    """True for a bool mask or a uint8 one holding only 0 and 1 (the masks polycl makes): usable as bool."""
    return mask.dtype == bool or (mask.dtype == np.uint8 and int(mask.max(initial=0)) <= 1)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest fully connected (26 in 3D) component of a binary mask, as bool.

    Labelled by ITK (multi-threaded, no scipy import) inside the mask's bounding box only: a liver
    fills a small part of a CT, so most of the volume is never scanned.  The component sizes are counted
    on the label image in place (no relabelled copy: 4 bytes per voxel of the box less at the peak).  A bool
    mask that is one component already comes back as it is (callers read it, never write it in place).
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:  # a bool mask is used as it is: no volume-sized copy
        mask = mask != 0
    box = bounding_box(mask)
    if box is None:
        return np.zeros_like(mask)
    crop = mask[box]
    labeller = sitk.ConnectedComponentImageFilter()
    labeller.FullyConnectedOn()
    image = labeller.Execute(sitk.GetImageFromArray(crop.view(np.uint8)))
    if labeller.GetObjectCount() == 1:
        return mask  # one component already: nothing to remove, no volume-sized copy
    labels = sitk.GetArrayViewFromImage(image)  # no copy of the uint32 labels; valid while ``image`` lives
    sizes = np.zeros(labeller.GetObjectCount() + 1, np.int64)
    for start in range(0, len(labels), 16):  # the mask's voxels only, in slabs: no full-volume int64 copy
        sizes += np.bincount(labels[start:start + 16][crop[start:start + 16]], minlength=len(sizes))
    kept = np.zeros_like(mask)
    np.equal(labels, np.argmax(sizes[1:]) + 1, out=kept[box])
    return kept

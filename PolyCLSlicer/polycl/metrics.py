"""Segmentation metrics: 3D Dice, symmetric Hausdorff / HD95 in mm, and the papers' 2D Dice.

Surface distances use scipy's exact Euclidean distance transform with the voxel spacing taken
from the IJK->RAS matrix; HD95 follows MONAI's convention (max of the two directed 95th
percentiles).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import voxel_spacing
from .masks import bounding_box


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """3D Dice of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask (the mask minus its 6-connected erosion)."""
    mask = np.asarray(mask) > 0
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def directed_surface_distances(source: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``source`` to the surface of ``target``."""
    distance_to_target = ndimage.distance_transform_edt(~surface(target), sampling=spacing)
    return distance_to_target[surface(source)]


def hausdorff(prediction: np.ndarray, reference: np.ndarray, ijk_to_ras: np.ndarray) -> dict[str, float]:
    """Symmetric Hausdorff distance and HD95 in millimetres (inf when exactly one mask is empty)."""
    a, b = np.asarray(prediction) > 0, np.asarray(reference) > 0
    if not a.any() and not b.any():
        return {"hd_mm": 0.0, "hd95_mm": 0.0}
    if not a.any() or not b.any():
        return {"hd_mm": float("inf"), "hd95_mm": float("inf")}
    spacing = voxel_spacing(ijk_to_ras)
    # inside both masks' bounding box: outside it both are background, so the erosions (border = background),
    # hence the surfaces and their distances, are those of the whole arrays, on a fraction of the volume
    box = bounding_box(a | b)
    a, b = a[box], b[box]
    forward = directed_surface_distances(a, b, spacing)
    backward = directed_surface_distances(b, a, spacing)
    return {
        "hd_mm": float(max(forward.max(), backward.max())),
        "hd95_mm": float(max(np.percentile(forward, 95), np.percentile(backward, 95))),
    }


def per_slice_dice(prediction: np.ndarray, reference: np.ndarray, axis: int) -> np.ndarray:
    """The papers' 2D Dice of every slice along ``axis`` (empty/empty slices score 1)."""
    a = np.moveaxis(np.asarray(prediction) > 0, axis, 0).reshape(np.shape(prediction)[axis], -1)
    b = np.moveaxis(np.asarray(reference) > 0, axis, 0).reshape(np.shape(reference)[axis], -1)
    intersection = np.logical_and(a, b).sum(1)
    total = a.sum(1) + b.sum(1)
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))


def evaluate(prediction: np.ndarray, reference: np.ndarray, ijk_to_ras: np.ndarray) -> dict[str, float]:
    """Dice, HD, HD95 (mm) and the mean 2D per-slice Dice over axial slices."""
    from .geometry import axial_axis

    if np.shape(prediction) != np.shape(reference):
        raise ValueError(f"prediction shape {np.shape(prediction)} differs from reference {np.shape(reference)}")
    slice_dice = per_slice_dice(prediction, reference, axial_axis(ijk_to_ras))
    return {"dice": dice(prediction, reference), **hausdorff(prediction, reference, ijk_to_ras),
            "mean_slice_dice_2d": float(slice_dice.mean())}

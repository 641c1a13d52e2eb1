"""Preprocessing: patient orientation from the direction matrix, CT windowing, slice resizing.

Every model in this package sees axial slices in one canonical in-plane orientation, derived
from the IJK->RAS matrix (never from array axis order): canonical array axes are
(slice: inferior->superior, row: anterior->posterior, column: right->left), i.e. the radiological
axial view.  Oblique volumes are mapped to their nearest axis-aligned orientation by axis
permutation and flips only, so the mapping is exact and invertible (no resampling).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_CENTER = 40.0
WINDOW_WIDTH = 400.0
# Canonical axes as RAS unit vectors: superior, posterior, left.
CANONICAL_AXES_RAS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])


class InputVolumeError(ValueError):
    """The array cannot be a CT volume this package can segment."""


@dataclass(frozen=True)
class CanonicalOrientation:
    """Exact permutation + flips between an [i, j, k] array and the canonical (S, P, L) array."""

    permutation: tuple[int, int, int]  # canonical axis c is array axis permutation[c]
    flips: tuple[bool, bool, bool]  # whether canonical axis c runs against the array axis

    @classmethod
    def from_matrix(cls, ijk_to_ras: np.ndarray) -> CanonicalOrientation:
        directions = np.asarray(ijk_to_ras, float)[:3, :3]
        directions = directions / np.linalg.norm(directions, axis=0, keepdims=True)
        cosines = CANONICAL_AXES_RAS @ directions  # [canonical axis, array axis]
        best = max(
            itertools.permutations(range(3)),
            key=lambda perm: sum(abs(cosines[c, perm[c]]) for c in range(3)),
        )
        flips = tuple(bool(cosines[c, best[c]] < 0) for c in range(3))
        return cls(permutation=tuple(best), flips=flips)

    @property
    def slice_axis(self) -> int:
        """Array axis that runs inferior-superior (the axial slice axis)."""
        return self.permutation[0]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.permutation)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        for axis, flip in enumerate(self.flips):
            if flip:
                array = np.flip(array, axis)
        return np.transpose(array, np.argsort(self.permutation))

    def canonical_matrix(self, ijk_to_ras: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """IJK->RAS of the canonical array (useful for writing or checking canonical arrays)."""
        index_map = np.zeros((4, 4))
        index_map[3, 3] = 1.0
        for c, (axis, flip) in enumerate(zip(self.permutation, self.flips, strict=True)):
            index_map[axis, c] = -1.0 if flip else 1.0
            index_map[axis, 3] = shape[axis] - 1 if flip else 0.0
        return np.asarray(ijk_to_ras, float) @ index_map


def axial_axis(ijk_to_ras: np.ndarray) -> int:
    """Index of the array axis closest to the patient's superior-inferior axis."""
    return CanonicalOrientation.from_matrix(ijk_to_ras).slice_axis


def window(hu: np.ndarray | torch.Tensor, center: float = WINDOW_CENTER, width: float = WINDOW_WIDTH):
    """Clip to [center - width/2, center + width/2] HU and scale to [0, 1] (float32)."""
    low = center - width / 2.0
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - low) / width).clamp_(0.0, 1.0)
    return np.clip((np.asarray(hu, np.float32) - low) / width, 0.0, 1.0).astype(np.float32)


def resize_slices(slices: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a stack of slices (N, C, H, W) to (size, size); 'nearest' for label maps."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(slices.shape[-2:]) == size:
        return slices
    if mode == "nearest":
        return F.interpolate(slices, size=size, mode="nearest-exact")
    return F.interpolate(slices, size=size, mode=mode, align_corners=False)


def resize_mask_slices(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (N, H, W) binary masks."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    return resize_slices(tensor, size, mode="nearest")[:, 0].numpy() > 0.5


def middle_slices(num_slices: int, fraction: float = 0.3) -> slice:
    """The papers' training option: the middle `fraction` of a scan's slices (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, int(round(num_slices * fraction)))
    start = (num_slices - count) // 2
    return slice(start, start + count)


def validate_ct(array: np.ndarray, name: str = "volume") -> list[str]:
    """Raise InputVolumeError for arrays that cannot be a CT; return notes (warnings) for odd ones."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputVolumeError(f"{name}: expected a 3D volume, got {array.ndim}D shape {array.shape}")
    if min(array.shape) < 1 or sorted(array.shape)[1] < 8:
        raise InputVolumeError(f"{name}: shape {array.shape} is too small for a CT (slices under 8x8)")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputVolumeError(f"{name}: voxel type {array.dtype} is not a real scalar")
    finite = np.isfinite(array)
    if not finite.all():
        raise InputVolumeError(
            f"{name}: {int((~finite).sum())} voxels are NaN or infinite; fix or mask them before segmenting"
        )
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InputVolumeError(f"{name}: every voxel has the value {low}; the volume is empty")
    notes = []
    if low > -200 or high < 0:
        notes.append(
            f"{name}: intensity range [{low:g}, {high:g}] does not look like CT in Hounsfield units "
            "(expected air near -1000 HU and soft tissue 0-100 HU); results may be meaningless"
        )
    return notes

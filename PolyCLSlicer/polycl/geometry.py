"""Patient orientation from the IJK->RAS matrix (numpy only, importable before torch is installed).

Every model in this package sees axial slices in one canonical orientation derived from the
direction matrix (never from array axis order): canonical array axes are (slice: inferior->superior,
row: anterior->posterior, column: right->left), i.e. the radiological axial view.  Oblique volumes
are mapped to their nearest axis-aligned orientation by axis permutation and flips only, so the
mapping is exact and invertible (no resampling).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Canonical axes as RAS unit vectors: superior, posterior, left.
CANONICAL_AXES_RAS = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])


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

    def from_canonical_result(self, array: np.ndarray) -> np.ndarray:
        """A canonical result (which the caller no longer uses) back in the volume's axes, laid out for writing:
        ``array``'s own memory (permuted axes) unless an axis is flipped, then a straight copy in the canonical
        memory order.  For an axial CT as read ([i, j, k], k-major) the writer's transpose to (k, j, i) is then
        free; ``np.ascontiguousarray`` would reorder every voxel here and again in the writer."""
        volume = self.from_canonical(array)
        return volume if array.flags.c_contiguous and not any(self.flips) else np.array(volume, order="K")

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


def voxel_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Spacing in mm along i, j, k (column norms of the matrix)."""
    return np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)

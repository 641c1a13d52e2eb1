"""Sparse annotations: which axial slices a finetune trains on when only a few carry a label.

Slice numbers are always indices ``k`` along the input array's axial axis (the axis the direction
matrix says runs inferior-superior, :func:`polycl.geometry.axial_axis`): the numbers 3D Slicer shows
for an axial volume, whatever the array's axis order or direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..geometry import CanonicalOrientation

SLICE_MODES = ("all", "annotated")

# Recipe for 1-5 painted slices (bench/finetune_sparse.py): few, heavily augmented slices, a learning
# rate 10x below training from scratch, every epoch sees each slice several times, and one cosine cycle
# (restart_epochs = 10): on totalseg_sm +250 HU, held-out Dice reached 0.969 by epoch 10 (best of 20: 0.969).
SPARSE_DEFAULTS = {"epochs": 10, "lr": 1e-4, "augment": True, "batch_size": 8}
SAMPLES_PER_EPOCH = 16  # an epoch repeats the few training slices until it holds this many


@dataclass(frozen=True)
class SliceSelection:
    """Training slices of one scan: array indices ``k`` and whether each one is painted (has foreground)."""

    array_indices: tuple[int, ...]
    painted: tuple[bool, ...]

    @property
    def painted_indices(self) -> list[int]:
        return [k for k, p in zip(self.array_indices, self.painted, strict=True) if p]

    @property
    def empty_indices(self) -> list[int]:
        return [k for k, p in zip(self.array_indices, self.painted, strict=True) if not p]


def slice_foreground(mask: np.ndarray, axis: int) -> np.ndarray:
    """Boolean per index along ``axis``: does that slice hold foreground?"""
    mask = np.asarray(mask)
    return mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))


def annotated_slices(mask: np.ndarray, ijk_to_ras: np.ndarray) -> list[int]:
    """Array indices along the axial axis of the slices where ``mask`` has foreground."""
    axis = CanonicalOrientation.from_matrix(ijk_to_ras).slice_axis
    return [int(k) for k in np.flatnonzero(slice_foreground(mask, axis))]


def canonical_index(orientation: CanonicalOrientation, shape: Sequence[int], array_index: int) -> int:
    """Canonical (inferior->superior) slice number of array slice ``array_index`` (its own inverse)."""
    count = shape[orientation.slice_axis]
    return count - 1 - array_index if orientation.flips[0] else array_index


def select_slices(mask: np.ndarray, ijk_to_ras: np.ndarray, mode: str = "annotated",
                  empty_slices: Sequence[int] = (), name: str = "label") -> SliceSelection:
    """The slices a finetune trains on: every slice (``all``), or the painted ones plus ``empty_slices``.

    Raises ValueError with a one-line reason when the label has no foreground, an empty slice is out of
    range, or a slice listed as liver-free has foreground in the label.
    """
    if mode not in SLICE_MODES:
        raise ValueError(f"unknown slice mode {mode!r}; use one of {', '.join(SLICE_MODES)}")
    axis = CanonicalOrientation.from_matrix(ijk_to_ras).slice_axis
    painted = slice_foreground(mask, axis)
    count = len(painted)
    if mode == "all":
        if empty_slices:
            raise ValueError("empty slices only apply to sparse finetuning (slices='annotated')")
        return SliceSelection(tuple(range(count)), tuple(bool(p) for p in painted))
    if not painted.any():
        raise ValueError(f"{name} has no foreground: paint the liver on at least one axial slice")
    empty = sorted({int(k) for k in empty_slices})
    outside = [k for k in empty if not 0 <= k < count]
    if outside:
        raise ValueError(f"{name}: empty slice {outside[0]} is outside 0..{count - 1} (the axial axis has "
                         f"{count} slices)")
    clash = [k for k in empty if painted[k]]
    if clash:
        raise ValueError(f"{name}: slice {clash[0]} is listed as liver-free but the label has liver there")
    chosen = sorted(set(np.flatnonzero(painted).tolist()) | set(empty))
    return SliceSelection(tuple(int(k) for k in chosen), tuple(bool(painted[k]) for k in chosen))


def held_out_painted(selections: Sequence[SliceSelection], seed: int) -> list[tuple[int, int]]:
    """(scan, array index) of the painted slices held out for validation: none below 3 painted slices,
    else one in five (at least one), never the only painted slice of a scan."""
    candidates = [(scan, k) for scan, selection in enumerate(selections)
                  if len(selection.painted_indices) > 1 for k in selection.painted_indices]
    total = sum(len(s.painted_indices) for s in selections)
    if total < 3 or not candidates:
        return []
    count = min(len(candidates), max(1, math.floor(total / 5)))
    order = np.random.default_rng(seed).permutation(len(candidates))
    held, per_scan = [], {}
    for index in order:
        scan, k = candidates[index]
        if per_scan.get(scan, 0) + 1 >= len(selections[scan].painted_indices):
            continue
        held.append((scan, k))
        per_scan[scan] = per_scan.get(scan, 0) + 1
        if len(held) == count:
            break
    return sorted(held)


def repeats_per_epoch(num_slices: int) -> int:
    """How often an epoch repeats each training slice so that it holds at least SAMPLES_PER_EPOCH."""
    return max(1, math.ceil(SAMPLES_PER_EPOCH / max(1, num_slices)))


def is_sparse_annotation(annotated: Sequence[int], predicted_extent: tuple[int, int] | None) -> tuple[bool, str]:
    """Whether a liver segment looks painted on a few slices: not contiguous, or covering less than half
    of the model's predicted liver extent (first, last slice).  Returns (sparse?, reason)."""
    slices = sorted(set(int(k) for k in annotated))
    if not slices:
        return False, "the liver segment is empty"
    gaps = len(slices) != slices[-1] - slices[0] + 1
    if gaps:
        return True, f"the liver segment covers {len(slices)} slices with gaps between them"
    if predicted_extent is None:
        return False, f"the liver segment covers {len(slices)} contiguous slices and the model finds no liver"
    extent = predicted_extent[1] - predicted_extent[0] + 1
    if len(slices) < extent / 2:
        return True, (f"the liver segment covers {len(slices)} slices, less than half of the "
                      f"{extent} slices where the model finds liver")
    return False, f"the liver segment covers {len(slices)} contiguous slices (model's liver extent: {extent})"

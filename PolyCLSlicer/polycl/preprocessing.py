"""Preprocessing: CT windowing, slice resizing, input checks (orientation lives in ``geometry``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_CENTER = 40.0
WINDOW_WIDTH = 400.0


class InputVolumeError(ValueError):
    """The array cannot be a CT volume this package can segment."""


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


LABEL_NOTE = "looks like a label mask"


def _label_values(array: np.ndarray, low: float, high: float, most: int = 8) -> list[int] | None:
    """The values of an array that holds only a few small non-negative integers (a label map), else None."""
    if low < 0 or high > 255:
        return None
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    values = np.unique(sample)
    if len(values) > most or not np.all(np.equal(np.mod(values, 1), 0)):
        return None
    return [int(v) for v in values]


def validate_ct(array: np.ndarray, name: str = "volume") -> list[str]:
    """Raise InputVolumeError for arrays that cannot be a CT; return notes (warnings) for odd ones."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputVolumeError(f"{name}: expected a 3D volume, got {array.ndim}D shape {array.shape}")
    if min(array.shape) < 1 or sorted(array.shape)[1] < 8:
        raise InputVolumeError(f"{name}: shape {array.shape} is too small for a CT (slices under 8x8)")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputVolumeError(f"{name}: voxel type {array.dtype} is not a real scalar")
    if np.issubdtype(array.dtype, np.floating):  # integer voxels are always finite: no mask of the volume
        finite = np.isfinite(array)
        if not finite.all():
            raise InputVolumeError(
                f"{name}: {int((~finite).sum())} voxels are NaN or infinite; fix or mask them before segmenting"
            )
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InputVolumeError(f"{name}: every voxel has the value {low}; the volume is empty")
    notes = []
    label_values = _label_values(array, low, high)
    if label_values is not None:
        return [f"{name}: looks like a label mask or segmentation (only the values "
                f"{', '.join(str(v) for v in label_values)}), not a CT image: give the CT itself (a mask belongs to "
                "--reference / --annotation / --labels)"]
    if low > -200 or high < 0:
        notes.append(
            f"{name}: intensity range [{low:g}, {high:g}] does not look like CT in Hounsfield units "
            "(expected air near -1000 HU and soft tissue 0-100 HU); results may be meaningless"
            + ("; unsigned values look like HU stored with an offset (e.g. +1024) but the header carries no "
               "rescale slope/intercept: add them (NIfTI scl_slope/scl_inter) or subtract the offset"
               if np.issubdtype(array.dtype, np.unsignedinteger) and low >= 0 and high > 1000 else "")
        )
    return notes


def check_ct(array: np.ndarray, name: str, allow_non_ct: bool, action: str = "segment") -> list[str]:
    """:func:`validate_ct` as the commands apply it: a label mask is always refused, an odd intensity range
    unless ``allow_non_ct`` (then it stays a note); returns the notes left to report."""
    notes = validate_ct(array, name)
    if notes and LABEL_NOTE in notes[0]:
        raise InputVolumeError(notes[0])  # no flag makes a mask segmentable
    if notes and not allow_non_ct:
        raise InputVolumeError(f"{notes[0]}; pass --allow-non-ct to {action} anyway")
    return notes

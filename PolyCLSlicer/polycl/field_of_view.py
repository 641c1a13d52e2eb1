"""A fixed physical field of view: the network sees every CT at the same millimetres per pixel.

Resizing a whole axial slice to the network's input size makes the liver's size in pixels depend on
the scanner's reconstruction field of view (290 mm on a slim patient's abdomen, 500 mm on a whole-body
scan).  A model card with ``field_of_view_mm`` instead maps a square of that many millimetres, centred on
the body, onto the input (air outside the scan); the prediction is mapped back onto the slice grid, and
nothing outside the square is labelled.  Pixel spacing comes from the IJK->RAS matrix (the canonical
array's row and column axes), never from the array shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import CanonicalOrientation

BODY_HU = -500.0  # tissue denser than lung and air: the body (and the table, a small share of its voxels)
FIELD_OF_VIEW_RANGE_MM = (100.0, 1000.0)


def check_field_of_view(value: float | None) -> float | None:
    """None (the papers' whole-slice resize) or a square side in mm within FIELD_OF_VIEW_RANGE_MM."""
    if value is None:
        return None
    low, high = FIELD_OF_VIEW_RANGE_MM
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= float(value) <= high:
        raise ValueError(f"field_of_view_mm must be a number of millimetres in {low:g}-{high:g}, got {value!r}")
    return float(value)


def canonical_spacing(ijk_to_ras: np.ndarray, orientation: CanonicalOrientation) -> tuple[float, float]:
    """(row, column) pixel spacing in mm of the canonical axial slices (from the matrix's column norms)."""
    norms = np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)
    return float(norms[orientation.permutation[1]]), float(norms[orientation.permutation[2]])


def body_centres(canonical: np.ndarray, step: int = 4) -> np.ndarray:
    """(N, 2) row and column pixel position of each slice's body centre of mass (pixels above BODY_HU,
    sampled every ``step`` pixels); the slice centre where a slice has no body.  Per slice, so a slice's
    input never depends on the other slices in the file."""
    body = canonical[:, ::step, ::step] > BODY_HU
    rows = np.arange(body.shape[1], dtype=float) * step
    cols = np.arange(body.shape[2], dtype=float) * step
    counts = body.sum(axis=(1, 2)).astype(float)
    centres = np.empty((len(canonical), 2))
    centres[:, 0] = (body.sum(axis=2) @ rows) / np.maximum(counts, 1)
    centres[:, 1] = (body.sum(axis=1) @ cols) / np.maximum(counts, 1)
    centres[counts == 0] = [(canonical.shape[1] - 1) / 2, (canonical.shape[2] - 1) / 2]
    return centres


@dataclass(frozen=True)
class FieldOfView:
    """Where the network's square input lies on each of a volume's canonical (H, W) slices."""

    size_mm: float
    spacing: tuple[float, float]  # (row, column) mm per pixel
    shape: tuple[int, int]  # (H, W) of the slices
    centres: np.ndarray  # (N, 2) row and column pixel position of each slice's square centre

    @classmethod
    def of_volume(cls, canonical: np.ndarray, ijk_to_ras: np.ndarray, orientation: CanonicalOrientation,
                  size_mm: float) -> FieldOfView:
        """Squares of ``size_mm`` centred on the body of each slice of a canonical (N, H, W) HU volume."""
        return cls(float(size_mm), canonical_spacing(ijk_to_ras, orientation), tuple(canonical.shape[1:]),
                   body_centres(canonical))

    def _theta(self, rows, to_network: bool) -> torch.Tensor:
        """affine_grid matrices (output -> input, normalised, x = column) of canonical slices ``rows``."""
        extent = [n * s for n, s in zip(self.shape, self.spacing, strict=True)]  # (row, column) slice extent, mm
        centres = np.atleast_2d(self.centres[rows])
        offsets = (centres - (np.array(self.shape) - 1) / 2) * np.array(self.spacing)  # mm from the slice centre
        theta = torch.zeros(len(centres), 2, 3, dtype=torch.float64)
        for out_axis, axis in ((0, 1), (1, 0)):  # theta row 0 is x (column), row 1 is y (row)
            offset = torch.from_numpy(offsets[:, axis])
            if to_network:
                theta[:, out_axis, out_axis] = self.size_mm / extent[axis]
                theta[:, out_axis, 2] = 2 * offset / extent[axis]
            else:
                theta[:, out_axis, out_axis] = extent[axis] / self.size_mm
                theta[:, out_axis, 2] = -2 * offset / self.size_mm
        return theta

    def to_network(self, slices: torch.Tensor, size: int, rows=slice(None), mode: str = "bilinear") -> torch.Tensor:
        """(N, C, H, W) windowed canonical slices ``rows`` (indices or a slice of the volume) or their masks
        -> (N, C, size, size) over each one's square; zero (air, or no liver) where the square leaves the scan.
        ``mode`` 'nearest' for masks."""
        theta = self._theta(rows, True).to(slices.device, slices.dtype)
        grid = F.affine_grid(theta, [len(slices), slices.shape[1], size, size], align_corners=False)
        return F.grid_sample(slices, grid, mode=mode, padding_mode="zeros", align_corners=False)

    def from_network(self, probability: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """(N, 1, size, size) probabilities of canonical slices ``rows`` -> (N, 1, H, W) on the slice grid;
        0 outside the square."""
        theta = self._theta(rows, False).to(probability.device, probability.dtype)
        grid = F.affine_grid(theta, [len(probability), probability.shape[1], *self.shape], align_corners=False)
        return F.grid_sample(probability, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def body_outside(self, canonical: np.ndarray) -> float:
        """Fraction of the body's voxels (sampled every 4th) outside the squares; the table and a little
        bed padding stay far below 1 %, arms or a wide body beside the square raise it."""
        sample = canonical[::4, ::4, ::4] > BODY_HU
        total = int(sample.sum())
        if total == 0:
            return 0.0
        half = self.size_mm / 2
        centres = self.centres[::4]
        rows = np.abs(np.arange(0, self.shape[0], 4)[None, :] - centres[:, :1]) * self.spacing[0] <= half
        cols = np.abs(np.arange(0, self.shape[1], 4)[None, :] - centres[:, 1:]) * self.spacing[1] <= half
        inside = rows[:, :, None] & cols[:, None, :]
        return 1.0 - int((sample & inside).sum()) / total

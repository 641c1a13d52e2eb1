"""Which axial slice to paint next: where the segmentation model is least reliable.

Reliability comes from test-time augmentation (TTA): the model segments every slice under a few small
geometric and intensity perturbations (identity, zoom in/out, rotation with contrast change), each
prediction is mapped back, and a slice scores the summed Bernoulli variance ``4 p(1-p)`` of the mean
probability ``p``, divided by the area of a typical liver slice.  A slice scores high where the
perturbed predictions disagree or stay undecided, i.e. where a painted slice teaches the model most.
TTA needs only the segmentation network (4 passes at its own input size: seconds on a CPU); SAM
disagreement would need an image encoder per slice (about 2 s each for LiteMedSAM on 2 CPU cores).

Suggestions lie inside the liver (not on the volume's first or last slice, nor in the outer tenth of the
liver's extent at either end) and are spread along it: a slice closer than ``gap`` slices (the extent over
the number of painted and suggested slices + 1) to a better-ranked or an annotated slice is skipped while
others remain.  Every index is ``k`` along the input array's axial
axis (the slice number 3D Slicer shows), whatever the array's axis order or direction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .devices import autocast_context
from .field_of_view import FieldOfView
from .geometry import CanonicalOrientation
from .inference import Segmenter
from .nets.unet25d import context_batch
from .preprocessing import validate_ct, window
from .progress import CancelFlag, ProgressFn, check_cancel, no_progress
from .training.sparse import canonical_index

# (zoom, rotation in degrees, intensity gain) of each test-time pass
TTA_PASSES = ((1.0, 0.0, 1.0), (1.12, 0.0, 1.0), (0.9, 0.0, 1.0), (1.0, 10.0, 1.08))
LIVER_PROBABILITY = 0.25  # a slice belongs to the liver range when any mean probability exceeds this


@dataclass
class Suggestion:
    """Suggested slices (array indices along the axial axis, best first) and every slice's score."""

    slices: list[int]
    scores: list[float]
    slice_scores: np.ndarray  # score of every array slice k (0 outside the predicted liver)
    axis: int  # the array's axial axis
    liver_extent: list[int] | None = None  # first and last array slice where the model finds liver

    def to_json(self) -> dict:
        return {"slices": self.slices, "scores": [round(s, 6) for s in self.scores]}


def _affine(zoom: float, degrees: float, count: int) -> torch.Tensor:
    angle = math.radians(degrees)
    theta = torch.tensor([[math.cos(angle) / zoom, -math.sin(angle) / zoom, 0.0],
                          [math.sin(angle) / zoom, math.cos(angle) / zoom, 0.0]])
    return theta.expand(count, 2, 3)


def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _inverse(theta: torch.Tensor) -> torch.Tensor:
    full = torch.cat([theta[0], torch.tensor([[0.0, 0.0, 1.0]])])
    return torch.linalg.inv(full)[:2].expand_as(theta)


def tta_probability(segmenter: Segmenter, canonical: np.ndarray, batch_size: int | None = None,
                    progress: ProgressFn = no_progress, cancel: CancelFlag | None = None,
                    view: FieldOfView | None = None) -> np.ndarray:
    """Mean liver probability over the TTA passes for canonical (N, H, W) HU slices, at model size (over the
    model's field of view ``view`` when it has one: ``Segmenter.field_of_view``)."""
    if segmenter.field_of_view_mm is not None and view is None:
        raise ValueError("this model sees a fixed field of view: pass the volume's view")
    batch_size = batch_size or segmenter.default_batch_size
    count, size = len(canonical), segmenter.input_size
    total = np.zeros((count, size, size), np.float32)
    steps, done = len(TTA_PASSES) * math.ceil(count / batch_size), 0
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = torch.from_numpy(context_batch(canonical, start, start + batch_size, segmenter.context_slices))
            batch = window(batch.to(segmenter.device), segmenter.window["center"], segmenter.window["width"])
            batch = segmenter.to_network(batch, view, start)
            for zoom, degrees, gain in TTA_PASSES:
                check_cancel(cancel, "slice suggestion")
                theta = _affine(zoom, degrees, len(batch))
                warped = (_warp(batch, theta) * gain).clamp(0, 1)  # outside autocast: an fp32 sampling grid
                with autocast_context(segmenter.device, segmenter.precision):
                    logits = segmenter.model(warped).float()
                probability = _warp(torch.sigmoid(logits), _inverse(theta))
                total[start:start + len(batch)] += probability[:, 0].cpu().numpy()
                done += 1
                progress(done / steps, f"uncertainty: pass {done}/{steps}")
    return total / len(TTA_PASSES)


def slice_scores(probability: np.ndarray) -> np.ndarray:
    """Per-slice uncertainty of (N, S, S) mean probabilities (0 for slices outside the liver range)."""
    variance = 4.0 * probability * (1.0 - probability)
    liver = probability.reshape(len(probability), -1).max(1) > LIVER_PROBABILITY
    if not liver.any():
        return np.zeros(len(probability))
    areas = (probability > 0.5).reshape(len(probability), -1).sum(1)
    typical = max(float(np.median(areas[liver])), 0.01 * probability[0].size)
    return np.where(liver, variance.reshape(len(probability), -1).sum(1) / typical, 0.0)


def spread_ranking(scores: np.ndarray, count: int, excluded: Sequence[int] = (), gap: int | None = None
                   ) -> list[int]:
    """Up to ``count`` indices with positive score, best first, at least ``gap`` apart from each other
    and from ``excluded`` (relaxed when too few remain); excluded indices are never returned."""
    excluded = set(int(k) for k in excluded)
    candidates = [int(k) for k in np.argsort(-scores, kind="stable") if scores[k] > 0 and int(k) not in excluded]
    if gap is None:
        liver = np.flatnonzero(scores > 0)
        extent = int(liver[-1] - liver[0] + 1) if liver.size else 0
        gap = max(1, extent // (count + len(excluded) + 1) if count else 1)  # evenly spread at best
    chosen: list[int] = []
    for spacing in (gap, 1):
        for k in candidates:
            if len(chosen) < count and k not in chosen and all(abs(k - o) >= spacing for o in [*chosen, *excluded]):
                chosen.append(k)
    return sorted(chosen, key=lambda k: -scores[k])


EDGE_SHARE = 0.1  # the outer share of the liver's extent (tip, dome) that is not suggested


def inner_liver_scores(scores: np.ndarray, orientation: CanonicalOrientation, shape: Sequence[int]) -> np.ndarray:
    """``scores`` (array order) with the volume's first and last slice and the outer EDGE_SHARE of the liver's
    axial extent at each end set to 0: a slice where the scan or the liver ends holds a sliver whose painting
    teaches little; a radiologist paints inside the liver."""
    canonical = np.array([scores[k] for k in sorted(range(len(scores)),
                                                    key=lambda k: canonical_index(orientation, shape, k))])
    liver = np.flatnonzero(canonical > 0)
    if liver.size == 0:
        return scores
    margin = int(round(EDGE_SHARE * (liver[-1] - liver[0] + 1)))
    keep = np.zeros(len(canonical), bool)
    keep[max(liver[0] + margin, 1):min(liver[-1] - margin, len(canonical) - 2) + 1] = True
    if not (keep & (canonical > 0)).any():  # a liver on a few slices: keep them all
        return scores
    return np.array([scores[k] if keep[canonical_index(orientation, shape, k)] else 0.0 for k in range(len(scores))])


def suggest_slices(segmenter: Segmenter, array: np.ndarray, ijk_to_ras: np.ndarray, count: int = 3,
                   annotated: Sequence[int] = (), progress: ProgressFn = no_progress,
                   cancel: CancelFlag | None = None) -> Suggestion:
    """Rank the axial slices of a CT ([i, j, k] HU + IJK->RAS) to paint next; ``annotated`` (array
    indices along the axial axis) are never suggested."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    validate_ct(array)
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    shape = np.shape(array)
    canonical = orientation.to_canonical(array)
    view, notes = segmenter.field_of_view(canonical, ijk_to_ras, orientation)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    probability = tta_probability(segmenter, canonical, progress=progress, cancel=cancel, view=view)
    canonical_scores = slice_scores(probability)
    scores = np.array([canonical_scores[canonical_index(orientation, shape, k)]
                       for k in range(shape[orientation.slice_axis])])
    liver = [k for k in range(len(scores)) if probability[canonical_index(orientation, shape, k)].max() > 0.5]
    slices = spread_ranking(inner_liver_scores(scores, orientation, shape), count, annotated)
    return Suggestion(slices, [float(scores[k]) for k in slices], scores, orientation.slice_axis,
                      [liver[0], liver[-1]] if liver else None)

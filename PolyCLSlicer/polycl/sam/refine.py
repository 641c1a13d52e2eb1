"""SAM-family box refinement of a coarse liver mask (paper §3.3.1), one axial slice at a time.

The refiners themselves (LiteMedSAM, SAM, SAM 2) live in :mod:`polycl.sam.models` and are built by
:mod:`polycl.sam.builders`; their public names are re-exported here.  Slices are taken in the
canonical orientation (:class:`~polycl.preprocessing.CanonicalOrientation`), so boxes and images are
in the radiological axial view whatever the array axis order.  Image embeddings are cached per slice
content for the life of the refiner, so refining again or prompting the same slice again skips the
encoder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..geometry import CanonicalOrientation
from ..masks import is_binary, keep_largest_component
from ..metrics import dice
from ..preprocessing import window
from ..progress import CancelFlag, ProgressFn, check_cancel, no_progress
from .builders import (  # noqa: F401  (re-exported: the public names of this module before the split)
    KNOWN_SAM_CHECKPOINTS,
    REFINERS,
    SAM_MODEL_TYPES,
    build_litemedsam,
    build_refiner,
    build_sam,
    build_sam2_refiner,
    clear_shared_refiners,
    file_sha256,
    load_sam2_model,
    resolve_sam2_config,
    sam_model_type_for,
    shared_refiner,
)
from .models import (  # noqa: F401
    DEFAULT_CACHE_BYTES,
    EmbeddingCache,
    Refiner,
    Sam2ImageRefiner,
    SamRefiner,
    bf16_encoder,
    fuse_conv_bn,
)

# --------------------------------------------------------------------------------------------
# Boxes and images


def component_boxes(mask: np.ndarray, margin: int = 2, min_area: int = 20,
                    largest_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a 2D mask's 8-connected components: ``(boxes, labels)``.

    ``boxes`` is (N, 4) int ``(x_min, y_min, x_max, y_max)`` (x = column, y = row, inclusive pixel
    indices) grown by ``margin`` pixels and clipped to the image; ``labels`` is the (H, W) int label
    image whose value ``n + 1`` marks the pixels of box ``n``.  Components under ``min_area`` pixels
    get no box (their label is kept but skipped), unless they are the only component.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return np.zeros((0, 4), np.int64), labels
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(areas >= min_area)
    if keep.size == 0:
        keep = np.array([int(np.argmax(areas))])
    if largest_only:
        keep = np.array([int(keep[np.argmax(areas[keep])])])
    slices = ndimage.find_objects(labels)
    height, width = mask.shape
    boxes, new_labels = [], np.zeros_like(labels)
    for new_id, index in enumerate(keep, start=1):
        rows, cols = slices[index]
        boxes.append((max(cols.start - margin, 0), max(rows.start - margin, 0),
                      min(cols.stop - 1 + margin, width - 1), min(rows.stop - 1 + margin, height - 1)))
        new_labels[labels == index + 1] = new_id
    return np.asarray(boxes, np.int64).reshape(-1, 4), new_labels


def slice_to_rgb(hu_slice: np.ndarray, center: float = 40.0, width: float = 400.0) -> np.ndarray:
    """CT slice in HU -> windowed uint8 RGB (H, W, 3), the image format SAM models expect."""
    gray = np.rint(window(hu_slice, center, width) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def slice_prompts(mask: np.ndarray, margin: int, min_area: int, per_component: bool,
                  keep_cut_components: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box prompts of one slice's coarse mask: ``(boxes, labels, prompted)`` as :func:`component_boxes` gives
    them (one box around every piece when not ``per_component``); ``prompted[n]`` is False for a box whose
    component touches the image border when ``keep_cut_components`` (it keeps its coarse pixels)."""
    if per_component:
        boxes, labels = component_boxes(mask, margin, min_area)
    else:  # one box around every piece (refined slices always have foreground)
        labels = mask.astype(np.int32)
        rows, cols = np.nonzero(mask)
        height, width = mask.shape
        boxes = np.array([[max(cols.min() - margin, 0), max(rows.min() - margin, 0),
                           min(cols.max() + margin, width - 1), min(rows.max() + margin, height - 1)]])
    prompted = np.ones(len(boxes), bool)
    if keep_cut_components:
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        cut = np.unique(border[border > 0]) - 1
        prompted[cut[cut < len(boxes)]] = False
    return boxes, labels, prompted


# --------------------------------------------------------------------------------------------
# Volume refinement


@dataclass
class SliceReport:
    """Per-slice outcome: ``index`` along the volume's axial array ``axis`` (as the viewer counts it)."""

    index: int
    axis: int
    dice: float
    coarse_pixels: int
    refined_pixels: int
    boxes: int = 0
    fallbacks: int = 0
    cut_by_border: int = 0
    mean_iou: float | None = None
    center_ras: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def slice(self) -> int:
        return self.index

    @property
    def prompted(self) -> int:
        """Boxes sent to the refiner (those not cut by the image border); > 0 when the slice was encoded."""
        return self.boxes - self.cut_by_border


@dataclass
class RefinementResult:
    """Refined mask ([i, j, k] uint8 on the input grid) and per-slice reports in inferior->superior order."""

    mask: np.ndarray
    slices: list[SliceReport]
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def disagreements(self) -> list[SliceReport]:
        """Slices where coarse and refined masks differ, worst (lowest Dice) first."""
        return sorted((s for s in self.slices if s.dice < 1.0), key=lambda s: (s.dice, s.index))

    def worst(self, count: int = 5, max_dice: float = 0.9) -> list[SliceReport]:
        """The ``count`` slices that most need checking (Dice below ``max_dice``), worst first."""
        return [s for s in self.disagreements if s.dice < max_dice][:count]


def slice_center_ras(ijk_to_ras: np.ndarray, shape: Sequence[int], axis: int, index: int) -> tuple[float, float, float]:
    """RAS position of the centre of slice ``index`` along array ``axis``."""
    ijk = np.array([(n - 1) / 2.0 for n in shape] + [1.0])
    ijk[axis] = index
    ras = np.asarray(ijk_to_ras, float) @ ijk
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def array_slice_index(orientation: CanonicalOrientation, shape: Sequence[int], canonical_index: int) -> int:
    """Index along the input array's axial axis of canonical (inferior->superior) slice ``canonical_index``."""
    count = shape[orientation.slice_axis]
    return count - 1 - canonical_index if orientation.flips[0] else canonical_index


def canonical_slice_index(orientation: CanonicalOrientation, shape: Sequence[int], array_index: int) -> int:
    """Inverse of :func:`array_slice_index`."""
    return array_slice_index(orientation, shape, array_index)


def refine_volume(ct_array: np.ndarray, ijk_to_ras: np.ndarray, coarse_mask: np.ndarray, refiner: Refiner,
                  margin: int = 2, min_area: int = 20, per_component: bool = True, min_iou: float | None = 0.5,
                  main_component_only: bool = True, clip_to_box: bool = True, keep_cut_components: bool = True,
                  window_center: float = 40.0,
                  window_width: float = 400.0, progress: ProgressFn | None = no_progress,
                  cancel: CancelFlag | None = None) -> RefinementResult:
    """Refine a coarse mask slice by slice with box prompts; returns the refined mask + disagreement report.

    For each axial slice with coarse foreground, one box per connected component (>= ``min_area``
    pixels, or one box around all of the slice's pieces when ``per_component`` is False) grown by ``margin``
    pixels prompts the refiner; SAM's mask (clipped to its box) replaces the coarse mask in that
    slice.  When SAM's predicted IoU is below ``min_iou`` (or its mask is empty) that component keeps
    its coarse pixels.  With ``main_component_only``, only the largest 3D component is refined; other
    coarse blobs are left unchanged, since refining stray blobs grows false positives.  With
    ``keep_cut_components``, a component the image border cuts (a partial liver at the edge of a small field
    of view) keeps its coarse pixels, and a slice holding only such components is not encoded: a box prompt
    asks for a whole object inside the box, and on a cut liver SAM's mask shrinks away from the border
    (docs/starter_model.md, "Refinement on version 5, and the default it leaves").
    Slices without coarse foreground stay empty.
    """
    start_time = time.perf_counter()
    progress = progress or no_progress
    ct_array, coarse_mask = np.asarray(ct_array), np.asarray(coarse_mask)
    if ct_array.shape != coarse_mask.shape:
        raise ValueError(f"coarse mask shape {coarse_mask.shape} differs from the CT's {ct_array.shape}")
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    ct = orientation.to_canonical(ct_array)
    coarse = orientation.to_canonical(coarse_mask)
    if coarse.flags.c_contiguous and is_binary(coarse):
        coarse = coarse.view(bool)  # the caller's 0/1 mask, only read: no copy (a 512x512x300 mask is 79 MB)
    else:  # canonical, contiguous and bool in one allocation
        coarse = np.not_equal(coarse, 0, out=np.empty(ct.shape, bool))
    target = keep_largest_component(coarse) if main_component_only else coarse
    refined = np.greater(coarse, target)  # coarse & ~target without a temporary
    todo = [int(z) for z in np.flatnonzero(target.reshape(len(target), -1).any(1))]
    hits0, misses0 = refiner.cache.hits, refiner.cache.misses
    reports: dict[int, tuple[int, int, list[float]]] = {}
    batch = getattr(refiner, "encoder_batch", 1)
    for done in range(0, len(todo), batch):
        check_cancel(cancel, "refinement")
        chunk = todo[done:done + batch]
        prompts = {z: slice_prompts(target[z], margin, min_area, per_component, keep_cut_components) for z in chunk}
        encode = [z for z in chunk if prompts[z][2].any()]
        embeddings = dict(zip(encode, refiner.embed([slice_to_rgb(ct[z], window_center, window_width)
                                                      for z in encode]), strict=True))
        for z in chunk:
            boxes, labels, prompted = prompts[z]
            masks, ious, _ = refiner.decode(embeddings[z], boxes[prompted]) if z in embeddings else (None, [], None)
            out = refined[z]
            out |= target[z] & (labels == 0)  # small pieces without a box stay as they were
            fallbacks = 0
            for n in np.flatnonzero(~prompted):  # cut by the image border: the coarse pixels stay
                out |= labels == n + 1
            for m, n in enumerate(np.flatnonzero(prompted)):
                x0, y0, x1, y1 = boxes[n]
                mask = masks[m]
                if clip_to_box:
                    clipped = np.zeros_like(mask)
                    clipped[y0:y1 + 1, x0:x1 + 1] = mask[y0:y1 + 1, x0:x1 + 1]
                    mask = clipped
                if not mask.any() or (min_iou is not None and float(ious[m]) < min_iou):
                    out |= labels == n + 1
                    fallbacks += 1
                else:
                    out |= mask
            reports[z] = (len(boxes), fallbacks, int((~prompted).sum()), [float(v) for v in ious])
        progress(min(1.0, (done + len(chunk)) / max(len(todo), 1)), f"slice {done + len(chunk)}/{len(todo)}")
    del target  # one volume-sized array less before the result's copy
    shape = ct_array.shape
    slices = []
    for z in np.flatnonzero(coarse.reshape(len(coarse), -1).any(1) | refined.reshape(len(refined), -1).any(1)):
        z = int(z)
        index = array_slice_index(orientation, shape, z)
        boxes, fallbacks, cut, ious = reports.get(z, (0, 0, 0, []))
        slices.append(SliceReport(
            index=index, axis=orientation.slice_axis, dice=dice(coarse[z], refined[z]),
            coarse_pixels=int(coarse[z].sum()), refined_pixels=int(refined[z].sum()), boxes=boxes,
            fallbacks=fallbacks, cut_by_border=cut, mean_iou=float(np.mean(ious)) if ious else None,
            center_ras=slice_center_ras(ijk_to_ras, shape, orientation.slice_axis, index)))
    mask = orientation.from_canonical_result(refined.view(np.uint8))  # no copy unless a flip needs one
    return RefinementResult(mask=mask, slices=slices, seconds=time.perf_counter() - start_time,
                            cache_hits=refiner.cache.hits - hits0, cache_misses=refiner.cache.misses - misses0)

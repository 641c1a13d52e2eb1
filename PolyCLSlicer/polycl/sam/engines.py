"""Propagation engines: each yields (slice, mask, confidence) along an order of slices.

* :class:`ChainTracker` (``litemedsam``): box chaining with any :class:`~polycl.sam_models.Refiner`:
  the accepted mask on slice k gives a box (largest 2D component + small margin) that prompts the
  next slice.  Embeddings come from the refiner's cache, so slices the refinement already embedded
  cost only a decoder call.
* :class:`Sam2Tracker` (``sam2``): the official SAM 2 video predictor, fed windowed slices from memory
  (:class:`_SliceFrames`; no JPEG round trip), seeded with ``add_new_mask``.

The driver (:func:`polycl.sam.propagation.propagate_from_annotation`) sends back, through the
generator's ``send``, the mask it accepted for each slice (None when the slice failed).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Sequence
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import autocast_context, configure_precision, place, resolve_device
from ..preprocessing import window
from .builders import load_sam2_model
from .models import Refiner, bf16_encoder
from .refine import component_boxes, slice_to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_sam2_patch_lock = threading.Lock()

# (canonical slice index, 2D mask, model confidence in [0, 1] or None)
Step = tuple[int, np.ndarray, float | None]


class ChainTracker:
    """LiteMedSAM (or any :class:`Refiner`) box chaining: previous accepted mask -> box -> next slice."""

    name = "litemedsam"

    def __init__(self, refiner: Refiner, margin: int = 2, largest_only: bool = True, min_area: int = 10):
        self.refiner = refiner
        self.margin = margin
        self.largest_only = largest_only
        self.min_area = min_area

    def track(self, ct: np.ndarray, seed: int, seed_mask: np.ndarray,
              order: Sequence[int]) -> Generator[Step, np.ndarray | None, None]:
        source = seed_mask
        for z in order:
            boxes, _ = component_boxes(source, self.margin, self.min_area, largest_only=self.largest_only)
            embedding = self.refiner.embed([slice_to_rgb(ct[z])])[0]
            masks, ious, _ = self.refiner.decode(embedding, boxes)
            mask = np.zeros(ct.shape[1:], bool)
            for (x0, y0, x1, y1), box_mask in zip(boxes, masks, strict=True):
                mask[y0:y1 + 1, x0:x1 + 1] |= box_mask[y0:y1 + 1, x0:x1 + 1]
            confidence = float(np.min(ious)) if len(ious) else None
            accepted = yield z, mask, confidence
            if accepted is not None and accepted.any():  # None: slice rejected, keep the last box
                source = accepted


class _SliceFrames:
    """Lazy SAM 2 video frames from canonical CT slices: windowed, resized, ImageNet-normalised."""

    def __init__(self, ct: np.ndarray, order: Sequence[int], image_size: int, device: torch.device,
                 center: float = 40.0, width: float = 400.0):
        self.ct, self.order, self.image_size, self.device = ct, list(order), image_size, device
        self.center, self.width = center, width
        self.mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> torch.Tensor:
        hu = torch.from_numpy(np.asarray(self.ct[self.order[index]], np.float32)).to(self.device)
        gray = window(hu, self.center, self.width)[None, None]
        gray = F.interpolate(gray, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
        return (gray.expand(3, -1, -1) - self.mean) / self.std


class Sam2Tracker:
    """SAM 2 video predictor fed from memory; one pseudo-video per (seed, direction), seed first."""

    name = "sam2"

    def __init__(self, predictor: torch.nn.Module, precision: str = "auto", device: str | torch.device = "auto"):
        self.device = resolve_device(device)
        self.predictor = place(predictor, self.device).eval()
        self.precision = configure_precision(precision, self.device)
        if self.precision == "bf16":
            bf16_encoder(self.predictor.image_encoder)  # the rest runs under bf16 autocast
        if getattr(self.predictor, "fill_hole_area", 0) > 0 and not _sam2_extension_available():
            self.predictor.fill_hole_area = 0  # hole filling needs sam2's CUDA extension; skip its error path

    def init_state(self, frames: _SliceFrames, height: int, width: int) -> dict:
        """``predictor.init_state`` with in-memory frames instead of a JPEG folder or MP4."""
        import sam2.sam2_video_predictor as video_module

        def load_frames(**_: Any) -> tuple[_SliceFrames, int, int]:
            return frames, height, width

        with _sam2_patch_lock, mock.patch.object(video_module, "load_video_frames", load_frames), \
                autocast_context(self.device, self.precision):
            return self.predictor.init_state(video_path="<memory>", offload_video_to_cpu=True)

    def track(self, ct: np.ndarray, seed: int, seed_mask: np.ndarray,
              order: Sequence[int]) -> Generator[Step, np.ndarray | None, None]:
        import sam2.sam2_video_predictor as video_module

        frames = _SliceFrames(ct, [seed, *order], int(self.predictor.image_size), self.device)
        state = self.init_state(frames, ct.shape[1], ct.shape[2])
        with autocast_context(self.device, self.precision):
            seed = torch.from_numpy(seed_mask > 0).to(self.device)
            self.predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=seed)
        quiet = mock.patch.object(video_module, "tqdm", lambda iterable, **_: iterable)  # no progress bar
        quiet.start()
        stream = self.predictor.propagate_in_video(state, start_frame_idx=0)
        try:
            while True:
                with autocast_context(self.device, self.precision):
                    item = next(stream, None)
                if item is None:
                    return
                frame_idx, _, logits = item
                if frame_idx == 0:
                    continue
                mask = (logits[0, 0] > 0.0).cpu().numpy()
                yield order[frame_idx - 1], mask, self._object_confidence(state, frame_idx)
        finally:
            stream.close()
            quiet.stop()
            self.predictor.reset_state(state)

    @staticmethod
    def _object_confidence(state: dict, frame_idx: int) -> float | None:
        try:
            out = state["output_dict_per_obj"][0]["non_cond_frame_outputs"][frame_idx]
            return float(torch.sigmoid(out["object_score_logits"].float()).max())
        except (KeyError, IndexError, TypeError):
            return None


def _sam2_extension_available() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def build_sam2_tracker(checkpoint: str | os.PathLike | None, config: str | None = None,
                       device: str | torch.device = "auto", precision: str = "auto") -> Sam2Tracker:
    """SAM 2 video predictor from a user checkpoint + config (names as in ``sam2/configs``)."""
    model = load_sam2_model(checkpoint, config, device, video=True)
    return Sam2Tracker(model, precision=precision, device=device)

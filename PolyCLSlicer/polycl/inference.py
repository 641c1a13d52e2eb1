"""Whole-volume inference: every axial slice, batched, in the canonical orientation."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .devices import autocast_context, configure_precision, place, resolve_device
from .field_of_view import FieldOfView, check_field_of_view
from .geometry import CanonicalOrientation
from .masks import keep_largest_component
from .nets.checkpoints import load_checkpoint
from .nets.unet import SegmentationNet
from .nets.unet25d import context_batch, context_slices
from .preprocessing import resize_slices, validate_ct, window
from .presence import LiverCheck, assess_liver
from .progress import CancelFlag, ProgressFn, check_cancel, no_progress


@dataclass
class SegmentationResult:
    """Binary uint8 mask and (when asked for) the float32 probability, both [i, j, k] on the input grid."""

    probability: np.ndarray | None
    mask: np.ndarray
    warnings: list[str] = field(default_factory=list)  # every note for the user: input checks, field of view, liver
    liver: LiverCheck | None = None  # is there a liver in view (None: not checked)


BODY_OUTSIDE_WARNING = 0.02  # share of body voxels outside a model's field of view that gets a warning


class Segmenter:
    """A loaded segmentation network plus the preprocessing its model card prescribes."""

    def __init__(self, model: SegmentationNet, card: dict, device: str | torch.device = "auto",
                 precision: str = "auto", channels_last: bool | None = None):
        self.device = resolve_device(device)
        self.precision = configure_precision(precision, self.device)
        # None: channels-last (NHWC) on CPU, where oneDNN runs its convolutions without reorders (1.2-1.4x per
        # pass, bench/inference.py); masks then differ by a few voxels between thread counts
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = place(model, self.device).eval().to(memory_format=layout)
        self.card = card
        self.input_size = int(card["input_size"])
        self.window = card.get("window", {"center": 40.0, "width": 400.0})
        self.context_slices = context_slices(model)  # 1, or k adjacent axial slices as channels (2.5D)
        self.field_of_view_mm = check_field_of_view(card.get("field_of_view_mm"))  # None: whole slice resized

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, device: str = "auto",
                        precision: str = "auto", channels_last: bool | None = None) -> Segmenter:
        """Load a segmentation checkpoint (the bundled starter model when path is None)."""
        model, card = load_checkpoint(path, kind="segmentation")
        return cls(model, card, device, precision, channels_last)

    @property
    def default_batch_size(self) -> int:
        """4 slices per pass on CPU (fastest in bench/inference.py: cache-friendly), 16 on GPUs."""
        return 4 if self.device.type == "cpu" else 16

    def field_of_view(self, canonical: np.ndarray, ijk_to_ras: np.ndarray,
                      orientation: CanonicalOrientation) -> tuple[FieldOfView | None, list[str]]:
        """The model's square on this canonical volume (None: whole slices) and the note when it cuts the body."""
        if self.field_of_view_mm is None:
            return None, []
        view = FieldOfView.of_volume(canonical, ijk_to_ras, orientation, self.field_of_view_mm)
        outside = view.body_outside(canonical)
        if outside > BODY_OUTSIDE_WARNING:
            return view, [f"{outside:.0%} of the body lies outside the model's {self.field_of_view_mm:g} mm field "
                          "of view (centred on the body): nothing there is labelled"]
        return view, []

    def to_network(self, batch: torch.Tensor, view: FieldOfView | None, start: int = 0) -> torch.Tensor:
        """Windowed (N, C, H, W) canonical slices ``start``.. -> the network's (N, C, S, S) input."""
        if view is None:
            return self.network_layout(resize_slices(batch, self.input_size))
        return self.network_layout(view.to_network(batch, self.input_size, slice(start, start + len(batch))))

    def network_layout(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch in the model's memory layout (``channels_last``)."""
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def predict_slices(self, slices: np.ndarray, batch_size: int | None = None, progress: ProgressFn = no_progress,
                       cancel: CancelFlag | None = None, threshold: float | None = None,
                       view: FieldOfView | None = None) -> np.ndarray:
        """Probabilities for canonical (N, H, W) HU slices (inferior to superior: a 2.5D model's neighbours),
        returned at (N, H, W); with ``threshold`` a uint8 code instead, >= 128 exactly where ``probability >
        threshold`` (``encode_probability``: thresholded batch by batch, no float copy of the volume).  A model
        with a field of view needs the volume's
        ``view`` (``field_of_view``)."""
        if self.field_of_view_mm is not None and view is None:
            raise ValueError(f"this model sees a {self.field_of_view_mm:g} mm field of view: pass the volume's "
                             "view (Segmenter.field_of_view) or use Segmenter.segment")
        count, height, width = slices.shape
        batch_size = batch_size or self.default_batch_size
        out = np.empty((count, height, width), np.float32 if threshold is None else np.uint8)
        with torch.inference_mode():
            for start in range(0, count, batch_size):
                check_cancel(cancel, "segmentation")
                batch = torch.from_numpy(context_batch(slices, start, start + batch_size, self.context_slices))
                batch = window(batch.to(self.device), self.window["center"], self.window["width"])
                # before autocast: under bf16 autocast affine_grid's matmul gives a bf16 grid (~1.5 mm off)
                network_input = self.to_network(batch, view, start)
                with autocast_context(self.device, self.precision):
                    logits = self.model(network_input).float()
                if view is None:
                    probability = torch.sigmoid(resize_slices(logits, (height, width)))[:, 0]
                else:  # probabilities, so that outside the square is 0 and not sigmoid(0)
                    probability = view.from_network(torch.sigmoid(logits), slice(start, start + len(batch)))[:, 0]
                out[start:start + batch_size] = (probability if threshold is None
                                                 else encode_probability(probability, threshold)).cpu()
                progress(min(1.0, (start + batch_size) / count), f"slice {min(count, start + batch_size)}/{count}")
        return out

    def segment(self, array: np.ndarray, ijk_to_ras: np.ndarray, batch_size: int | None = None,
                threshold: float = 0.5, largest_component: bool = True, progress: ProgressFn = no_progress,
                cancel: CancelFlag | None = None, probability: bool = False, check_liver: bool = True,
                input_notes: list[str] | None = None) -> SegmentationResult:
        """Segment the liver in a CT volume given as [i, j, k] HU array + IJK->RAS matrix.

        The float32 probability map is kept only when ``probability`` is asked for (else None).  With
        ``check_liver`` the mask is judged (``polycl.presence``): no liver in view empties it, an implausible
        one is flagged; either way ``warnings`` says so.  ``input_notes``: the caller's own ``validate_ct`` notes
        on ``array`` (the volume is then not checked again; they lead ``warnings``).
        """
        notes = validate_ct(array) if input_notes is None else list(input_notes)
        orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
        canonical = orientation.to_canonical(array)
        view, view_notes = self.field_of_view(canonical, ijk_to_ras, orientation)
        predicted = self.predict_slices(canonical, batch_size, progress, cancel, None if probability else threshold,
                                        view)
        mask = predicted > threshold if probability else predicted >= 128
        if largest_component:
            mask = keep_largest_component(mask)
        liver = None
        if check_liver:
            confidence = mean_probability(predicted, mask, threshold, encoded=not probability)
            liver = assess_liver(orientation.from_canonical(mask), confidence, array, ijk_to_ras)
        mask = orientation.from_canonical_result(mask.view(np.uint8))
        if liver is not None and not liver.found:
            mask[:] = 0
        notes += view_notes + ([liver.message] if liver is not None and liver.message else [])
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return SegmentationResult(
            probability=orientation.from_canonical_result(predicted) if probability else None,
            mask=mask, warnings=notes, liver=liver,
        )


def encode_probability(probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 code of a probability: 128-255 exactly where ``probability > threshold`` (the mask), the value in
    128 steps on each side of the threshold (the model's confidence, at the memory cost of the mask)."""
    above = probability > threshold
    high = 128 + torch.floor((probability - threshold) / (1 - threshold) * 127.999)
    low = torch.floor(probability / threshold * 127.999)
    return torch.where(above, high, low).clamp(0, 255).to(torch.uint8)


def mean_probability(predicted: np.ndarray, mask: np.ndarray, threshold: float, encoded: bool = True) -> float:
    """Mean probability inside ``mask`` of probabilities, or of ``encode_probability`` codes (mid-step values of
    the codes above the threshold); 0 when the mask is empty."""
    if not mask.any():
        return 0.0
    if not encoded:
        return float(predicted[mask].mean())
    above = predicted[mask].astype(np.float64) - 128
    return float(threshold + (above.mean() + 0.5) / 128 * (1 - threshold))


def segment_volume(array: np.ndarray, ijk_to_ras: np.ndarray, checkpoint: str | os.PathLike | None = None,
                   device: str = "auto", **options) -> SegmentationResult:
    """One-call API: load a checkpoint (starter model by default) and segment a volume."""
    return Segmenter.from_checkpoint(checkpoint, device).segment(array, ijk_to_ras, **options)

"""The interactive pipeline behind the Slicer module and its worker: segment, refine, propagate, finetune.

Arrays (``[i, j, k]`` + IJK->RAS) in, arrays out, with one progress callback and one cancel flag per
call.  A :class:`ModelCache` keeps the last segmentation network and the SAM 2 tracker loaded; SAM /
LiteMedSAM refiners (and their embedding caches) come from :func:`polycl.sam.refine.shared_refiner`.
Importing this module does not import torch (the Slicer side uses :func:`checkpoint_path`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .nets.model_card import checkpoint_path
from .progress import CancelFlag, ProgressFn, check_cancel, no_progress

REFINERS = ("none", "litemedsam", "sam", "sam2")
PROPAGATION_ENGINES = ("auto", "sam2", "litemedsam")
DIRECTIONS = ("both", "up", "down")


def scaled(progress: ProgressFn, start: float, end: float, prefix: str = "") -> ProgressFn:
    """Map a sub-task's progress [0, 1] onto [start, end] of the whole task."""

    def report(fraction: float, message: str) -> None:
        progress(start + (end - start) * min(max(float(fraction), 0.0), 1.0), f"{prefix}{message}")

    return report


def model_card(checkpoint: str | os.PathLike | None) -> dict:
    """The model card of a checkpoint (validated; raises CheckpointError with a clear message)."""
    from .nets.checkpoints import read_checkpoint

    return read_checkpoint(checkpoint_path(checkpoint))[1]


class ModelCache:
    """Keeps the last segmentation network and the last SAM 2 tracker warm between calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, tuple[tuple, Any]] = {}

    def _get(self, slot: str, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if slot not in self._models or self._models[slot][0] != key:
                self._models.pop(slot, None)
                self._models[slot] = (key, build())
            return self._models[slot][1]

    def loaded(self) -> list[str]:
        """Slots that hold a model now ('segmenter', 'tracker')."""
        return sorted(self._models)

    def segmenter(self, checkpoint: str | os.PathLike | None, device: str = "auto") -> Any:
        from .inference import Segmenter

        path = checkpoint_path(checkpoint)
        key = (str(path), path.stat().st_mtime if path.exists() else 0.0, str(device))
        return self._get("segmenter", key, lambda: Segmenter.from_checkpoint(path, device))

    @staticmethod
    def refiner(name: str, checkpoint: str | os.PathLike | None = None, model_type: str | None = None,
                config: str | None = None, device: str = "auto") -> Any:
        """The session refiner for these settings (its embedding cache survives between calls)."""
        from .sam.refine import shared_refiner

        if name not in REFINERS[1:]:
            raise ValueError(f"unknown refiner {name!r}; use one of {', '.join(REFINERS[1:])}")
        if name in ("sam", "sam2") and not checkpoint:
            raise ValueError(f"the {name} refiner needs a checkpoint file (Model section)")
        return shared_refiner(name, checkpoint=str(checkpoint) if name != "litemedsam" else None,
                              model_type=model_type if name == "sam" else None,
                              config=config if name == "sam2" else None, device=device)

    def tracker(self, engine: str, checkpoint: str | None = None, config: str | None = None,
                device: str = "auto") -> Any:
        """Propagation engine; the LiteMedSAM chain shares the refiner (and its embedding cache)."""
        from .sam import propagation

        if engine == "sam2":
            if not checkpoint:
                raise ValueError("SAM 2 propagation needs a SAM 2 checkpoint file (Model section)")
            key = ("sam2", checkpoint, config, device)
            return self._get("tracker", key, lambda: propagation.build_sam2_tracker(checkpoint, config, device))
        return propagation.ChainTracker(self.refiner("litemedsam", device=device))

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


@dataclass
class SegmentOutput:
    """Result of segmentation (+ optional refinement) on the input grid."""

    mask: np.ndarray
    coarse: np.ndarray
    warnings: list[str]
    disagreements: list[dict]
    axis: int
    liver: dict | None = None  # polycl.presence.LiverCheck.as_dict() of the network's mask (None: not checked)


def segment(models: ModelCache, array: np.ndarray, matrix: np.ndarray, checkpoint: str | os.PathLike | None = None,
            device: str = "auto", refiner: str = "none", refiner_checkpoint: str | os.PathLike | None = None,
            sam_model: str = "vit_b", sam2_config: str | None = None, progress: ProgressFn | None = None,
            cancel: CancelFlag | None = None) -> SegmentOutput:
    """PolyCL segmentation, then SAM-family box refinement when ``refiner`` is not 'none'."""
    from .geometry import axial_axis

    progress = progress or no_progress
    if refiner not in REFINERS:
        raise ValueError(f"unknown refiner {refiner!r}; use one of {', '.join(REFINERS)}")
    share = 1.0 if refiner == "none" else 0.3
    progress(0.0, "loading model")
    segmenter = models.segmenter(checkpoint, device)
    check_cancel(cancel, "segmentation")
    result = segmenter.segment(array, matrix, progress=scaled(progress, 0.0, share, "segment: "), cancel=cancel)
    coarse = np.asarray(result.mask, np.uint8)
    liver = None if result.liver is None else result.liver.as_dict()
    if refiner == "none" or not coarse.any():
        return SegmentOutput(coarse, coarse, list(result.warnings), [], axial_axis(matrix), liver)
    refined = refine(models, array, matrix, coarse, refiner, refiner_checkpoint, sam_model, sam2_config, device,
                     scaled(progress, share, 1.0), cancel)
    return SegmentOutput(refined.mask, coarse, list(result.warnings) + refined.warnings, refined.disagreements,
                         refined.axis, liver)


def refine(models: ModelCache, array: np.ndarray, matrix: np.ndarray, mask: np.ndarray, refiner: str = "litemedsam",
           refiner_checkpoint: str | os.PathLike | None = None, sam_model: str = "vit_b",
           sam2_config: str | None = None, device: str = "auto", progress: ProgressFn | None = None,
           cancel: CancelFlag | None = None) -> SegmentOutput:
    """SAM-family box refinement of an existing mask (e.g. a hand-corrected liver)."""
    from .geometry import axial_axis
    from .sam.refine import refine_volume

    progress = progress or no_progress
    if not np.any(mask):
        raise ValueError("the mask to refine is empty")
    progress(0.0, f"loading {refiner}")
    built = models.refiner(refiner, refiner_checkpoint, sam_model, sam2_config, device)
    check_cancel(cancel, "refinement")
    refined = refine_volume(array, matrix, mask, built, progress=scaled(progress, 0.0, 1.0, "refine: "),
                            cancel=cancel)
    return SegmentOutput(np.asarray(refined.mask, np.uint8), np.asarray(mask, np.uint8),
                         list(getattr(refined, "notes", [])), disagreement_rows(refined), axial_axis(matrix))


def disagreement_rows(result: Any) -> list[dict]:
    """The refiner's disagreement slices as ``[{"slice": k, "dice": d}, ...]``, worst first."""
    return [{"slice": int(item.index), "dice": float(item.dice)} for item in result.disagreements]


@dataclass
class PropagateOutput:
    """Propagated mask on the input grid, why each direction stopped, and the axial array axis."""

    mask: np.ndarray
    stops: list[str]
    engine: str
    axis: int


def propagate(models: ModelCache, array: np.ndarray, matrix: np.ndarray, annotation: np.ndarray,
              engine: str = "auto", sam2_checkpoint: str | os.PathLike | None = None, sam2_config: str | None = None,
              direction: str = "both", bounds: tuple[int, int] | None = None, guide: np.ndarray | None = None,
              device: str = "auto", progress: ProgressFn | None = None,
              cancel: CancelFlag | None = None) -> PropagateOutput:
    """One annotated slice -> volume: SAM 2 when a checkpoint is configured, else LiteMedSAM box chaining."""
    from .geometry import axial_axis
    from .sam import propagation

    if engine not in PROPAGATION_ENGINES:
        raise ValueError(f"unknown propagation engine {engine!r}; use one of {', '.join(PROPAGATION_ENGINES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    if engine == "auto":
        engine = "sam2" if sam2_checkpoint else "litemedsam"
    progress = progress or no_progress
    progress(0.0, f"loading {engine}")
    tracker = models.tracker(engine, None if sam2_checkpoint is None else str(sam2_checkpoint), sam2_config, device)
    result = propagation.propagate_from_annotation(
        array, matrix, annotation, engine=engine, direction=direction, bounds=None if bounds is None else tuple(bounds),
        guide_mask=guide if guide is not None and np.any(guide) else None, device=device, tracker=tracker,
        progress=progress, cancel=cancel)
    return PropagateOutput(np.asarray(result.mask, np.uint8), list(result.stops), str(result.engine),
                           axial_axis(matrix))


def finetune(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], output: str | os.PathLike,
             init: str | os.PathLike | None, epochs: int, learning_rate: float, device: str = "auto",
             batch_size: int = 10, val_fraction: float = 0.2, progress: ProgressFn | None = None,
             cancel: CancelFlag | None = None, slices: str = "all", empty_slices: list | None = None) -> Any:
    """Finetune from ``init`` on (CT, mask, IJK->RAS, name) tuples; writes ``output`` only on success.

    ``slices="annotated"`` trains only on slices with mask foreground plus ``empty_slices`` (polycl.sparse).
    """
    from .io.base import Volume
    from .training.config import FinetuneConfig
    from .training.finetuning import finetune as run_finetune

    progress = progress or no_progress
    card = model_card(init)
    config = FinetuneConfig(architecture=card["architecture"], architecture_args=dict(card["architecture_args"]),
                            input_size=int(card["input_size"]), epochs=int(epochs), lr=float(learning_rate),
                            batch_size=int(batch_size), val_fraction=val_fraction, device=device,
                            slices=slices, empty_slices=list(empty_slices or []))
    volumes = [(Volume(ct, m, name), Volume(mask, m, name)) for ct, mask, m, name in pairs]
    state = {"epoch": 0}

    def on_epoch(report: Any) -> None:
        state["epoch"] = report.epoch
        dice = report.val_dice
        text = f"epoch {report.epoch}/{report.epochs}  loss {report.loss:.4f}"
        progress(report.epoch / report.epochs, text + (f"  val Dice {dice:.3f}" if dice is not None else ""))

    def on_batch(index: int, count: int, loss: float) -> None:
        fraction = (state["epoch"] + (index + 1) / max(count, 1)) / max(epochs, 1)
        progress(fraction, f"epoch {state['epoch'] + 1}/{epochs}  batch {index + 1}/{count}  loss {loss:.4f}")

    return run_finetune(volumes, output, config, init=checkpoint_path(init), progress=on_epoch, cancel=cancel,
                        on_batch=on_batch, data_description={"source": "3D Slicer scene (PolyCLSlicer)"})


def suggest(models: ModelCache, array: np.ndarray, matrix: np.ndarray, checkpoint: str | os.PathLike | None = None,
            count: int = 1, annotated: np.ndarray | None = None, device: str = "auto",
            progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> dict:
    """Slices to paint next (polycl.suggest) and the model's liver extent, as array indices along the axial
    axis: ``{"slices", "scores", "axis", "annotated", "liver_extent"}``; annotated slices are never suggested."""
    from .suggest import suggest_slices
    from .training.sparse import annotated_slices

    progress = progress or no_progress
    progress(0.0, "loading model")
    painted = [] if annotated is None else annotated_slices(annotated, matrix)
    found = suggest_slices(models.segmenter(checkpoint, device), array, matrix, count, painted, progress, cancel)
    return {**found.to_json(), "axis": found.axis, "annotated": painted, "liver_extent": found.liver_extent}

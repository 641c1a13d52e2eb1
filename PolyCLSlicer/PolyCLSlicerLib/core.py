"""The one place that calls the Slicer-free ``polycl`` engine.

Imports of ``polycl`` submodules (and so of torch) happen inside the functions: importing the Slicer
module never loads torch, so the first-use dependency check can run before it is installed.
Everything here works on arrays (``[i, j, k]`` + IJK->RAS) and is safe to call from a worker thread.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ProgressFn = Callable[[float, str], None]
REFINERS = ("none", "litemedsam", "sam", "sam2")
PROPAGATION_ENGINES = ("auto", "sam2", "litemedsam")
DIRECTIONS = ("both", "up", "down")


def scaled(progress: ProgressFn, start: float, end: float, prefix: str = "") -> ProgressFn:
    """Map a sub-task's progress [0, 1] onto [start, end] of the whole task."""

    def report(fraction: float, message: str) -> None:
        progress(start + (end - start) * min(max(float(fraction), 0.0), 1.0), f"{prefix}{message}")

    return report


def starter_checkpoint() -> Path:
    """The bundled starter model file (path only: importing polycl.checkpoints would load torch)."""
    import polycl

    return Path(polycl.__file__).resolve().parent / "weights" / "polycl_liver_starter.safetensors"


def checkpoint_path(checkpoint: str | os.PathLike | None) -> Path:
    """Resolved checkpoint file (the bundled starter model when None or empty)."""
    if checkpoint is None or str(checkpoint).strip() in ("", "."):
        return starter_checkpoint()
    return Path(checkpoint).expanduser().resolve()


def model_card(checkpoint: str | os.PathLike | None) -> dict:
    """The model card of a checkpoint (validated; raises CheckpointError with a clear message)."""
    from polycl.checkpoints import read_checkpoint

    return read_checkpoint(checkpoint_path(checkpoint))[1]


def read_card_header(path: str | os.PathLike) -> dict:
    """Model card from a checkpoint's safetensors header, without torch (for display only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{path.name} is not a safetensors checkpoint")
        header = json.loads(handle.read(size))
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != "polycl-checkpoint" or "card" not in metadata:
        raise ValueError(f"{path.name} is not a PolyCL checkpoint")
    return json.loads(metadata["card"])


def describe_card(card: dict) -> str:
    """A few human-readable lines about a model card."""
    args = card.get("architecture_args") or {}
    lines = [f"{card.get('architecture', '?')} ({card.get('kind', '?')}), input {card.get('input_size', '?')} px"]
    if args:
        lines.append("args: " + ", ".join(f"{k}={v}" for k, v in sorted(args.items())))
    window = card.get("window") or {}
    if window:
        lines.append(f"window: center {window.get('center')} HU, width {window.get('width')} HU")
    for key, value in sorted((card.get("metrics") or {}).items()):
        if isinstance(value, int | float):
            lines.append(f"{key}: {value:.4g}")
        elif isinstance(value, dict) and value:
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, int | float) else f"{k} {v}"
                                                for k, v in sorted(value.items())))
    data = card.get("data") or {}
    if data.get("scans"):
        lines.append(f"trained on {len(data['scans'])} scans, {data.get('slices', '?')} slices")
    recipe = card.get("recipe") or {}
    if recipe.get("init") or recipe.get("method"):
        lines.append(f"recipe: {recipe.get('method') or ''} init={recipe.get('init', '')}".strip())
    if card.get("created"):
        lines.append(f"created: {card['created']}")
    return "\n".join(lines)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class ModelCache:
    """Keeps the last segmentation network and the last refiner warm (SAM embeddings stay cached)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, tuple[tuple, Any]] = {}

    def _get(self, slot: str, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if slot not in self._models or self._models[slot][0] != key:
                self._models.pop(slot, None)
                self._models[slot] = (key, build())
            return self._models[slot][1]

    def segmenter(self, checkpoint: str | os.PathLike | None, device: str = "auto") -> Any:
        from polycl.inference import Segmenter

        path = checkpoint_path(checkpoint)
        key = (str(path), path.stat().st_mtime if path.exists() else 0.0, str(device))
        return self._get("segmenter", key, lambda: Segmenter.from_checkpoint(path, device))

    def refiner(
        self,
        name: str,
        checkpoint: str | None = None,
        model_type: str | None = None,
        config: str | None = None,
        device: str = "auto",
    ) -> Any:
        from polycl import sam_refine

        if name in ("sam", "sam2") and not checkpoint:
            raise ValueError(f"the {name} refiner needs a checkpoint file (Model section)")
        key = (name, str(checkpoint), model_type if name == "sam" else None, config if name == "sam2" else None, device)
        return self._get(
            "refiner",
            key,
            lambda: sam_refine.build_refiner(
                name,
                checkpoint=checkpoint if name != "litemedsam" else None,
                model_type=model_type if name == "sam" else None,
                config=config if name == "sam2" else None,
                device=device,
            ),
        )

    def tracker(self, engine: str, checkpoint: str | None = None, config: str | None = None,
                device: str = "auto") -> Any:
        """Propagation engine; the LiteMedSAM chain shares the refiner (and its embedding cache)."""
        from polycl import sam2_propagation

        if engine == "sam2":
            if not checkpoint:
                raise ValueError("SAM 2 propagation needs a SAM 2 checkpoint file (Model section)")
            key = ("sam2", checkpoint, config, device)
            return self._get("tracker", key, lambda: sam2_propagation.build_sam2_tracker(checkpoint, config, device))
        return sam2_propagation.ChainTracker(self.refiner("litemedsam", device=device))

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


def segment(
    models: ModelCache,
    array: np.ndarray,
    matrix: np.ndarray,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    refiner: str = "none",
    refiner_checkpoint: str | os.PathLike | None = None,
    sam_model: str = "vit_b",
    sam2_config: str | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> SegmentOutput:
    """PolyCL segmentation, then SAM-family box refinement when ``refiner`` is not 'none'."""
    from polycl.preprocessing import axial_axis
    from polycl.progress import check_cancel

    progress = progress or (lambda f, m: None)
    if refiner not in REFINERS:
        raise ValueError(f"unknown refiner {refiner!r}; use one of {', '.join(REFINERS)}")
    share = 1.0 if refiner == "none" else 0.3
    progress(0.0, "loading model")
    segmenter = models.segmenter(checkpoint, device)
    check_cancel(cancel, "segmentation")
    result = segmenter.segment(array, matrix, progress=scaled(progress, 0.0, share, "segment: "), cancel=cancel)
    coarse = np.asarray(result.mask, np.uint8)
    axis = axial_axis(matrix)
    if refiner == "none":
        return SegmentOutput(coarse, coarse, list(result.warnings), [], axis)
    from polycl import sam_refine

    progress(share, f"loading {refiner}")
    built = models.refiner(
        refiner, None if refiner_checkpoint is None else str(refiner_checkpoint), sam_model, sam2_config, device
    )
    check_cancel(cancel, "refinement")
    refined = sam_refine.refine_volume(
        array, matrix, coarse, built, progress=scaled(progress, share, 1.0, "refine: "), cancel=cancel
    )
    warnings = list(result.warnings) + list(getattr(refined, "notes", []))
    return SegmentOutput(np.asarray(refined.mask, np.uint8), coarse, warnings, disagreement_rows(refined), axis)


def disagreement_rows(result: Any) -> list[dict]:
    """Normalise the refiner's per-slice report into ``[{"slice": k, "dice": d}, ...]``, worst first."""
    items = getattr(result, "disagreements", None)
    if items is None:
        items = getattr(result, "slices", None) or []
    rows = []
    for item in items:
        if isinstance(item, dict):
            index, score = item.get("slice", item.get("index")), item.get("dice", item.get("score"))
        elif isinstance(item, tuple | list):
            index, score = item[0], item[1]
        else:
            index = getattr(item, "slice", getattr(item, "index", None))
            score = getattr(item, "dice", getattr(item, "score", None))
        if index is not None:
            rows.append({"slice": int(index), "dice": None if score is None else float(score)})
    return sorted(rows, key=lambda row: (row["dice"] is None, row["dice"] if row["dice"] is not None else 0.0))


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
              cancel: threading.Event | None = None) -> PropagateOutput:
    """One annotated slice -> volume: SAM 2 when a checkpoint is configured, else LiteMedSAM box chaining."""
    from polycl import sam2_propagation
    from polycl.preprocessing import axial_axis

    if engine not in PROPAGATION_ENGINES:
        raise ValueError(f"unknown propagation engine {engine!r}; use one of {', '.join(PROPAGATION_ENGINES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    if engine == "auto":
        engine = "sam2" if sam2_checkpoint else "litemedsam"
    progress = progress or (lambda f, m: None)
    progress(0.0, f"loading {engine}")
    tracker = models.tracker(engine, None if sam2_checkpoint is None else str(sam2_checkpoint), sam2_config, device)
    result = sam2_propagation.propagate_from_annotation(
        array, matrix, annotation, engine=engine, direction=direction, bounds=bounds,
        guide_mask=guide if guide is not None and np.any(guide) else None, device=device, tracker=tracker,
        progress=progress, cancel=cancel)
    return PropagateOutput(np.asarray(result.mask, np.uint8), list(result.stops), str(result.engine),
                           axial_axis(matrix))


def finetune(
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
    output: str | os.PathLike,
    init: str | os.PathLike | None,
    epochs: int,
    learning_rate: float,
    device: str = "auto",
    batch_size: int = 10,
    val_fraction: float = 0.2,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> Any:
    """Finetune from ``init`` on (CT, mask, IJK->RAS, name) tuples; writes ``output`` only on success."""
    from polycl.finetuning import FinetuneConfig
    from polycl.finetuning import finetune as run_finetune
    from polycl.io import Volume

    progress = progress or (lambda f, m: None)
    card = model_card(init)
    config = FinetuneConfig(
        architecture=card["architecture"],
        architecture_args=dict(card["architecture_args"]),
        input_size=int(card["input_size"]),
        epochs=int(epochs),
        lr=float(learning_rate),
        batch_size=int(batch_size),
        val_fraction=val_fraction,
        device=device,
    )
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

    return run_finetune(
        volumes,
        output,
        config,
        init=checkpoint_path(init),
        progress=on_epoch,
        cancel=cancel,
        on_batch=on_batch,
        data_description={"source": "3D Slicer scene (PolyCLSlicer)"},
    )

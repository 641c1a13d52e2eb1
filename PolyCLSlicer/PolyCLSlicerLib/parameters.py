"""The panel's choice types (enums bound to combo boxes by parameterNodeWrapper) and file-path helpers."""

from __future__ import annotations

import enum
import os
from pathlib import Path

NO_CHECKPOINT_MESSAGE = "Choose a checkpoint file, or tick 'Bundled starter model'."


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"auto": "Auto (CUDA if available)", "cpu": "CPU", "cuda": "CUDA GPU"}[self.value]


class Refiner(enum.Enum):
    NONE = "none"
    LITEMEDSAM = "litemedsam"
    SAM = "sam"
    SAM2 = "sam2"

    def label(self) -> str:
        return {
            "none": "None",
            "litemedsam": "LiteMedSAM (bundled weights)",
            "sam": "SAM (checkpoint file)",
            "sam2": "SAM 2 (checkpoint file)",
        }[self.value]


class SamModel(enum.Enum):
    VIT_B = "vit_b"
    VIT_L = "vit_l"
    VIT_H = "vit_h"

    def label(self) -> str:
        return self.value.replace("vit_", "ViT-").upper().replace("VIT", "ViT")


class Direction(enum.Enum):
    BOTH = "both"
    UP = "up"
    DOWN = "down"

    def label(self) -> str:
        return {"both": "Both directions", "up": "Up (superior)", "down": "Down (inferior)"}[self.value]


class FinetuneSlices(enum.Enum):
    AUTO = "auto"
    ANNOTATED = "annotated"
    ALL = "all"

    def label(self) -> str:
        return {"auto": "Automatic", "annotated": "Annotated slices", "all": "Whole volume"}[self.value]


def absolutePath(path: str | os.PathLike | None) -> str | None:
    """A user's file path made absolute here (the worker process may have another working folder)."""
    return None if path is None else str(Path(path).expanduser().resolve())


def optionalPath(path: Path | str | None) -> str | None:
    """None for no file: '' (or '.', what scenes saved with Path parameters hold)."""
    text = str(path or "").strip()
    return None if text in ("", ".") else text

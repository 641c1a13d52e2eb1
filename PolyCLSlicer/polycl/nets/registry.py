"""The architecture registry: network name (as in a model card) -> builder.

Below every network module's users (checkpoints, training, inference) and above the networks
themselves, so that no network module imports the registry back.
"""

from __future__ import annotations

from collections.abc import Callable

from .transunet import build_transunet
from .unet import SegmentationNet, build_polycl_unet, build_resunet
from .unet25d import build_polycl_unet25d

MODEL_BUILDERS: dict[str, Callable[..., SegmentationNet]] = {
    "polycl_unet": build_polycl_unet,
    "resunet": build_resunet,
    "transunet": build_transunet,
    "polycl_unet25d": build_polycl_unet25d,
}

MIN_INPUT_SIZE = 32  # four 2x poolings leave 2x2 px; InstanceNorm needs more than one pixel


def check_input_size(size: object) -> int:
    """The model input size in pixels if valid (an int, multiple of 16, at least 32), else ValueError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_INPUT_SIZE or size % 16:
        raise ValueError(f"input size {size!r} must be a multiple of 16 and at least {MIN_INPUT_SIZE} px")
    return size


def build_model(name: str, **kwargs) -> SegmentationNet:
    """Build a segmentation network by registry name."""
    if name not in MODEL_BUILDERS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(MODEL_BUILDERS))}")
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    return MODEL_BUILDERS[name](**kwargs)

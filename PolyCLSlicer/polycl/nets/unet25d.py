"""2.5D input: k adjacent axial slices as input channels, predicting the centre slice (``polycl_unet25d``).

Neighbours are taken along the patient's superior-inferior axis of the canonical orientation
(:mod:`polycl.geometry`, from the direction matrix), never along an array axis by its position, so a
flipped or permuted volume gives the same neighbours.  Channel order is inferior to superior: for
k = 3 (below, centre, above).  At the volume's first and last slice the missing neighbours repeat the
edge slice.  A neighbour is the adjacent slice whatever the slice spacing (no resampling to a fixed
distance in mm): at 1 mm it lies 1 mm away, at 5 mm 5 mm away, as a reader scrolling the scan sees it.
The single-slice U-Net is the k = 1 case of every function here and keeps its exact input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from ..geometry import CanonicalOrientation
from .unet import SegmentationNet, UNetDecoder, UNetEncoder

DEFAULT_CONTEXT_SLICES = 3
MAX_CONTEXT_SLICES = 9
CONTEXT_DESCRIPTION = {
    "axis": "patient superior-inferior (canonical orientation from the direction matrix)",
    "channel_order": "inferior to superior; the centre channel is the predicted slice",
    "edges": "the edge slice is repeated",
    "spacing": "adjacent slice, whatever the slice spacing (no resampling)",
}


class ContextSegmentationNet(SegmentationNet):
    """A segmentation network whose input channels are ``context_slices`` adjacent axial slices."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, context_slices: int):
        super().__init__(encoder, decoder)
        self.context_slices = context_slices


def check_context_slices(count: object) -> int:
    """``count`` if it is an odd int in 3..MAX_CONTEXT_SLICES (centre slice plus as many below as above)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 3 or count > MAX_CONTEXT_SLICES \
            or count % 2 == 0:
        raise ValueError(f"context_slices {count!r} must be an odd number from 3 to {MAX_CONTEXT_SLICES} "
                         "(the centre slice and as many neighbours below as above)")
    return count


def build_polycl_unet25d(context_slices: int = DEFAULT_CONTEXT_SLICES,
                         channels: tuple[int, ...] = (16, 32, 64, 128, 256), dropout: float = 0.25
                         ) -> ContextSegmentationNet:
    """The PolyCL U-Net with ``context_slices`` input channels (adjacent axial slices)."""
    context_slices = check_context_slices(context_slices)
    channels = tuple(channels)
    return ContextSegmentationNet(UNetEncoder(context_slices, channels, dropout), UNetDecoder(channels, 1, dropout),
                                  context_slices)


def context_slices(model: nn.Module) -> int:
    """How many adjacent axial slices the network takes (1: a single-slice network)."""
    return int(getattr(model, "context_slices", 1))


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """Name and module of the network's input convolution (the first Conv2d registered)."""
    return next((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def input_channels(model: nn.Module) -> int:
    return first_conv(model)[1].in_channels


def neighbour_indices(count: int, rows: Sequence[int] | np.ndarray, context: int) -> np.ndarray:
    """(N, context) canonical slice indices around each row, inferior to superior, clipped at the ends."""
    offsets = np.arange(context) - context // 2
    return np.clip(np.asarray(rows, np.int64)[:, None] + offsets, 0, count - 1)


def stack_context(canonical: np.ndarray, rows: Sequence[int] | np.ndarray, context: int) -> np.ndarray:
    """(N, context, H, W) input of canonical (S, H, W) slices: each row with its neighbours as channels."""
    if context == 1:
        return np.ascontiguousarray(canonical[np.asarray(rows, np.int64)])[:, None]
    return canonical[neighbour_indices(len(canonical), rows, context)]


def context_batch(canonical: np.ndarray, start: int, stop: int, context: int) -> np.ndarray:
    """Network input for canonical slices start..stop-1 (a contiguous copy of the slices when context is 1)."""
    if context == 1:
        return np.ascontiguousarray(canonical[start:stop])[:, None]
    return stack_context(canonical, np.arange(start, min(stop, len(canonical))), context)


def volume_context(array: np.ndarray, ijk_to_ras: np.ndarray, context: int) -> np.ndarray:
    """(S, context, H, W) input of every axial slice of an [i, j, k] volume, S inferior to superior."""
    canonical = CanonicalOrientation.from_matrix(ijk_to_ras).to_canonical(array)
    return stack_context(canonical, np.arange(len(canonical)), context)


def card_fields(model: nn.Module) -> dict:
    """What a model card records about the network's input (validated by :func:`card_problem` on load)."""
    fields = {"input_channels": input_channels(model), "context_slices": context_slices(model)}
    if fields["context_slices"] > 1:
        fields["context"] = dict(CONTEXT_DESCRIPTION)
    return fields


def card_problem(card: dict, model: nn.Module) -> str:
    """Why a card does not describe the loaded network's input ('' if it does).  Cards without the fields
    (single-slice checkpoints written before 2.5D existed) mean one slice, one channel."""
    claimed = {key: card.get(key, 1) for key in ("input_channels", "context_slices")}
    actual = {"input_channels": input_channels(model), "context_slices": context_slices(model)}
    for key, value in claimed.items():
        if value != actual[key]:
            return (f"model card says {key} = {value!r} but its {card.get('architecture')} network with these "
                    f"weights takes {actual[key]}; the card does not match the weights")
    if actual["input_channels"] != actual["context_slices"]:
        return (f"the {card.get('architecture')} network takes {actual['input_channels']} input channels but is fed "
                f"{actual['context_slices']} axial slice(s); use polycl_unet25d for adjacent-slice input")
    return ""


def channel_hint(model: nn.Module, tensors: dict) -> str:
    """'the file's network takes 3 input channels, the card's takes 1' when the input layers differ."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    weight = tensors.get(f"{name}.weight") if conv is not None else None
    if weight is None or weight.ndim != 4 or weight.shape[1] == conv.in_channels:
        return ""
    return (f"the file's network takes {weight.shape[1]} input channels, the card's {conv.in_channels}: "
            "a single-slice card on a 2.5D checkpoint or the reverse")


def widen_single_slice_init(model: nn.Module, card: dict, tensors: dict) -> tuple[dict, dict]:
    """(card, tensors) for initialising a 2.5D U-Net from a single-slice PolyCL U-Net checkpoint.

    The input convolution gets one weight slab per context slice: the checkpoint's on the centre
    channel, zeros on the neighbours, so the new network starts out computing exactly what the 2D one
    did and learns to use the neighbours in training.  Anything else is returned unchanged.
    """
    count = context_slices(model)
    name = f"{first_conv(model)[0]}.weight"
    weight = tensors.get(name)
    if count == 1 or card.get("architecture") != "polycl_unet" or weight is None or weight.shape[1] != 1:
        return card, tensors
    widened = weight.new_zeros((weight.shape[0], count, *weight.shape[2:]))
    widened[:, count // 2] = weight[:, 0]
    args = {**card["architecture_args"], "context_slices": count}
    return {**card, "architecture": "polycl_unet25d", "architecture_args": args}, {**tensors, name: widened}

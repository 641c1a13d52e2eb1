"""Checkpoints: safetensors weights + a JSON model card, validated on load, written atomically.

A checkpoint is a ``.safetensors`` file whose header metadata holds ``format`` =
``polycl-checkpoint`` and ``card`` = JSON model card (architecture and its args, input size,
window, kind, training recipe, data description, metrics).  safetensors holds only tensors, so
loading never executes code.  Reference-code ``.pt`` state_dicts are imported with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..field_of_view import check_field_of_view
from ..io.base import atomic_write
from .model_card import STARTER_CHECKPOINT
from .registry import build_model, check_input_size
from .unet import SegmentationNet, convert_reference_state_dict
from .unet25d import card_problem, channel_hint, widen_single_slice_init

FORMAT_NAME = "polycl-checkpoint"
FORMAT_VERSION = "1"
KINDS = ("segmentation", "encoder", "pretraining")
REQUIRED_CARD_KEYS = ("kind", "architecture", "architecture_args", "input_size", "window")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class CheckpointError(ValueError):
    """A file is not a usable PolyCL checkpoint."""


def default_card(architecture: str = "polycl_unet", architecture_args: dict | None = None,
                 input_size: int = 256, kind: str = "segmentation", **extra: Any) -> dict:
    """A model card with the required fields filled in."""
    card = {
        "kind": kind,
        "architecture": architecture,
        "architecture_args": dict(architecture_args or {}),
        "input_size": int(input_size),
        "window": {"center": 40.0, "width": 400.0},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {},
        "data": {},
        "metrics": {},
    }
    card.update(extra)
    return card


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], card: dict,
                    overwrite: bool = True) -> Path:
    """Validate the card, then write weights + card atomically."""
    validate_card(card)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "card": json.dumps(card)}
    return write_safetensors(path, tensors, metadata)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically with the mode of any new file (0666 minus the umask): the bytes go
    into atomic_write's temp file (safetensors' own ``save_file`` creates mode 0600, unreadable for colleagues
    on a shared server)."""
    return atomic_write(path, lambda temp: temp.write_bytes(save(tensors, metadata=metadata)))


def save_model(path: str | os.PathLike, model: torch.nn.Module, card: dict, overwrite: bool = True) -> Path:
    return save_checkpoint(path, model.state_dict(), card, overwrite=overwrite)


def validate_card(card: dict) -> None:
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise CheckpointError(f"model card lacks {', '.join(missing)}")
    if card["kind"] not in KINDS:
        raise CheckpointError(f"model card kind {card['kind']!r} is not one of {', '.join(KINDS)}")
    try:
        check_input_size(card["input_size"])
    except ValueError as error:
        raise CheckpointError(f"model card: {error}") from None
    if not isinstance(card["architecture"], str) or not isinstance(card["architecture_args"], dict):
        raise CheckpointError("model card: architecture must be a name and architecture_args a mapping")
    window = card["window"]
    if not isinstance(window, dict) or not all(
        isinstance(window.get(key), (int, float)) and math.isfinite(window[key]) for key in ("center", "width")
    ) or window["width"] <= 0:
        raise CheckpointError(f"model card: window {window!r} needs a finite center and a positive width (HU)")
    try:
        check_field_of_view(card.get("field_of_view_mm"))
    except ValueError as error:
        raise CheckpointError(f"model card: {error}") from None
    for key in ("input_channels", "context_slices"):  # absent: one slice, one channel (2D checkpoints)
        value = card.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"model card: {key} {value!r} must be a positive integer")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors and card of a PolyCL checkpoint; raise CheckpointError on anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size < 16:
        raise CheckpointError(f"{path}: file is empty or truncated")
    _check_layout(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        hint = _foreign_file_hint(path)
        raise CheckpointError(f"{path}: not a readable PolyCL checkpoint ({hint or error})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path}: safetensors file without PolyCL metadata (format={metadata.get('format')!r});"
            " import foreign weights with polycl.checkpoints.import_reference_weights"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {metadata.get('format_version')!r} "
                              f"is not supported (expected {FORMAT_VERSION})")
    try:
        card = json.loads(metadata["card"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: model card missing or not valid JSON") from None
    try:
        validate_card(card)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    broken = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise CheckpointError(f"{path}: weights {broken[:3]} hold NaN or infinite values (a diverged training "
                              "run?); use an earlier checkpoint")
    return tensors, card


def _check_layout(path: Path) -> None:
    """The safetensors header length and the tensors' byte ranges must fit inside the file.

    Catches truncated files and headers claiming impossible sizes before anything is allocated.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            hint = _foreign_file_hint(path) or (f"its header claims {length} bytes, the file holds {size}: "
                                                "truncated or corrupt")
            raise CheckpointError(f"{path}: not a readable PolyCL checkpoint ({hint})")
        try:
            header = json.loads(handle.read(length))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return  # malformed header: safetensors gives its own message
    if 8 + length + end > size:
        raise CheckpointError(f"{path}: checkpoint is truncated ({size} of {8 + length + end} bytes); "
                              "copy or download it again")


def _foreign_file_hint(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        return "it is a torch.save zip archive; import it with import_reference_weights"
    if head[:1] == b"\x80":
        return "it is a raw pickle; pickles can run code and are not loaded"
    return ""


def build_from_card(card: dict) -> SegmentationNet:
    try:
        return build_model(card["architecture"], **card["architecture_args"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"model card describes an unbuildable architecture: {error}") from None


def _mismatch_hint(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """' (depth 12 in the file, 4 here)' for networks that can tell which size argument differs (TransUNet)."""
    explain = getattr(module, "explain_mismatch", None)
    hint = explain(tensors) if explain is not None else channel_hint(module, tensors)
    return f" ({hint})" if hint else ""


def load_state_checked(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "",
                       source: str = "checkpoint") -> list[str]:
    """Load tensors whose names start with prefix into module; shapes must match exactly.

    Returns the module keys that were not in the file (caller decides whether that is fine).
    """
    expected = module.state_dict()
    selected = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    unknown = sorted(set(selected) - set(expected))
    hint = _mismatch_hint(module, tensors)
    if unknown:
        raise CheckpointError(f"{source}: unexpected weights {unknown[:5]} (architecture mismatch){hint}")
    for key, value in selected.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: weight {prefix}{key} has shape {tuple(value.shape)}, the architecture "
                f"expects {tuple(expected[key].shape)}{hint}"
            )
    module.load_state_dict(selected, strict=False)
    return sorted(set(expected) - set(selected))


def load_checkpoint(path: str | os.PathLike | None = None, kind: str | None = "segmentation"
                    ) -> tuple[SegmentationNet, dict]:
    """Build the network a checkpoint describes and load its weights (validated)."""
    path = Path(path) if path is not None else STARTER_CHECKPOINT
    tensors, card = read_checkpoint(path)
    if kind is not None and card["kind"] != kind:
        raise CheckpointError(f"{path}: is a {card['kind']} checkpoint, a {kind} checkpoint is needed")
    model = build_from_card(card)
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith("projection.")}
    missing = load_state_checked(model, model_tensors, source=str(path))
    if card["kind"] == "segmentation" and missing:
        raise CheckpointError(f"{path}: weights missing for {missing[:5]}{_mismatch_hint(model, tensors)}")
    if card["kind"] != "segmentation" and any(k.startswith("encoder.") for k in missing):
        raise CheckpointError(f"{path}: encoder weights missing for {missing[:5]}{_mismatch_hint(model, tensors)}")
    problem = card_problem(card, model)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    model.eval()
    return model, card


def load_pretrained_init(model: SegmentationNet, path: str | os.PathLike) -> dict:
    """Initialise ``model`` from a checkpoint: whole network if present, else the encoder only.

    Encoder checkpoints (PolyCL / SimCLR pretraining) replace only ``encoder.*``; segmentation or
    whole-U-Net (Pix2Rep) checkpoints replace every weight.  Architectures must match, except that a
    single-slice PolyCL U-Net initialises a 2.5D one (``context.widen_single_slice_init``).
    """
    tensors, card = read_checkpoint(path)
    card, tensors = widen_single_slice_init(model, card, tensors)
    reference = build_from_card(card)
    sizes = getattr(model, "size_differences", None)  # TransUNet: heads differ without a shape change
    differences = sizes(reference) if sizes is not None else []
    if differences or type(reference.encoder) is not type(model.encoder) or any(
        tuple(t.shape) != tuple(model.state_dict()[k].shape)
        for k, t in reference.state_dict().items() if k in model.state_dict()
    ):
        detail = f": {'; '.join(differences)}" if differences else ""
        raise CheckpointError(f"{path}: architecture {card['architecture']} {card['architecture_args']} "
                              f"does not match the model being trained{detail}")
    prefix = "" if card["kind"] == "segmentation" or card.get("whole_network") else "encoder."
    kept = {k: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith("projection.")}
    missing = load_state_checked(model, kept, source=str(path))
    if prefix == "encoder." and any(k.startswith("encoder.") for k in missing):
        raise CheckpointError(f"{path}: encoder weights incomplete ({missing[:3]})")
    return card


def import_reference_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a reference-code ``torch.save`` state_dict safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: rejected, not a plain tensor state_dict ({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state_dict of tensors")
    return convert_reference_state_dict(obj)

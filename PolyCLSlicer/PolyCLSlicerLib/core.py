"""What the Slicer side needs to know about checkpoints, without torch.

The computation itself (segment / refine / propagate / finetune) is ``polycl.pipeline``; it runs in
the worker process (``polycl.worker``, driven through :mod:`PolyCLSlicerLib.tasks`), never in Slicer's
interpreter.  Importing this module does not load torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from polycl.nets.model_card import checkpoint_path, starter_checkpoint

__all__ = ["checkpoint_path", "describe_card", "read_card_header", "starter_checkpoint"]


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
    if card.get("field_of_view_mm"):
        lines.append(f"field of view: {card['field_of_view_mm']:g} mm square around the body")
    if args:
        lines.append("args: " + ", ".join(f"{k}={v}" for k, v in sorted(args.items())))
    context = int(card.get("context_slices") or 1)
    if context > 1:
        lines.append(f"2.5D: {context} adjacent axial slices per input (predicts the centre slice)")
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

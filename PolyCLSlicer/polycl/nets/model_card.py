"""Torch-free model-card helpers: where the bundled starter lives, checkpoint paths, and the card as text for
people (``polycl info``; ``polycl info --json`` prints the card itself).

Accuracy figures are labelled by where they were measured: on the scans the model was trained on
(a training-set fit, which overstates accuracy on new scans), on held-out validation scans, or on
unseen cases.
"""

from __future__ import annotations

import os
from pathlib import Path

TRAINING_SET = "training-set fit (scans the model was trained on; not a measure of accuracy on new scans)"
VALIDATION = "validation (held-out scans of the same run)"
HELD_OUT = "held-out (cases never used for training)"
RECIPE_LOO = ("leave-one-case-out of the recipe (one model retrained without each case, scored on it; "
              "these weights were trained on all of them)")


def metric_source(key: str) -> str:
    """Which data a metric in ``card["metrics"]`` was measured on, from its key."""
    key = key.lower()
    if key.startswith(("training_set", "train_")):
        return TRAINING_SET
    if key.startswith("val_"):
        return VALIDATION
    if key.startswith(("leave_one_case_out", "leave_one_out", "loo_")):
        return RECIPE_LOO
    if key.startswith(("held_out", "heldout", "test_")):
        return HELD_OUT
    return ""


def _format_value(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {_format_value(v)}" for name, v in value.items())
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return "; ".join(_format_value(item) for item in value)
    return str(value)


def _metric_lines(metrics: dict) -> list[str]:
    groups: dict[str, list[str]] = {}
    for key, value in metrics.items():
        groups.setdefault(metric_source(key), []).append(f"{key}: {_format_value(value)}")
    lines = []
    for source in (HELD_OUT, VALIDATION, RECIPE_LOO, TRAINING_SET, ""):
        if source in groups:
            lines.append(f"    {source or 'other'}:")
            lines += [f"      {line}" for line in groups[source]]
    if TRAINING_SET in groups and not {HELD_OUT, VALIDATION, RECIPE_LOO} & groups.keys():
        lines.append("    (no held-out figures in this card: expect lower Dice on scans unlike the training data)")
    return lines


def input_geometry(card: dict) -> str:
    """What the network sees of an axial slice: a fixed square in mm, or the whole slice resized."""
    size, view = card.get("input_size", "?"), card.get("field_of_view_mm")
    if view:
        return f"a {view:g} mm square around the body at {size} px ({view / size:.2f} mm per pixel on every scan)"
    return f"axial slices resized to {size} px (mm per pixel follows each scan's field of view)"


def split_text(data: dict) -> str:
    """'2 training, 1 validation' scans, or the held-out painted slices of sparse finetuning (no scan held out)."""
    scans = data.get("scans", [])
    held_scans, held_slices = len(data.get("val_scans", [])), int(data.get("val_slices", 0))
    if not held_scans and held_slices:
        return f"{held_slices} held-out painted slice(s) for validation"
    return f"{len(data.get('train_scans', scans))} training, {held_scans} validation"


def describe_card(card: dict, path: str | Path, parameters: int) -> str:
    """Human-readable summary of a validated model card."""
    recipe, data = card.get("recipe", {}), card.get("data", {})
    args = ", ".join(f"{k}={v}" for k, v in card.get("architecture_args", {}).items()) or "defaults"
    window = card.get("window", {})
    lines = [
        f"{card.get('name', Path(path).name)}",
        f"  file: {path}",
        f"  kind: {card['kind']}; architecture {card['architecture']} ({args}); {parameters:,} parameters",
        f"  input: {input_geometry(card)}, window L{window.get('center')}/W{window.get('width')} HU",
    ]
    context = card.get("context_slices", 1)
    if context > 1:
        lines.append(f"  2.5D: {context} adjacent axial slices as input channels (inferior to superior along the "
                     f"patient axis, edge slice repeated at the ends); predicts the centre slice")
    if card.get("intended_use"):
        lines.append(f"  intended use: {card['intended_use']}")
    if data:
        scans = data.get("scans", [])
        lines.append(f"  training data: {len(scans)} scan(s), {data.get('slices', '?')} slices ({split_text(data)})")
        if data.get("description"):
            lines.append(f"    {data['description']}")
    if recipe:
        lines.append(f"  recipe: {recipe.get('epochs', '?')} epochs, lr {recipe.get('lr', '?')}, "
                     f"batch {recipe.get('batch_size', '?')}, init {recipe.get('init', '?')}")
        if recipe.get("command"):
            lines.append(f"    {recipe['command']}")
    if card.get("metrics"):
        lines.append("  metrics:")
        lines += _metric_lines(card["metrics"])
    lines.append(f"  created: {card.get('created', '?')}; polycl {card.get('polycl_version', '?')}")
    return "\n".join(lines)


STARTER_NAME = "polycl_liver_starter.safetensors"
STARTER_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / STARTER_NAME


def starter_checkpoint() -> Path:
    """The bundled starter model file (torch-free: the Slicer adapter uses it)."""
    return STARTER_CHECKPOINT



def checkpoint_path(checkpoint: str | os.PathLike | None) -> Path:
    """Resolved checkpoint file (the bundled starter model when None or empty)."""
    if checkpoint is None or str(checkpoint).strip() in ("", "."):
        return starter_checkpoint()
    return Path(checkpoint).expanduser().resolve()


def algorithm_identity(card: dict, checkpoint: str | os.PathLike | None, refiner: str | None = None
                       ) -> tuple[str, str]:
    """(algorithm name, version) for a DICOM SEG: PolyCLSlicer + the model card's name, architecture, date."""
    from .. import __version__

    name = f"PolyCLSlicer {card.get('name') or Path(checkpoint or 'model').stem}"
    if refiner is not None:
        name += f" + {refiner}"
    version = f"{card['architecture']} {str(card.get('created', ''))[:10]} polycl {__version__}".replace("  ", " ")
    return name, version

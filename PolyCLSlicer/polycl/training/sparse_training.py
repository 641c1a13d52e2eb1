"""Training and validation slices for sparse finetuning (``FinetuneConfig.slices == "annotated"``).

Only the painted slices (label foreground) and the slices listed as liver-free are read; with three or
more painted slices one in five (at least one) is held out for validation, so the best epoch is
chosen on slices the network did not train on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..geometry import CanonicalOrientation
from ..io.base import Volume
from .config import FinetuneConfig
from .slices import SliceSet, slices_from_pairs
from .sparse import SPARSE_DEFAULTS, canonical_index, held_out_painted, select_slices


def empty_slices_per_scan(empty_slices: Sequence, num_scans: int) -> list[list[int]]:
    """``[k, ...]`` (one scan) or ``[[k, ...], ...]`` (one list per scan) -> one list per scan."""
    empty_slices = list(empty_slices or [])
    if not empty_slices:
        return [[] for _ in range(num_scans)]
    if all(isinstance(k, int | np.integer) for k in empty_slices):
        if num_scans != 1:
            raise ValueError(f"empty slices as one list need exactly one scan (got {num_scans}); "
                             "give one list per scan")
        return [[int(k) for k in empty_slices]]
    if len(empty_slices) != num_scans:
        raise ValueError(f"{len(empty_slices)} lists of empty slices for {num_scans} scans")
    return [[int(k) for k in scan] for scan in empty_slices]


def slice_plan(pairs: Sequence[tuple[Volume, Volume]], config: FinetuneConfig) -> list[dict]:
    """Per scan: name, painted training slices, liver-free slices and held-out painted (validation) slices,
    all as array indices along the scan's axial axis (what the model card records)."""
    empties = empty_slices_per_scan(config.empty_slices, len(pairs))
    selections = [select_slices(label.array, ct.ijk_to_ras, "annotated", empty, name=ct.source or f"scan {scan}")
                  for scan, ((ct, label), empty) in enumerate(zip(pairs, empties, strict=True))]
    held = set(held_out_painted(selections, config.seed)) if config.val_fraction > 0 else set()
    return [{"scan": ct.source or f"scan {scan}",
             "painted": [k for k in selection.painted_indices if (scan, k) not in held],
             "empty": selection.empty_indices,
             "validation": [k for k in selection.painted_indices if (scan, k) in held]}
            for scan, ((ct, _), selection) in enumerate(zip(pairs, selections, strict=True))]


def _rows(data: SliceSet, rows: list[int], device: torch.device) -> SliceSet:
    index = torch.as_tensor(rows, dtype=torch.long)
    return SliceSet(data.images[index].to(device), data.masks[index].to(device), data.scan_ids[rows])


def sparse_training_sets(pairs: Sequence[tuple[Volume, Volume]], config: FinetuneConfig, device: torch.device,
                         context: int = 1) -> tuple[SliceSet, SliceSet, dict]:
    """(training slices, validation slices, model-card description of which slices were used).

    A 2.5D network (``context`` > 1) sees each painted slice with its CT neighbours as channels, painted
    or not; the loss is only ever computed on the painted (and listed liver-free) slices."""
    if config.middle_fraction:
        raise ValueError("middle_fraction cannot be combined with sparse (annotated-slice) finetuning")
    plan = slice_plan(pairs, config)
    keep, is_validation = [], []
    for (ct, _), scan in zip(pairs, plan, strict=True):
        orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
        chosen = scan["painted"] + scan["empty"] + scan["validation"]
        keep.append([canonical_index(orientation, ct.array.shape, k) for k in chosen])
        is_validation += [False] * (len(chosen) - len(scan["validation"])) + [True] * len(scan["validation"])
    data = slices_from_pairs(list(pairs), config.input_size, keep=keep, context=context,
                             field_of_view_mm=config.field_of_view_mm)
    train = [row for row, held in enumerate(is_validation) if not held]
    val = [row for row, held in enumerate(is_validation) if held]
    description = {"slice_mode": "annotated", "slice_numbering": "array index along each scan's axial axis",
                   "slices_used": plan}
    return _rows(data, train, device), _rows(data, val, device), description


def recipe_defaults(mode: str) -> dict:
    """Epochs, batch size and learning rate for a slice mode: FinetuneConfig's, or SPARSE_DEFAULTS."""
    if mode == "annotated":
        return {key: SPARSE_DEFAULTS[key] for key in ("epochs", "batch_size", "lr")}
    defaults = FinetuneConfig()
    return {"epochs": defaults.epochs, "batch_size": defaults.batch_size, "lr": defaults.lr}


def describe_selection(pairs: Sequence[tuple[Volume, Volume]], config: FinetuneConfig) -> str:
    """One line per scan: the painted, liver-free and held-out slices a sparse finetune will use."""
    return "\n".join(f"{scan['scan']}: training on painted slices {scan['painted']}, liver-free slices "
                     f"{scan['empty']}; validating on painted slices {scan['validation'] or 'none (< 3 painted)'}"
                     for scan in slice_plan(pairs, config))

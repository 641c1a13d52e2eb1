"""Supervised finetuning with soft Dice loss (METHOD §3): the backend training logic.

Input: (CT, liver mask) volume pairs.  Slices are taken in the canonical orientation, windowed
and resized to the model size; the split into training and validation is by scan.  The best
epoch (lowest validation loss, or training loss without validation) is kept in memory and written
atomically to the output file only when the run finishes, so a cancelled or crashed run never
touches an existing checkpoint.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..devices import autocast_context, configure_precision, place, resolve_device
from ..field_of_view import check_field_of_view
from ..io.base import Volume
from ..nets.checkpoints import default_card, load_pretrained_init, read_checkpoint, save_model
from ..nets.registry import build_model, check_input_size
from ..nets.unet25d import card_fields, context_slices
from ..progress import CancelFlag
from .augment import augment_batch
from .config import FinetuneConfig
from .loop import (
    BatchCallback,
    EpochCallback,
    EpochReport,
    batches_of,
    fit,
    make_optimizer,
    num_batches,
    seed_everything,
)
from .slices import SliceSet, slices_from_pairs


@dataclass
class FinetuneResult:
    path: Path
    card: dict
    history: list[EpochReport]
    best_epoch: int


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, pooled: bool = False
                   ) -> torch.Tensor:
    """Per-slice soft Dice loss 1 - (2|P*Y| + 1) / (|P| + |Y| + 1), averaged over the batch; ``pooled``: one
    soft Dice over all the batch's pixels (a liver-free slice then costs its false pixels, not a whole slice)."""
    rows = 1 if pooled else len(logits)
    probability = torch.sigmoid(logits).reshape(rows, -1)
    target = target.reshape(rows, -1).float()
    intersection = (probability * target).sum(1)
    dice = (2 * intersection + smooth) / (probability.sum(1) + target.sum(1) + smooth)
    return (1 - dice).mean()



def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.0,
                      pooled: bool = False) -> torch.Tensor:
    """The finetuning loss: soft Dice (``pooled`` as in :func:`soft_dice_loss`) + ``bce_weight`` x BCE."""
    loss = soft_dice_loss(logits, target, pooled=pooled)
    if bce_weight:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits, target)
    return loss

def resolve_config(config: FinetuneConfig, init: str | os.PathLike | None = None
                   ) -> tuple[FinetuneConfig, list[str]]:
    """Fill architecture, its args and input size from the init checkpoint's card; notes on a changed size.

    Raises ValueError for an invalid input size (see ``models.check_input_size``).
    """
    card = read_checkpoint(init)[1] if init is not None else {}
    architecture = config.architecture or card.get("architecture", "polycl_unet")
    widening = (card.get("architecture"), architecture) == ("polycl_unet", "polycl_unet25d")  # see nets/unet25d.py
    args = dict(card.get("architecture_args", {})) if architecture == card.get("architecture") or widening else {}
    size = check_input_size(int(card.get("input_size", 256)) if config.input_size is None else config.input_size)
    notes = []
    if card and size != card["input_size"]:
        notes.append(f"input size {size} px differs from the {card['input_size']} px the initial checkpoint "
                     f"{Path(init).name} was trained at; its features will not transfer fully "
                     f"(omit the size to keep {card['input_size']})")
    view = card.get("field_of_view_mm") if config.field_of_view_mm is None else config.field_of_view_mm or None
    resolved = replace(config, architecture=architecture, architecture_args={**args, **config.architecture_args},
                       input_size=size, field_of_view_mm=check_field_of_view(view) or 0.0)
    return resolved, notes


def split_scans(num_scans: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Random split of scan indices; validation gets round(fraction * n) scans, never more than training."""
    if num_scans == 0:
        raise ValueError("no training scans given")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"validation fraction {val_fraction} must be in [0, 1)")
    val_count = min(num_scans - 1, math.floor(val_fraction * num_scans + 0.5))
    if val_count > num_scans - val_count:
        raise ValueError(f"validation fraction {val_fraction} would hold out {val_count} of {num_scans} scans "
                         f"and train on {num_scans - val_count}; use at most 0.5")
    order = np.random.default_rng(seed).permutation(num_scans).tolist()
    return sorted(order[val_count:]), sorted(order[:val_count])


def training_precision(requested: str, device: torch.device) -> str:
    """bf16 or fp32: the device policy's choice (``devices.precision_policy``; on CUDA it also sets TF32 /
    cuDNN autotuning).  fp16 trains in fp32 here: fp16 gradients would need loss scaling."""
    return "bf16" if configure_precision(requested, device) == "bf16" else "fp32"


@torch.no_grad()
def evaluate_slices(model: torch.nn.Module, data: SliceSet, batch_size: int) -> dict[str, float]:
    """Validation loss (soft Dice) and hard Dice pooled over all validation slices."""
    model.eval()
    losses, intersection, total = [], 0.0, 0.0
    for start in range(0, len(data.images), batch_size):
        logits = model(data.images[start:start + batch_size])
        target = data.masks[start:start + batch_size]
        losses.append(float(soft_dice_loss(logits, target)) * len(target))
        predicted = (logits > 0).float()
        intersection += float((predicted * target).sum())
        total += float(predicted.sum() + target.sum())
    return {"val_loss": sum(losses) / len(data.images), "val_dice": 2 * intersection / total if total else 1.0}


def _subset(data: SliceSet, scans: list[int], device: torch.device) -> SliceSet:
    keep = np.isin(data.scan_ids, scans)
    index = torch.from_numpy(np.flatnonzero(keep))
    return SliceSet(data.images[index].to(device), data.masks[index].to(device), data.scan_ids[keep])


def finetune(pairs: list[tuple[Volume, Volume]], output: str | os.PathLike, config: FinetuneConfig | None = None,
             init: str | os.PathLike | None = None, progress: EpochCallback | None = None,
             cancel: CancelFlag | None = None, on_batch: BatchCallback | None = None,
             overwrite: bool = False, data_description: dict | None = None,
             recipe_notes: dict | None = None) -> FinetuneResult:
    """Train a segmentation network on (CT, mask) pairs and save the best epoch to ``output``."""
    config, notes = resolve_config(config or FinetuneConfig(), init)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) or choose a new file")
    if init is not None and Path(init).resolve() == output.resolve() and not overwrite:
        raise FileExistsError("the output would replace the initial checkpoint; choose a new file")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    config = replace(config, precision=training_precision(config.precision, device))  # recorded in the card
    model = place(build_model(config.architecture, **config.architecture_args), device)
    init_card = load_pretrained_init(model, init) if init is not None else None
    if config.augment and config.augment_fov_crop and not config.field_of_view_mm:
        raise ValueError("augment_fov_crop needs field_of_view_mm (a crop in millimetres of a physical input)")
    sparse, slice_card, repeats = config.slices == "annotated", {}, 1
    if sparse:
        from .sparse import repeats_per_epoch
        from .sparse_training import sparse_training_sets

        train, val, slice_card = sparse_training_sets(pairs, config, device, context_slices(model))
        train_scans, val_scans, repeats = list(range(len(pairs))), [], repeats_per_epoch(len(train.images))
    elif config.slices != "all":
        raise ValueError(f"unknown slice mode {config.slices!r}; use 'all' or 'annotated'")
    elif config.empty_slices:
        raise ValueError("empty slices only apply to sparse finetuning (slices='annotated')")
    elif config.train_slices is not None and config.middle_fraction:
        raise ValueError("train_slices lists the slices to train on; do not combine it with middle_fraction")
    else:
        data = slices_from_pairs(pairs, config.input_size, config.middle_fraction, keep=config.train_slices,
                                 context=context_slices(model), field_of_view_mm=config.field_of_view_mm)
        train_scans, val_scans = split_scans(len(pairs), config.val_fraction, config.seed)
        train, val = _subset(data, train_scans, device), _subset(data, val_scans, device)
    batches = num_batches(len(train.images) * repeats, config.batch_size)
    optimizer, scheduler = make_optimizer(model.parameters(), config.lr, batches, config.restart_epochs)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    best = {"score": math.inf, "epoch": 0, "state": None, "metrics": {}}
    if sparse and init is not None and len(val.images):  # epoch 0: keep the initial weights unless beaten
        start = evaluate_slices(model, val, config.batch_size)
        best.update(score=start["val_loss"], state=copy.deepcopy(model.state_dict()), metrics=start)
        slice_card["initial_val_dice"] = round(start["val_dice"], 5)

    def make_batches(epoch: int):
        for index in batches_of(np.tile(np.arange(len(train.images)), repeats), config.batch_size, rng):
            index = torch.from_numpy(index).to(device)
            images, masks = train.images[index], train.masks[index]
            yield (augment_batch(images, masks, generator, config.augment_intensity, config.augment_noise,
                                 config.augment_organ_contrast, config.augment_fov_crop, config.field_of_view_mm)
                   if config.augment else (images, masks))

    def loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with autocast_context(device, config.precision):
            logits = net(batch[0]).float()  # the loss in float32
        return segmentation_loss(logits, batch[1], config.bce_weight, config.dice_pooled)

    def end_of_epoch(epoch: int, loss: float) -> tuple[dict[str, float], bool]:
        metrics = evaluate_slices(model, val, config.batch_size) if len(val.images) else {}
        score = metrics.get("val_loss", loss)
        if score < best["score"]:
            best.update(score=score, epoch=epoch, state=copy.deepcopy(model.state_dict()),
                        metrics={"train_loss": loss, **metrics})
            return metrics, True
        return metrics, False

    history = fit(model, config.epochs, make_batches, loss_fn, optimizer, scheduler, end_of_epoch,
                  progress, cancel, on_batch=on_batch, batches_per_epoch=batches)
    model.load_state_dict(best["state"])
    if sparse and best["epoch"] == 0:
        warnings.warn("no epoch beat the initial model on the held-out painted slices; the new checkpoint "
                      "keeps the initial weights (paint more slices or lower the learning rate)", stacklevel=2)
    card = default_card(
        config.architecture, config.architecture_args, config.input_size, kind="segmentation",
        polycl_version=__version__, **card_fields(model),
        **({"field_of_view_mm": config.field_of_view_mm} if config.field_of_view_mm else {}),
        recipe={**asdict(config), "optimizer": "Adam",
                "loss": ("batch-pooled " if config.dice_pooled else "") + (
                    f"soft Dice + {config.bce_weight:g} x BCE" if config.bce_weight else "soft Dice"),
                "scheduler": f"CosineAnnealingWarmRestarts(T_0={config.restart_epochs} epochs, per batch)",
                "init": str(init) if init else "random",
                "init_method": (init_card or {}).get("recipe", {}).get("method"), **(recipe_notes or {})},
        data={"scans": [ct.source or f"scan {i}" for i, (ct, _) in enumerate(pairs)],
              "train_scans": train_scans, "val_scans": val_scans,
              "slices": int(len(train.images) + len(val.images)), "val_slices": int(len(val.images)),
              **slice_card, **(data_description or {})},
        metrics={"best_epoch": best["epoch"], **{k: round(v, 5) for k, v in best["metrics"].items()}},
    )
    path = save_model(output, model.cpu(), card, overwrite=True)
    return FinetuneResult(path, card, history, best["epoch"])

"""One training loop for every objective (supervised finetuning and self-supervised pretraining).

The loop owns the optimiser step, the per-batch cosine-warm-restart schedule, progress reporting
and cooperative cancellation; callers provide the batches, the loss and the end-of-epoch hook
(validation, best-checkpoint keeping, periodic saving).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..progress import CancelFlag, check_cancel


@dataclass
class EpochReport:
    """What a progress callback receives after each epoch."""

    epoch: int  # 1-based
    epochs: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    best: bool = False

    @property
    def val_dice(self) -> float | None:
        return self.metrics.get("val_dice")


EpochCallback = Callable[[EpochReport], None]
BatchCallback = Callable[[int, int, float], None]  # (batch index, batches, loss)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(parameters: Iterable[torch.nn.Parameter], lr: float, batches_per_epoch: int,
                   restart_epochs: int = 10) -> tuple[torch.optim.Optimizer, Any]:
    """Adam + CosineAnnealingWarmRestarts with T_0 = restart_epochs epochs, stepped per batch."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=max(1, restart_epochs * max(1, batches_per_epoch)))
    return optimizer, scheduler


def run_epoch(model: torch.nn.Module, batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
              optimizer: torch.optim.Optimizer, scheduler: Any = None, cancel: CancelFlag | None = None,
              on_batch: BatchCallback | None = None, num_batches: int | None = None) -> float:
    """Train one epoch; checks the cancel flag before every batch; returns the mean of the step losses.

    Step losses stay on the device and are read once at the end of the epoch (no per-step host
    synchronisation, which stalls a GPU queue), unless ``on_batch`` asks for each one.  A non-finite
    loss raises FloatingPointError at the end of the epoch, naming its first batch.
    """
    model.train()
    losses = []
    for index, batch in enumerate(batches):
        check_cancel(cancel, "training")
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        if on_batch is not None:
            on_batch(index, num_batches or 0, float(losses[-1]))
    if not losses:
        raise ValueError("no training batches: the training set is empty")
    values = torch.stack(losses).double().cpu()  # the epoch's one host synchronisation
    bad = torch.nonzero(~torch.isfinite(values)).flatten()
    if len(bad):
        raise FloatingPointError(f"loss became {values[bad[0]].item()} at batch {int(bad[0])}; "
                                 "lower the learning rate")
    return float(values.mean())


def fit(model: torch.nn.Module, epochs: int, make_batches: Callable[[int], Iterable[Any]],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], optimizer: torch.optim.Optimizer,
        scheduler: Any = None, end_of_epoch: Callable[[int, float], tuple[dict[str, float], bool]] | None = None,
        progress: EpochCallback | None = None, cancel: CancelFlag | None = None, start_epoch: int = 0,
        on_batch: BatchCallback | None = None, batches_per_epoch: int | None = None) -> list[EpochReport]:
    """Run epochs ``start_epoch+1 .. epochs``.

    ``make_batches(epoch)`` yields the batches of one epoch (re-drawn each epoch);
    ``end_of_epoch(epoch, loss) -> (metrics, is_best)`` validates / saves.  Raises ``Cancelled``
    between batches when ``cancel`` is set; whatever ``end_of_epoch`` saved so far stays.
    """
    history = []
    for epoch in range(start_epoch + 1, epochs + 1):
        started = time.perf_counter()
        loss = run_epoch(model, make_batches(epoch), loss_fn, optimizer, scheduler, cancel, on_batch,
                         batches_per_epoch)
        metrics, best = end_of_epoch(epoch, loss) if end_of_epoch else ({}, False)
        report = EpochReport(epoch, epochs, loss, metrics, time.perf_counter() - started, best)
        history.append(report)
        if progress is not None:
            progress(report)
    return history


def batches_of(indices: np.ndarray, batch_size: int, rng: np.random.Generator, drop_last: bool = False
               ) -> list[np.ndarray]:
    """Shuffle indices and cut them into batches."""
    order = rng.permutation(indices)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size) if len(order[i:i + batch_size])]


def num_batches(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))

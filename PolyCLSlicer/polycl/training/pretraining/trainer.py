"""Self-supervised pretraining (PolyCL-S/-O/-M, SimCLR, Pix2Rep) on the shared training loop.

One loop (``polycl.training.loop.fit``) serves finetuning and pretraining; this module supplies the
batches (triplets / slices re-drawn each epoch), the objective, periodic checkpoints and resume.

Distributed: launched with ``torchrun --nproc_per_node N``, every process trains a
DistributedDataParallel replica on its DistributedSampler shard (NCCL on CUDA, gloo on CPU).
``batch_size`` is the global minibatch M (split evenly over processes), so the PolyCL
temperature tau = 1/M and the averaged gradient match a single-process run.  Rank 0 alone writes
checkpoints (and the slice cache); the cancel flag is OR-reduced over ranks before every batch so
all processes stop together.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ... import __version__
from ...devices import configure_precision, distributed_backend, place, resolve_device
from ...nets.checkpoints import default_card, read_checkpoint, save_checkpoint, write_safetensors
from ...nets.registry import build_model, check_input_size
from ...nets.unet import ProjectionHead, SegmentationNet
from ...progress import CancelFlag
from ..loop import BatchCallback, EpochCallback, EpochReport, fit, make_optimizer, seed_everything
from .augment import pix2rep_views, simclr_views, valid_region, warp
from .losses import nt_xent, pixel_nt_xent, polycl_triplet_loss
from .samplers import METHODS, make_sampler
from .slice_index import SliceIndex, describe

OPTIMIZER_STATE_FORMAT = "polycl-optimizer-state"


@dataclass
class PretrainConfig:
    """Defaults follow METHOD §2 (PolyCL: Adam 1e-4, M = 20, 100 epochs, restarts every 10)."""

    method: str = "polycl-s"
    architecture: str = "polycl_unet"
    architecture_args: dict = field(default_factory=dict)
    input_size: int = 256
    epochs: int = 100
    batch_size: int = 20  # global minibatch M, split over distributed processes
    lr: float = 1e-4
    restart_epochs: int = 10
    tau: float | None = None  # None: 1/M for PolyCL, 0.5 for SimCLR / Pix2Rep
    projection_dim: int | None = None  # None: 256 (PolyCL, SimCLR), 64 (Pix2Rep pixel embeddings)
    anchor_fraction: float | None = 0.3  # anchors from the middle 30 % of each scan (reference code)
    negative_source: str = "paper"  # PolyCL-M: "paper" (same scan) or "reference" (other scan)
    strict_negatives: bool = False  # PolyCL-M: error instead of falling back to the other source
    pixel_pairs: int = 1000  # Pix2Rep
    save_every: int = 10  # epochs between checkpoints (the last epoch is always saved)
    seed: int = 0
    device: str = "auto"

    def temperature(self) -> float:
        if self.tau is not None:
            return float(self.tau)
        return 1.0 / self.batch_size if self.method.startswith("polycl") else 0.5


@dataclass
class PretrainResult:
    path: Path
    card: dict
    history: list[EpochReport]
    start_epoch: int
    rank: int = 0
    world_size: int = 1
    wrote: bool = True
    checksum: float = 0.0  # sum of all parameters (equal on every rank when in sync)
    in_sync: bool = True


# ---------------------------------------------------------------------------------------------
# Networks


class EmbeddingNet(nn.Module):
    """Encoder + projection head (PolyCL, SimCLR): image (B,1,S,S) -> embedding (B, D)."""

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x)[-1])


class PixelEmbeddingNet(nn.Module):
    """Whole U-Net / TransUNet + dense 1x1 projection (Pix2Rep): image -> pixel embeddings (B, D, S, S)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, dim: int = 64):
        super().__init__()
        if not hasattr(decoder, "last_features") or not hasattr(decoder, "conv_last"):
            raise TypeError("Pix2Rep needs a decoder with full-resolution features (polycl_unet, resunet, transunet)")
        self.encoder = encoder
        self.decoder = decoder
        width = decoder.conv_last.in_channels
        self.projection = nn.Sequential(nn.Conv2d(width, dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1))
        decoder.conv_last.requires_grad_(False)  # unused by the pixel objective; stays as initialised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.decoder.last_features(self.encoder(x)))


def build_pretraining_net(config: PretrainConfig) -> nn.Module:
    network: SegmentationNet = build_model(config.architecture, **config.architecture_args)
    if config.method == "pix2rep":
        return PixelEmbeddingNet(network.encoder, network.decoder, config.projection_dim or 64)
    head = ProjectionHead(network.encoder.out_channels, config.projection_dim or 256)
    return EmbeddingNet(network.encoder, head)


# ---------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, clean: bool = True) -> None:
        """Tear down a process group this context created.  After a clean run the ranks leave
        together (a rank exiting while a peer still tears down can abort gloo with "terminate called
        without an active exception"); after an error no rank waits for the others."""
        if self.created_group and dist.is_initialized():
            try:
                if clean:
                    dist.barrier()
            finally:
                dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun (idempotent); else single process.

    Backend: :func:`~polycl.devices.distributed_backend` (NCCL for CUDA processes, gloo otherwise).
    Each process uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(distributed_backend(resolved))
        created = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, created)


class SharedCancel:
    """A cancel flag that is set on every rank as soon as it is set on any rank."""

    def __init__(self, cancel: CancelFlag | None, context: DistContext):
        self.cancel = cancel
        self.context = context

    def is_set(self) -> bool:
        local = bool(self.cancel is not None and self.cancel.is_set())
        if not self.context.distributed:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.context.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _mean_over_ranks(value: float, context: DistContext) -> float:
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def parameter_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------
# Optimizer state beside the checkpoint (exact resume)


def optimizer_state_path(checkpoint: str | os.PathLike) -> Path:
    return Path(f"{checkpoint}.optim")


def save_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, scheduler, epoch: int) -> None:
    state = optimizer.state_dict()
    tensors = {f"state.{pid}.{name}": (value if isinstance(value, torch.Tensor) else torch.tensor(value)).cpu()
               for pid, entry in state["state"].items() for name, value in entry.items()}
    metadata = {"format": OPTIMIZER_STATE_FORMAT, "epoch": str(epoch),
                "param_groups": json.dumps(state["param_groups"]),
                "scheduler": json.dumps(scheduler.state_dict() if scheduler is not None else {})}
    if not tensors:
        tensors = {"empty": torch.zeros(1)}
    write_safetensors(path, tensors, metadata)


def load_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, scheduler, epoch: int) -> bool:
    """Restore Adam moments + schedule saved with the checkpoint of ``epoch``; False if unusable."""
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != OPTIMIZER_STATE_FORMAT or metadata.get("epoch") != str(epoch):
            return False
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    if scheduler is not None and metadata.get("scheduler"):
        scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    return True


# ---------------------------------------------------------------------------------------------
# Training


def _chunks(items: list[int], size: int) -> list[list[int]]:
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # NT-Xent needs >= 2 pairs; keep batch counts equal
        chunks[-2].extend(chunks.pop())
    return chunks


def _card(config: PretrainConfig, index: SliceIndex, epoch: int, history_losses: list[float],
          context: DistContext, extra_data: dict | None, sampler_stats: dict) -> dict:
    whole = config.method == "pix2rep"
    return default_card(
        config.architecture, config.architecture_args, config.input_size,
        kind="pretraining" if whole else "encoder",
        whole_network=whole,
        polycl_version=__version__,
        recipe={**asdict(config), "method": config.method, "tau": config.temperature(),
                "optimizer": "Adam",
                "scheduler": f"CosineAnnealingWarmRestarts(T_0={config.restart_epochs} epochs, per batch)",
                "world_size": context.world_size,
                "objective": {"polycl-s": "PolyCL triplet (same scan / other scan)",
                              "polycl-o": "PolyCL triplet (same / different organ presence)",
                              "polycl-m": "PolyCL triplet (same scan and presence / different presence)",
                              "simclr": "SimCLR NT-Xent on augmentation pairs",
                              "pix2rep": "Pix2Rep pixel NT-Xent, equivariant to affine warps"}[config.method]},
        data={**describe(index), **sampler_stats, **(extra_data or {})},
        metrics={"final_loss": round(history_losses[-1], 6) if history_losses else None,
                 "loss_history": [round(v, 6) for v in history_losses]},
        training_state={"epoch": epoch, "epochs": config.epochs, "complete": epoch >= config.epochs},
    )


def pretrain(index: SliceIndex, output: str | os.PathLike, config: PretrainConfig | None = None,
             resume: str | os.PathLike | None = None, progress: EpochCallback | None = None,
             cancel: CancelFlag | None = None, on_batch: BatchCallback | None = None,
             overwrite: bool = False, data_description: dict | None = None) -> PretrainResult:
    """Pretrain on the slices of ``index`` (``index.images`` must be loaded at the input size).

    Writes ``output`` (weights + model card; ``kind`` "encoder" for PolyCL / SimCLR, "pretraining"
    with ``whole_network`` for Pix2Rep) every ``save_every`` epochs and at the end, with the Adam
    state beside it in ``output.optim`` for exact resume.  ``resume`` continues from a checkpoint's
    saved epoch.  Under torchrun this runs data-parallel; call it on every rank.
    """
    config = config or PretrainConfig()
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    check_input_size(config.input_size)
    if index.images is None or index.input_size != config.input_size:
        raise ValueError(f"the slice index must hold images at the input size {config.input_size} "
                         "(build_slice_index(..., size=input_size))")
    output = Path(output)
    resuming_in_place = resume is not None and Path(resume).resolve() == output.resolve()
    if output.exists() and not overwrite and not resuming_in_place:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) or choose a new file")
    context = init_distributed(config.device)
    try:
        result = _pretrain(index, output, config, resume, progress, cancel, on_batch, data_description, context)
    except BaseException:
        context.close(clean=False)
        raise
    context.close()
    return result


def _pretrain(index: SliceIndex, output: Path, config: PretrainConfig, resume, progress, cancel, on_batch,
              data_description, context: DistContext) -> PretrainResult:
    if config.batch_size % context.world_size:
        raise ValueError(f"batch size {config.batch_size} must be divisible by the {context.world_size} processes")
    local_batch = config.batch_size // context.world_size
    if config.method == "simclr" and local_batch < 2:
        raise ValueError("SimCLR needs at least 2 slices per process and batch")
    device = context.device
    seed_everything(config.seed)
    configure_precision("auto", device)  # CUDA: TF32 + cuDNN autotuning; training itself runs in float32
    net = place(build_pretraining_net(config), device)
    start_epoch, losses = 0, []
    if resume is not None:
        start_epoch, losses = _load_resume(net, resume, config)
    model: nn.Module = net
    if context.distributed:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = make_sampler(config.method, index, config.anchor_fraction, config.seed,
                           config.negative_source, config.strict_negatives)
    first_draw = sampler.draw(max(1, start_epoch + 1))
    per_rank = math.ceil(len(first_draw.items) / context.world_size)
    batches = len(_chunks(list(range(per_rank)), local_batch))
    optimizer, scheduler = make_optimizer([p for p in net.parameters() if p.requires_grad], config.lr, batches,
                                          config.restart_epochs)
    if start_epoch:
        if not load_optimizer_state(optimizer_state_path(resume), optimizer, scheduler, start_epoch):
            warnings.warn("no matching optimizer state beside the checkpoint; Adam moments restart from zero",
                          stacklevel=2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler.step(start_epoch * batches)
    images = index.images
    tau = config.temperature()
    stats = {"anchors": int(len(first_draw.items)), "dropped_anchors": first_draw.dropped,
             "negative_fallbacks_first_epoch": first_draw.fallbacks}
    state = {"generator": torch.Generator()}

    def make_batches(epoch: int):
        draw = first_draw if epoch == max(1, start_epoch + 1) else sampler.draw(epoch)
        shard = DistributedSampler(range(len(draw.items)), num_replicas=context.world_size, rank=context.rank,
                                   shuffle=True, seed=config.seed, drop_last=False)
        shard.set_epoch(epoch)
        torch.manual_seed(config.seed * 1_000_003 + epoch * 7919 + context.rank)  # dropout
        state["generator"] = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 7919 + context.rank)
        for chunk in _chunks(list(shard), local_batch):
            yield torch.from_numpy(draw.items[chunk])

    def loss_fn(network: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        generator = state["generator"]
        if config.method.startswith("polycl"):
            x = images[rows.T.reshape(-1)].float().to(device)  # anchors, positives, negatives
            anchor, positive, negative = network(x).chunk(3)
            return polycl_triplet_loss(anchor, positive, negative, tau)
        x = images[rows[:, 0]].float().to(device)  # augmented on the training device
        if config.method == "simclr":
            first, second = simclr_views(x, generator)
            z1, z2 = network(torch.cat([first, second])).chunk(2)
            return nt_xent(z1, z2, tau)
        first, second, theta = pix2rep_views(x, generator)
        f1, f2 = network(torch.cat([first, second])).chunk(2)
        valid = valid_region(theta, tuple(f2.shape[-2:]), device)
        return pixel_nt_xent(warp(f1, theta), f2, valid, config.pixel_pairs, tau, generator)

    def save(epoch: int) -> None:
        if context.is_main:
            card = _card(config, index, epoch, losses, context, data_description, stats)
            save_checkpoint(output, net.state_dict(), card)
            save_optimizer_state(optimizer_state_path(output), optimizer, scheduler, epoch)
        context.barrier()

    def end_of_epoch(epoch: int, loss: float) -> tuple[dict[str, float], bool]:
        losses.append(_mean_over_ranks(loss, context))
        if epoch == config.epochs or (config.save_every and epoch % config.save_every == 0):
            save(epoch)
        return {"mean_loss_all_ranks": losses[-1]}, False

    history = fit(model, config.epochs, make_batches, loss_fn, optimizer, scheduler, end_of_epoch,
                  progress if context.is_main else None, SharedCancel(cancel, context), start_epoch,
                  on_batch if context.is_main else None, batches)
    checksum = parameter_checksum(net)
    in_sync = True
    if context.distributed:
        gathered = [None] * context.world_size
        dist.all_gather_object(gathered, checksum)
        in_sync = all(value == gathered[0] for value in gathered)
    if start_epoch >= config.epochs:  # nothing left to train: write the resumed weights to the output
        save(start_epoch)
    card = _card(config, index, max(start_epoch, config.epochs), losses, context, data_description, stats)
    return PretrainResult(output, card, history, start_epoch, context.rank, context.world_size,
                          context.is_main, checksum, in_sync)


def _load_resume(net: nn.Module, path: str | os.PathLike, config: PretrainConfig) -> tuple[int, list[float]]:
    tensors, card = read_checkpoint(path)
    recipe = card.get("recipe", {})
    if recipe.get("method") != config.method:
        raise ValueError(f"{path}: was pretrained with {recipe.get('method')!r}, not {config.method!r}")
    if card["architecture"] != config.architecture or card["input_size"] != config.input_size or \
            card["architecture_args"] != config.architecture_args:
        raise ValueError(f"{path}: architecture / input size differ from this run "
                         f"({card['architecture']} {card['architecture_args']} @ {card['input_size']})")
    if "training_state" not in card:
        raise ValueError(f"{path}: has no training state (not written by polycl pretrain); cannot resume")
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the {config.method} network "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return int(card["training_state"]["epoch"]), list(card.get("metrics", {}).get("loss_history", []))

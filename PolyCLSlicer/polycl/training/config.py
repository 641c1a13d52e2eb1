"""What a finetuning run is asked to do (``FinetuneConfig``), below the modules that read it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinetuneConfig:
    """Defaults follow the papers: Adam lr 1e-3, batch 10, 100 epochs, restarts every 10 epochs.

    ``architecture`` and ``input_size`` left at None take the ``init`` checkpoint's (else
    polycl_unet, 256 px); ``architecture_args`` update the checkpoint's own (see ``resolve_config``).
    """

    architecture: str | None = None
    architecture_args: dict = field(default_factory=dict)
    input_size: int | None = None
    epochs: int = 100
    batch_size: int = 10
    lr: float = 1e-3
    restart_epochs: int = 10
    val_fraction: float = 0.2  # fraction of scans held out, rounded (0.2 of 2 scans holds out none)
    middle_fraction: float | None = None  # papers' option: train on the middle 30 % of slices only
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    slices: str = "all"  # "annotated": only slices with label foreground + empty_slices (polycl.sparse)
    empty_slices: list = field(default_factory=list)  # liver-free array slices k ([k, ...] or one list per scan)
    dice_pooled: bool = False  # soft Dice pooled over the batch instead of per slice (``soft_dice_loss``)
    bce_weight: float = 0.0  # + weight x pixel BCE: per-slice soft Dice has almost no gradient on liver-free slices
    train_slices: list | None = None  # per scan, canonical slices (0 = most inferior) to train on; None: all.
    # Unlike cropping the volume, a 2.5D network still sees the kept slices' true neighbours.
    augment_intensity: float = 0.05  # intensity offset range (window units) of the augmentation
    augment_noise: float = 0.0  # maximum Gaussian noise standard deviation (window units)
    # liver-only offset range (window units; 0.15 = ±60 HU at W400): the liver's enhancement differs by
    # contrast phase (non-contrast ~50 HU, portal ~100 HU) while a global offset shifts every tissue alike
    augment_organ_contrast: float = 0.0
    # square of this many mm centred on the body -> the input (polycl.field_of_view); 0: the whole slice
    # resized (the papers); None: the init checkpoint's choice (whole slice without one)
    field_of_view_mm: float | None = None
    # probability per training sample of a simulated small reconstruction field of view (``field_of_view_crop``:
    # a 150-350 mm disc or square on the body, air and no label outside); needs field_of_view_mm
    augment_fov_crop: float = 0.0
    precision: str = "auto"  # forward/backward: bf16 autocast where the device runs bf16 natively, else fp32

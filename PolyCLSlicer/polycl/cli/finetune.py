"""``polycl finetune``: pair CTs with liver masks, check everything, print the split, then train."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..io.cases import case_name, find_label_files, find_volumes, is_label_file

EPILOG = """examples:
  polycl finetune --images data/ --labels data/ -o liver.safetensors --init starter --size 128 --epochs 40
  polycl finetune --images ct/ --labels masks/ -o liver.safetensors --init polycl_m.ckpt --val-fraction 0.2
  polycl finetune --images a_ct.nii.gz b_ct.nii.gz --labels a_liver.nii.gz b_liver.nii.gz -o mine.safetensors

A folder given to --images contributes its CT files (label files such as case_liver.nii.gz are skipped);
images and labels pair by case name (case_ct <-> case_liver). The split into training and validation
scans is printed before training starts."""


class PairingError(ValueError):
    """Images and labels cannot be paired."""


def pair_images_and_labels(images: list[str], labels: list[str]) -> list[tuple[Path, Path]]:
    """Pair CTs with masks by case name (``case_ct`` <-> ``case_liver``), else in the given order.

    Label-looking files (``polycl.io.cases.is_label_file``) are never taken as images.
    """
    image_files = [p for p in find_volumes(images) if not is_label_file(p)]
    label_files = find_label_files(labels)
    if not image_files:
        raise PairingError(f"--images {' '.join(images)} holds only label files (e.g. *_liver); give the CT files")
    label_by_case = {case_name(p): p for p in label_files}
    if len(label_by_case) == len(label_files) and all(case_name(p) in label_by_case for p in image_files):
        return [(p, label_by_case[case_name(p)]) for p in image_files]
    if len(image_files) != len(label_files):
        unpaired = [p.name for p in image_files if case_name(p) not in label_by_case]
        raise PairingError(f"{len(image_files)} images but {len(label_files)} labels, and names do not pair up "
                           f"(no label for {', '.join(unpaired[:3]) or 'some images'})")
    return list(zip(image_files, label_files, strict=True))


SCRATCH = "none"
STARTER_ARCHITECTURES = ("polycl_unet", "polycl_unet25d")  # the starter's network, also widened to 2.5D


def _resolved_init(init: str | None, architecture: str | None) -> tuple[str | None, str]:
    """The --init checkpoint file (None: random weights) and a sentence saying what training starts from.

    Without --init training starts from the bundled starter model (few labels go much further from a trained
    liver model than from random weights), unless --architecture names a network it cannot initialise."""
    from ..nets.model_card import STARTER_CHECKPOINT

    if init is None:
        init = "starter" if architecture in (None, *STARTER_ARCHITECTURES) else SCRATCH
    if init == SCRATCH:
        why = "--init none" if architecture in (None, *STARTER_ARCHITECTURES) else f"--architecture {architecture}"
        return None, f"starting from random weights ({why})"
    if init == "starter":
        return str(STARTER_CHECKPOINT), f"starting from the bundled starter model ({STARTER_CHECKPOINT.name})"
    if not Path(init).is_file():
        raise FileNotFoundError(f"--init {init}: no such file")
    return init, f"starting from {init}"


def _config_from_args(args: argparse.Namespace):
    """The finetuning configuration, validated (sizes, fractions, init checkpoint) before any data is read."""
    from ..training.config import FinetuneConfig
    from ..training.finetuning import resolve_config

    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.middle_fraction is not None and not 0 < args.middle_fraction <= 1:
        raise ValueError(f"--middle-fraction {args.middle_fraction} must be in (0, 1]")
    from ..training.sparse_training import recipe_defaults

    if args.empty_slices and args.slices != "annotated":
        raise ValueError("--empty-slices needs --slices annotated")
    if args.slices == "annotated" and args.middle_fraction is not None:
        raise ValueError("--middle-fraction cannot be combined with --slices annotated")
    for name, value in recipe_defaults(args.slices).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    architecture_args = {} if args.dropout is None else {"dropout": args.dropout}
    if args.context_slices is not None:
        architecture_args["context_slices"] = args.context_slices
    config = FinetuneConfig(
        architecture=args.architecture, architecture_args=architecture_args,
        input_size=args.size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_fraction=args.val_fraction, middle_fraction=args.middle_fraction, augment=not args.no_augment,
        seed=args.seed, device=args.device, slices=args.slices, empty_slices=list(args.empty_slices or []),
        field_of_view_mm=args.field_of_view)
    try:
        config = resolve_config(config, args.init)[0]  # the size note is warned by finetune() itself
    except ValueError as error:
        raise ValueError(str(error).replace("input size", "--size", 1).replace("field_of_view_mm", "--field-of-view",
                                                                               1)) from None
    check_context_option(config)
    return config


def check_context_option(config) -> None:
    """--context-slices only for polycl_unet25d, and a valid count, before any data is read."""
    from ..nets.unet25d import DEFAULT_CONTEXT_SLICES, check_context_slices

    count = config.architecture_args.get("context_slices")
    if config.architecture != "polycl_unet25d":
        if count is not None:
            raise ValueError(f"--context-slices applies to --architecture polycl_unet25d, not {config.architecture}")
        return
    try:
        check_context_slices(DEFAULT_CONTEXT_SLICES if count is None else count)
    except ValueError as error:
        raise ValueError(str(error).replace("context_slices", "--context-slices", 1)) from None


def _read_pairs(pairs: list[tuple[Path, Path]], allow_non_ct: bool) -> list:
    from ..io.volumes import read_mask, read_volume
    from ..preprocessing import check_ct

    volumes = []
    for image_path, label_path in pairs:
        volume = read_volume(image_path)
        check_ct(volume.array, str(image_path), allow_non_ct, action="train on it")
        mask = read_mask(label_path, volume)
        if not mask.array.any():
            raise ValueError(f"{label_path}: the label is empty (no liver voxels); draw the liver or leave "
                             "this case out")
        volumes.append((volume, mask))
    return volumes


def _split(pairs: list[tuple[Path, Path]], config) -> tuple[list[int], list[int]]:
    """The split ``finetune`` will make (same function, same seed), checked before any volume is read."""
    from ..training.finetuning import split_scans

    try:
        return split_scans(len(pairs), config.val_fraction, config.seed)
    except ValueError as error:
        raise ValueError(str(error).replace("validation fraction", "--val-fraction", 1)) from None


def _print_split(pairs: list[tuple[Path, Path]], volumes: list, split: tuple[list[int], list[int]],
                 val_fraction: float) -> None:
    from ..geometry import axial_axis

    train, val = split

    def describe(indices: list[int]) -> str:
        return ", ".join(f"{case_name(pairs[i][0])} ({volumes[i][0].array.shape[axial_axis(volumes[i][0].ijk_to_ras)]}"
                         " slices)" for i in indices) or "none"

    print(f"training on {len(train)} scan(s): {describe(train)}", file=sys.stderr)
    reason = "" if val else (f" (--val-fraction {val_fraction} of {len(pairs)} scan(s) rounds to 0;"
                             " the epoch with the lowest training loss is kept)")
    print(f"validating on {len(val)} scan(s): {describe(val)}{reason}", file=sys.stderr)
    for image_path, label_path in pairs:
        print(f"  {image_path.name} <- {label_path.name}", file=sys.stderr)


def command_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..training.finetuning import finetune
    from .common import check_output_path

    output = check_output_path(args.output, args.overwrite, (".safetensors", ".ckpt"),
                               (args.init, *args.images, *args.labels))
    args.init, start = _resolved_init(args.init, args.architecture)
    config = _config_from_args(args)
    pairs = pair_images_and_labels(args.images, args.labels)
    split = _split(pairs, config)
    if args.empty_slices and len(pairs) != 1:
        raise ValueError(f"--empty-slices needs exactly one image (got {len(pairs)}): slice numbers are per scan")
    volumes = _read_pairs(pairs, args.allow_non_ct)
    if config.slices == "annotated":
        from ..training.sparse_training import describe_selection

        print(describe_selection(volumes, config), file=sys.stderr)
    else:
        _print_split(pairs, volumes, split, config.val_fraction)
    print(start, file=sys.stderr)
    bar = tqdm(total=args.epochs, desc="finetune", unit="epoch", file=sys.stderr)

    def progress(report) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{report.loss:.4f}", **{k: f"{v:.4f}" for k, v in report.metrics.items()})

    try:
        result = finetune(volumes, output, config, init=args.init, progress=progress, overwrite=args.overwrite,
                          recipe_notes={"command": "polycl " + shlex.join(args.argv)})
    finally:
        bar.close()
    print(f"wrote {result.path} (best epoch {result.best_epoch}, {start}; {json.dumps(result.card['metrics'])})")
    return 0


def add_finetune_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``polycl finetune``."""
    from .common import HelpFormatter

    parser = subparsers.add_parser("finetune", help="train a segmentation model on CT + liver masks",
                                   description="Finetune (or train from scratch) with soft Dice loss.",
                                   epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, help="CT files or folders (label files are skipped)")
    parser.add_argument("--labels", nargs="+", required=True,
                        help="liver masks or folders (paired by case name, e.g. case_ct <-> case_liver, else in order)")
    parser.add_argument("-o", "--output", required=True, help="output checkpoint (.safetensors)")
    parser.add_argument("--init", help="initial checkpoint: pretrained encoder, a segmentation model, 'starter' (the "
                        "bundled model) or 'none' (random weights); default: starter, or none for --architecture "
                        "resunet / transunet")
    parser.add_argument("--architecture", choices=["polycl_unet", "resunet", "transunet", "polycl_unet25d"],
                        help="network (default: the --init checkpoint's, else polycl_unet); polycl_unet25d: 2.5D, "
                             "adjacent axial slices as input channels")
    parser.add_argument("--context-slices", type=int, metavar="K",
                        help="polycl_unet25d: adjacent axial slices per input, odd, centre predicted (default: 3 = "
                             "below, centre, above; or the --init checkpoint's)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: 100; 10 with --slices annotated)")
    parser.add_argument("--batch-size", type=int, help="slices per batch (default: 10; 8 with --slices annotated)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3; 1e-4 with --slices annotated)")
    parser.add_argument("--slices", choices=["all", "annotated"], default="all",
                        help="'all': every slice, unlabelled ones as background; 'annotated': only slices whose "
                             "label has liver, plus --empty-slices (for a few painted slices)")
    parser.add_argument("--empty-slices", type=int, nargs="+", metavar="K",
                        help="with --slices annotated: liver-free slices trained as background (index k along "
                             "the image array's axial axis, as 3D Slicer numbers them; one image only)")
    parser.add_argument("--size", type=int, help="model input size in pixels, a multiple of 16 and at least 32 "
                        "(default: the --init checkpoint's, else 256)")
    parser.add_argument("--field-of-view", type=float, metavar="MM",
                        help="network input: a square of MM millimetres around the body (same mm per pixel on every "
                             "scan; the starter uses 400); 0: the whole slice resized, as in the papers "
                             "(default: the --init checkpoint's, else 0)")
    parser.add_argument("--dropout", type=float,
                        help="dropout in each block (default: the --init checkpoint's, else 0.25 for polycl_unet)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of scans held out for validation, rounded (0.2 of 2 scans holds out none; "
                             "0: keep the epoch with the best training loss)")
    parser.add_argument("--middle-fraction", type=float, default=None,
                        help="train only on the middle fraction of each scan's slices (papers: 0.3; default: all)")
    parser.add_argument("--no-augment", action="store_true", help="disable random affine/intensity augmentation")
    parser.add_argument("--allow-non-ct", action="store_true",
                        help="train even on images whose intensities do not look like CT in Hounsfield units")
    parser.add_argument("--seed", type=int, default=0, help="random seed (split, initialisation, batches)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
    parser.set_defaults(handler=command_finetune)
    return parser

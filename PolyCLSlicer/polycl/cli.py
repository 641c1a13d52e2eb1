"""The ``polycl`` command line: segment, finetune, evaluate, info, sample (+ propagate, pretrain)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

EXIT_ERROR = 2
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class CliError(Exception):
    """A user error reported as one line with a non-zero exit code."""


def _tqdm_progress(description: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A progress(fraction, message) callback drawing a tqdm bar, and its closer."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", leave=False, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message, refresh=True)

    return update, bar.close


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it")


def _print_metrics(metrics: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    print(f"Dice {metrics['dice']:.4f}  HD {metrics['hd_mm']:.1f} mm  HD95 {metrics['hd95_mm']:.1f} mm  "
          f"mean 2D slice Dice {metrics['mean_slice_dice_2d']:.4f}")


def command_segment(args: argparse.Namespace) -> int:
    from .inference import Segmenter
    from .io import read_mask, read_volume, write_mask, write_volume
    from .metrics import evaluate
    from .preprocessing import validate_ct

    output = Path(args.output)
    _check_output(output, args.overwrite)
    volume = read_volume(args.input)
    notes = validate_ct(volume.array, str(args.input))
    if notes and not args.allow_non_ct:
        raise CliError(f"{notes[0]}; pass --allow-non-ct to segment anyway")
    for note in notes:
        print(f"polycl: warning: {note}", file=sys.stderr)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, args.device)
    progress, close = _tqdm_progress("segment")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already reported above
            result = segmenter.segment(volume.array, volume.ijk_to_ras, batch_size=args.batch_size,
                                       largest_component=not args.no_largest_component, progress=progress)
    finally:
        close()
    mask = result.mask
    if getattr(args, "refine", "none") != "none":
        from .cli_sam import refine_from_args

        mask = refine_from_args(args, volume, mask)
    write_mask(output, mask, volume.ijk_to_ras)
    if args.probability:
        write_volume(args.probability, result.probability, volume.ijk_to_ras)
    print(f"wrote {output} ({int(mask.sum())} liver voxels, "
          f"{float(mask.sum()) * float(np.prod(volume.spacing)) / 1000:.1f} mL)")
    if args.reference:
        _print_metrics(evaluate(mask, read_mask(args.reference, volume).array, volume.ijk_to_ras))
    return 0


def _case_key(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES + (".seg.nrrd",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[_-](ct|image|img|liver|label|labels|mask|seg)$", "", name, flags=re.IGNORECASE)


def _expand(paths: list[str]) -> list[Path]:
    """Files as given; a folder expands to its volume files (sorted), a DICOM folder stays one item."""
    out = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))
            out.extend(files or [path])
        else:
            out.append(path)
    return out


def pair_images_and_labels(images: list[str], labels: list[str]) -> list[tuple[Path, Path]]:
    """Pair CTs with masks by case name (``case_ct`` <-> ``case_liver``), or in the given order."""
    image_files, label_files = _expand(images), _expand(labels)
    label_by_key = {_case_key(p): p for p in label_files}
    if all(_case_key(p) in label_by_key for p in image_files) and len(label_by_key) == len(label_files):
        return [(p, label_by_key[_case_key(p)]) for p in image_files]
    if len(image_files) != len(label_files):
        raise CliError(f"{len(image_files)} images but {len(label_files)} labels, and names do not pair up")
    return list(zip(image_files, label_files, strict=True))


def _model_settings(args: argparse.Namespace) -> tuple[str, dict, int]:
    """Architecture, its args and input size: given options first, else the --init card's, else defaults."""
    card = {}
    if args.init:
        from .checkpoints import read_checkpoint

        card = read_checkpoint(args.init)[1]
    architecture = args.architecture or card.get("architecture", "polycl_unet")
    architecture_args = dict(card.get("architecture_args", {})) if architecture == card.get("architecture") else {}
    if args.dropout is not None:
        architecture_args["dropout"] = args.dropout
    size = args.size or int(card.get("input_size", 256))
    return architecture, architecture_args, size


def command_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .finetuning import FinetuneConfig, finetune
    from .io import read_mask, read_volume

    output = Path(args.output)
    _check_output(output, args.overwrite)
    pairs = []
    for image_path, label_path in pair_images_and_labels(args.images, args.labels):
        volume = read_volume(image_path)
        pairs.append((volume, read_mask(label_path, volume)))
    architecture, architecture_args, size = _model_settings(args)
    config = FinetuneConfig(
        architecture=architecture, architecture_args=architecture_args, input_size=size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
        middle_fraction=args.middle_fraction, augment=not args.no_augment, seed=args.seed, device=args.device,
    )
    bar = tqdm(total=args.epochs, desc="finetune", unit="epoch", file=sys.stderr)

    def progress(report) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{report.loss:.4f}", **{k: f"{v:.4f}" for k, v in report.metrics.items()})

    try:
        result = finetune(pairs, output, config, init=args.init, progress=progress, overwrite=args.overwrite,
                          recipe_notes={"command": "polycl " + shlex.join(args.argv)})
    finally:
        bar.close()
    print(f"wrote {result.path} (best epoch {result.best_epoch}; {json.dumps(result.card['metrics'])})")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from .io import read_mask
    from .metrics import evaluate

    reference = read_mask(args.reference)
    prediction = read_mask(args.prediction, reference)
    _print_metrics(evaluate(prediction.array, reference.array, reference.ijk_to_ras), args.json)
    return 0


def command_info(args: argparse.Namespace) -> int:
    from .checkpoints import STARTER_CHECKPOINT, load_checkpoint, read_checkpoint

    path = Path(args.checkpoint) if args.checkpoint else STARTER_CHECKPOINT
    tensors, card = read_checkpoint(path)
    if card["kind"] == "segmentation":
        load_checkpoint(path)  # full validation: architecture and every shape
    parameters = sum(t.numel() for t in tensors.values())
    print(json.dumps({"file": str(path), "parameters": parameters, **card}, indent=2))
    return 0


def command_sample(args: argparse.Namespace) -> int:
    from .samples import SAMPLES, fetch_sample, sample_label

    if args.list:
        for sample in SAMPLES.values():
            print(f"{sample.name:14s} {sample.description}")
        return 0
    print(fetch_sample(args.name, allow_download=not args.offline))
    if args.label:
        label = sample_label(args.name)
        if label is None:
            raise CliError(f"sample {args.name} has no local reference mask")
        print(label)
    return 0


def _add_segment(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment the liver in a CT volume",
                                   description="Segment the liver in a CT (NIfTI, NRRD, MHA or DICOM folder).")
    parser.add_argument("input", help="CT file or DICOM series folder")
    parser.add_argument("-o", "--output", required=True, help="output mask file (.nii.gz, .nrrd, .seg.nrrd, .mha)")
    parser.add_argument("--checkpoint", help="PolyCL checkpoint (default: the bundled starter model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices per forward pass (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--reference", help="reference liver mask: print Dice / HD / HD95")
    parser.add_argument("--probability", help="also write the liver probability map to this file")
    parser.add_argument("--no-largest-component", action="store_true",
                        help="keep every connected component (default keeps the largest 3D one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--allow-non-ct", action="store_true",
                        help="segment even when the intensities do not look like CT in Hounsfield units")
    try:
        from .cli_sam import add_refine_arguments
    except ImportError:
        pass
    else:
        add_refine_arguments(parser)
    parser.set_defaults(handler=command_segment)


def _add_finetune(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="train a segmentation model on CT + liver masks",
                                   description="Finetune (or train from scratch) with soft Dice loss.")
    parser.add_argument("--images", nargs="+", required=True, help="CT files or folders")
    parser.add_argument("--labels", nargs="+", required=True,
                        help="liver masks (paired by case name, e.g. case_ct <-> case_liver, else in order)")
    parser.add_argument("-o", "--output", required=True, help="output checkpoint (.safetensors)")
    parser.add_argument("--init", help="initial checkpoint: pretrained encoder or a segmentation model")
    parser.add_argument("--architecture", choices=["polycl_unet", "resunet"],
                        help="network (default: the --init checkpoint's, else polycl_unet)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, help="model input size in pixels (default: the --init checkpoint's, "
                        "else 256)")
    parser.add_argument("--dropout", type=float,
                        help="dropout in each block (default: the --init checkpoint's, else 0.25 for polycl_unet)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of scans held out for validation (0: keep the best training loss)")
    parser.add_argument("--middle-fraction", type=float, default=None,
                        help="train only on the middle fraction of each scan's slices (papers: 0.3)")
    parser.add_argument("--no-augment", action="store_true", help="disable random affine/intensity augmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
    parser.set_defaults(handler=command_finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polycl", description="PolyCL liver segmentation in CT.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_segment(subparsers)
    _add_finetune(subparsers)

    evaluate = subparsers.add_parser("evaluate", help="compare a mask with a reference",
                                     description="3D Dice, Hausdorff and HD95 in mm (+ 2D per-slice Dice).")
    evaluate.add_argument("prediction")
    evaluate.add_argument("reference")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(handler=command_evaluate)

    info = subparsers.add_parser("info", help="print a checkpoint's model card",
                                 description="Validate a checkpoint and print its model card.")
    info.add_argument("checkpoint", nargs="?", help="checkpoint file (default: the bundled starter model)")
    info.set_defaults(handler=command_info)

    sample = subparsers.add_parser("sample", help="get a sample CT and print its path",
                                   description="Print the path of a sample CT (cache, local data, or download).")
    sample.add_argument("name", nargs="?", default="totalseg_dcm")
    sample.add_argument("--list", action="store_true", help="list the known samples")
    sample.add_argument("--label", action="store_true", help="also print the reference mask path")
    sample.add_argument("--offline", action="store_true", help="never download")
    sample.set_defaults(handler=command_sample)

    for module, function in (("cli_sam", "add_propagate_command"), ("cli_pretrain", "add_pretrain_command")):
        try:
            add = getattr(__import__(f"polycl.{module}", fromlist=[function]), function)
        except (ImportError, AttributeError):
            continue
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest: f"polycl: warning: {message}\n"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("polycl: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (CliError, ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"polycl: error: {message.strip(chr(39))}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())

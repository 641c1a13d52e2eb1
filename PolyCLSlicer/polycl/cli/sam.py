"""CLI pieces for SAM refinement and one-slice propagation, hooked into ``polycl.cli.main``.

* :func:`add_refine_arguments` adds ``--refine none|litemedsam|sam|sam2`` and its options to
  ``polycl segment``; :func:`refine_from_args` applies them to the coarse mask.
* :func:`add_propagate_command` (alias :func:`add_cli_commands`) registers ``polycl propagate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..io.base import Volume


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``polycl segment`` that refine the PolyCL mask with SAM box prompts."""
    group = parser.add_argument_group("SAM refinement")
    group.add_argument("--refine", default="none", choices=["none", "litemedsam", "sam", "sam2"],
                       help="refine each slice with box prompts: litemedsam (bundled weights, CPU-friendly), "
                            "sam (needs --sam-checkpoint) or sam2 (needs --sam2-checkpoint); default none")
    group.add_argument("--sam-checkpoint",
                       help="segment-anything checkpoint (e.g. sam_vit_b_01ec64.pth; default: none)")
    group.add_argument("--sam-model", choices=["vit_b", "vit_l", "vit_h"],
                       help="SAM architecture (default: from the official file's SHA-256 or its name)")
    group.add_argument("--sam2-checkpoint", help="SAM 2 checkpoint (e.g. sam2.1_hiera_tiny.pt; default: none)")
    group.add_argument("--sam2-config", help="SAM 2 config name, e.g. configs/sam2.1/sam2.1_hiera_t.yaml "
                                             "(default: from the checkpoint's file name)")
    group.add_argument("--refine-margin", type=int, default=2, help="box margin in pixels (default 2)")
    group.add_argument("--refine-min-iou", type=float, default=0.5,
                       help="keep the coarse mask where SAM's predicted IoU is below this (default 0.5; 0 = never)")
    group.add_argument("--refine-precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="encoder precision (auto: bf16 where the CPU/GPU runs it natively)")


def build_refiner_from_args(args: argparse.Namespace):
    """The refiner ``--refine ...`` asks for (None for ``none``), built before any segmentation work.

    ``sam`` needs ``--sam-checkpoint``; ``sam2`` needs ``--sam2-checkpoint`` (or ``--sam-checkpoint``).
    """
    name = getattr(args, "refine", "none")
    if name in (None, "none"):
        return None  # a plain segment never imports the SAM stack (or scipy through it)
    from ..sam.refine import build_refiner

    checkpoint = getattr(args, "sam_checkpoint", None)  # sam2 falls back to --sam-checkpoint
    if name == "sam2" and getattr(args, "sam2_checkpoint", None) is not None:
        checkpoint = args.sam2_checkpoint
    if name in ("sam", "sam2") and checkpoint is None:
        option = "--sam-checkpoint" if name == "sam" else "--sam2-checkpoint"
        raise ValueError(f"--refine {name} needs {option} FILE (its weights are not bundled); "
                         "or use --refine litemedsam")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"SAM checkpoint {checkpoint}: no such file")
    return build_refiner(name, checkpoint=checkpoint, model_type=getattr(args, "sam_model", None),
                         config=getattr(args, "sam2_config", None), device=getattr(args, "device", "auto"),
                         precision=getattr(args, "refine_precision", "auto"),
                         cache_bytes=0)  # one pass per slice: caching embeddings (4 MB each) only costs RAM


def review_line(result, max_dice: float = 0.9) -> str:
    """One line on which slices to check: the worst ones below ``max_dice``, else the lowest agreement."""
    worst = result.worst(5, max_dice)
    if worst:
        listed = ", ".join(f"{s.index} (Dice {s.dice:.2f})" for s in worst)
        return f"check these slices (axis {worst[0].axis}), coarse vs refined disagree most: {listed}"
    compared = [s for s in result.slices if s.coarse_pixels or s.refined_pixels]
    if not compared:
        return "no liver on any slice; nothing to review"
    lowest = min(compared, key=lambda s: s.dice)
    return (f"no slice below Dice {max_dice}: all {len(compared)} slices with liver agree "
            f"(min Dice {lowest.dice:.2f} at slice {lowest.index})")


def review_json(result, count: int = 5) -> dict:
    """The review for ``--json``: the line, and the slices to check with their Dice and RAS centre."""
    return {"line": review_line(result), "slices": [
        {"index": s.index, "axis": s.axis, "dice": s.dice, "center_ras": list(s.center_ras)}
        for s in result.worst(count)]}


def refine_from_args(args: argparse.Namespace, volume: Volume, mask: np.ndarray, refiner=None) -> np.ndarray:
    """Apply ``--refine ...`` to a coarse mask; prints the review line; returns the refined mask."""
    result = run_refinement(args, volume, mask, refiner)
    return mask if result is None else result.mask


def run_refinement(args: argparse.Namespace, volume: Volume, mask: np.ndarray, refiner=None):
    """``--refine ...`` on a coarse mask: the RefinementResult (None for ``--refine none``); prints its review."""
    from ..sam.refine import refine_volume
    from .common import tqdm_progress

    refiner = refiner or build_refiner_from_args(args)
    if refiner is None:
        return None
    progress, close = tqdm_progress(f"refine ({refiner.name})")
    try:
        min_iou = getattr(args, "refine_min_iou", 0.5)
        result = refine_volume(volume.array, volume.ijk_to_ras, mask, refiner,
                               margin=getattr(args, "refine_margin", 2), min_iou=min_iou or None,
                               progress=progress)
    finally:
        close()
    refined = [s for s in result.slices if s.prompted]
    fallbacks = sum(s.fallbacks for s in result.slices)
    cut = sum(s.cut_by_border for s in result.slices)
    print(f"polycl: refined {len(refined)} slices with {refiner.name} in {result.seconds:.1f} s"
          f" ({fallbacks} boxes kept the coarse mask: low predicted IoU"
          + (f"; {cut} pieces cut by the image border kept as segmented" if cut else "") + ")", file=sys.stderr)
    print(f"polycl: {review_line(result)}", file=sys.stderr)
    return result


def command_propagate(args: argparse.Namespace) -> int:
    """``polycl propagate``: one annotated slice -> volume mask."""
    from .. import __version__
    from ..io.base import MASK_SUFFIXES
    from ..io.volumes import read_mask, read_volume
    from ..preprocessing import check_ct
    from ..sam.propagation import StopRules, propagate_from_annotation
    from .common import check_input_path, check_output_path, tqdm_progress
    from .outputs import DICOM_SUFFIXES, check_extra_outputs, write_outputs

    check_input_path(args.input, "input")
    inputs = (args.input, args.annotation, args.guide, args.reference)
    output = check_output_path(args.output, args.overwrite, MASK_SUFFIXES + DICOM_SUFFIXES, inputs)
    for option in ("annotation", "guide", "reference", "sam2_checkpoint"):
        check_input_path(getattr(args, option), "--" + option.replace("_", "-"))
    if args.engine == "sam2" and args.sam2_checkpoint is None:
        raise ValueError("--engine sam2 needs --sam2-checkpoint FILE (its weights are not bundled)")
    check_extra_outputs(args, inputs)  # --dicom-seg / -o .dcm (needs a DICOM series input), --overlay
    volume = read_volume(args.input, series=args.series)
    for note in check_ct(volume.array, str(args.input), allow_non_ct=True):  # odd ranges are only a warning
        print(f"polycl: warning: {note}", file=sys.stderr)
    annotation = read_mask(args.annotation, volume)
    guide = read_mask(args.guide, volume).array if args.guide else None
    progress, close = tqdm_progress(f"propagate ({args.engine})")
    try:
        result = propagate_from_annotation(
            volume.array, volume.ijk_to_ras, annotation.array, engine=args.engine,
            checkpoint=args.sam2_checkpoint, config=args.sam2_config, direction=args.direction,
            bounds=tuple(args.bounds) if args.bounds else None, seed_slice=args.slice,
            stop=StopRules(patience=args.patience), guide_mask=guide, margin=args.margin,
            device=args.device, precision=args.precision, progress=progress)
    finally:
        close()
    write_outputs(args, volume, result.mask, f"PolyCLSlicer propagate ({result.engine})", f"polycl {__version__}",
                  automatic=False)
    print(f"polycl: propagated with {result.engine} from slice(s) {result.seed_indices} in {result.seconds:.1f} s; "
          f"{result.slices_with_mask} slices with liver", file=sys.stderr)
    for line in result.stops:
        print(f"polycl: {line}", file=sys.stderr)
    score = None
    if args.reference:
        from ..metrics import dice

        score = dice(result.mask, read_mask(args.reference, volume).array)
    if args.json:
        from .common import strict_json

        print(strict_json({
            "input": str(args.input), "output": str(output), "engine": result.engine,
            "seed_slices": list(result.seed_indices), "slices_with_liver": result.slices_with_mask,
            "liver_ml": float(result.mask.astype(bool).sum()) * float(np.prod(volume.spacing)) / 1000,
            "seconds": result.seconds, "stops": list(result.stops), "dice": score,
            "dicom_seg": args.dicom_seg, "overlay": args.overlay}))
        return 0
    liver_ml = float(result.mask.astype(bool).sum()) * float(np.prod(volume.spacing)) / 1000
    print(f"wrote {output} ({int(result.mask.astype(bool).sum())} liver voxels, {liver_ml:.1f} mL)")
    if score is not None:
        print(f"Dice {score:.4f}")
    return 0


PROPAGATE_EPILOG = """examples:
  polycl propagate ct.nii.gz --annotation one_slice.nii.gz -o liver.nii.gz --overlay liver.png
  polycl propagate ct.nii.gz --annotation one_slice.nii.gz -o liver.nii.gz --engine sam2 \\
      --sam2-checkpoint sam2.1_hiera_tiny.pt --direction up --bounds 10 60"""


def add_propagate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``polycl propagate``."""
    from .common import HelpFormatter
    from .outputs import add_output_arguments

    parser = subparsers.add_parser(
        "propagate", help="propagate a liver annotation on one axial slice through the volume",
        description="One annotated axial slice -> liver mask of the volume: SAM 2 video propagation when a "
                    "SAM 2 checkpoint is given, else box chaining with the bundled LiteMedSAM weights.",
        epilog=PROPAGATE_EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("input", help="CT file or DICOM series folder")
    parser.add_argument("--series", help="DICOM folder with several image series: which one (number or UID; "
                        "default: the only image series)")
    parser.add_argument("--annotation", required=True,
                        help="mask on the CT grid with the liver drawn on one axial slice (or several: each "
                             "seeds the slices nearest to it)")
    parser.add_argument("-o", "--output", required=True, help="output mask file (.nii.gz, .nrrd, .seg.nrrd, .mha; "
                        ".dcm: DICOM SEG, for a DICOM series input)")
    parser.add_argument("--engine", default="auto", choices=["auto", "sam2", "litemedsam"],
                        help="auto (default): sam2 when --sam2-checkpoint is given, else litemedsam")
    parser.add_argument("--sam2-checkpoint", help="SAM 2 checkpoint (e.g. sam2.1_hiera_tiny.pt; default: none, "
                        "LiteMedSAM is used)")
    parser.add_argument("--sam2-config", help="SAM 2 config name (default: from the checkpoint's file name)")
    parser.add_argument("--slice", type=int, help="seed only from this annotated slice (index along the axial "
                        "axis; default: every annotated slice)")
    parser.add_argument("--direction", default="both", choices=["both", "up", "down"],
                        help="up = towards the head (superior), down = towards the feet; default both")
    parser.add_argument("--bounds", type=int, nargs=2, metavar=("FIRST", "LAST"),
                        help="never go beyond these axial slice indices (default: the whole volume)")
    parser.add_argument("--patience", type=int, default=2,
                        help="stop a direction after this many consecutive failing slices (default 2)")
    parser.add_argument("--guide", help="a coarse liver mask (e.g. polycl segment output) used as a stop signal "
                        "(default: none)")
    parser.add_argument("--margin", type=int, default=2, help="box margin in pixels for litemedsam (default 2)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="model precision (auto: bf16 where the CPU/GPU runs it natively)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    parser.add_argument("--reference", help="reference liver mask: print Dice (default: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary (paths, mL, Dice, stops)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_output_arguments(parser)
    parser.set_defaults(handler=command_propagate)
    return parser


def add_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register every command of this module (``propagate``)."""
    add_propagate_command(subparsers)

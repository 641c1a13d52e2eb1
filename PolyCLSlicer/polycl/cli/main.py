"""The ``polycl`` command line: segment, batch, finetune, evaluate, info, sample (+ propagate, pretrain)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from ..threads import configure_openmp_wait, configure_threads
from .common import (
    EXIT_ERROR,
    ArgumentParser,
    CliError,
    HelpFormatter,
    check_input_path,
    check_output_path,
    strict_json,
    tqdm_progress,
)


def _print_metrics(metrics: dict, as_json: bool = False) -> None:
    if as_json:
        print(strict_json(metrics))
        return
    print(f"Dice {metrics['dice']:.4f}  HD {metrics['hd_mm']:.1f} mm  HD95 {metrics['hd95_mm']:.1f} mm  "
          f"mean 2D slice Dice {metrics['mean_slice_dice_2d']:.4f}")


def _check_segment_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without reading the CT, so no work is done for a doomed run."""
    from ..io.base import MASK_SUFFIXES
    from .outputs import DICOM_SUFFIXES, check_extra_outputs

    check_input_path(args.input, "input")
    inputs = (args.input, args.reference, args.checkpoint)
    output = check_output_path(args.output, args.overwrite, MASK_SUFFIXES + DICOM_SUFFIXES, inputs)
    if args.probability:
        probability = check_output_path(args.probability, args.overwrite, MASK_SUFFIXES, inputs)
        if probability.absolute() == output.absolute():
            raise CliError("--probability must differ from the output file")
    check_input_path(args.reference, "--reference")
    check_input_path(args.checkpoint, "--checkpoint")
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size} must be at least 1")
    check_extra_outputs(args, inputs)  # --dicom-seg / -o .dcm (needs a DICOM series input), --overlay


def command_segment(args: argparse.Namespace) -> int:
    from ..inference import Segmenter
    from ..io.volumes import read_mask, read_volume, write_volume
    from ..preprocessing import check_ct
    from .outputs import model_identity, write_outputs
    from .sam import build_refiner_from_args, review_json, run_refinement

    _check_segment_args(args)
    clock = Stopwatch()
    segmenter = Segmenter.from_checkpoint(args.checkpoint, args.device)
    refiner = build_refiner_from_args(args)  # None without --refine; checks its checkpoint first
    volume = read_volume(args.input, series=args.series)
    notes = check_ct(volume.array, str(args.input), args.allow_non_ct)
    for note in notes:
        print(f"polycl: warning: {note}", file=sys.stderr)
    reference = read_mask(args.reference, volume) if args.reference else None
    clock.lap("load")
    progress, close = tqdm_progress("segment")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already reported above
            result = segmenter.segment(volume.array, volume.ijk_to_ras, batch_size=args.batch_size,
                                       largest_component=not args.no_largest_component, progress=progress,
                                       probability=bool(args.probability), check_liver=not args.no_largest_component,
                                       input_notes=notes)
    finally:
        close()
    clock.lap("segment")
    engine_notes = [note for note in result.warnings if note not in notes]  # field of view, liver check
    notes = notes + engine_notes
    if not args.json:
        for note in engine_notes:
            print(f"polycl: warning: {note}", file=sys.stderr)
    refined = None if refiner is None else run_refinement(args, volume, result.mask, refiner)
    if refined is not None:
        result.mask = refined.mask  # the coarse mask is done with: one volume-sized array less while writing
    mask = result.mask
    clock.lap("refine")
    written = write_outputs(args, volume, mask, *model_identity(segmenter, args.checkpoint, refiner))
    if args.probability:
        write_volume(args.probability, result.probability, volume.ijk_to_ras)
    clock.lap("write")
    liver_ml = float(mask.sum()) * float(np.prod(volume.spacing)) / 1000
    metrics = None
    if reference is not None:
        from ..metrics import evaluate  # scipy: loaded only when scoring

        metrics = evaluate(mask, reference.array, volume.ijk_to_ras)
    if args.json:
        print(strict_json({
            "input": str(args.input), "output": str(args.output), "probability": args.probability,
            "checkpoint": str(args.checkpoint or "bundled starter model"), "shape": list(volume.array.shape),
            "spacing_mm": list(volume.spacing), "liver_voxels": int(mask.sum()), "liver_ml": liver_ml,
            "metrics": metrics, "review": None if refined is None else review_json(refined),
            "dicom_seg": args.dicom_seg, "overlay": args.overlay, "warnings": notes, "seconds": clock.laps,
            "liver_found": result.liver is None or result.liver.found,
            "liver": None if result.liver is None else result.liver.as_dict()}))
        return 0
    if result.liver is not None and not result.liver.found:
        print(f"wrote {', '.join(written)} (empty mask: {result.liver.message})")
    else:
        print(f"wrote {', '.join(written)} ({int(mask.sum())} liver voxels, {liver_ml:.1f} mL)")
    if metrics is not None:
        _print_metrics(metrics)
    return 0


class Stopwatch:
    """Wall-clock seconds per named step (``--json`` timings)."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def command_evaluate(args: argparse.Namespace) -> int:
    from ..io.volumes import read_mask
    from ..metrics import evaluate

    reference = read_mask(args.reference)
    prediction = read_mask(args.prediction, reference)
    _print_metrics(evaluate(prediction.array, reference.array, reference.ijk_to_ras), args.json)
    return 0


def command_info(args: argparse.Namespace) -> int:
    from ..nets.checkpoints import load_checkpoint, read_checkpoint
    from ..nets.model_card import STARTER_CHECKPOINT, describe_card

    path = Path(args.checkpoint) if args.checkpoint else STARTER_CHECKPOINT
    tensors, card = read_checkpoint(path)
    if card["kind"] == "segmentation":
        load_checkpoint(path)  # full validation: architecture and every shape
    parameters = sum(t.numel() for t in tensors.values())
    if args.json:
        print(json.dumps({"file": str(path), "parameters": parameters, **card}, indent=2))
    else:
        print(describe_card(card, path, parameters))
    return 0


def command_sample(args: argparse.Namespace) -> int:
    from ..io.samples import DEFAULT_SAMPLE, SAMPLES, fetch_sample, sample_label

    if args.list:
        for sample in SAMPLES.values():
            print(f"{sample.name:14s} {sample.description}")
        return 0
    if not args.label:
        print(fetch_sample(args.name, allow_download=not args.offline))
        return 0
    label = sample_label(args.name)
    if label is None:
        raise CliError(f"sample {args.name} has no reference mask here ({DEFAULT_SAMPLE} always has one)")
    print(label)
    return 0


SEGMENT_EPILOG = """examples:
  polycl segment "$(polycl sample)" -o liver.nii.gz --reference "$(polycl sample --label)"
  polycl segment ct.nii.gz -o liver.seg.nrrd --refine litemedsam --overlay liver.png
  polycl segment dicom_folder/ -o liver.dcm          # DICOM SEG referencing the series (see: polycl series)
  polycl segment dicom_folder/ -o liver.nii.gz --checkpoint mine.safetensors --device cpu"""
EVALUATE_EPILOG = """example:
  polycl evaluate liver.nii.gz reference_liver.nii.gz --json

JSON: hd_mm / hd95_mm are null when exactly one mask is empty (the distance is undefined; the text
output prints inf); Dice is 1.0 when both masks are empty."""
INFO_EPILOG = """examples:
  polycl info                       # the bundled starter model
  polycl info mine.safetensors --json"""
SAMPLE_EPILOG = """examples:
  polycl sample                     # the embedded sample CT (works offline)
  polycl sample --label             # its reference liver mask
  polycl sample CTLiver             # a full-size CT (downloaded once, SHA256 checked)
  polycl sample --list"""


def _add_segment(subparsers) -> None:
    from .outputs import add_output_arguments
    from .sam import add_refine_arguments

    parser = subparsers.add_parser("segment", help="segment the liver in a CT volume",
                                   description="Segment the liver in a CT (NIfTI, NRRD, MHA or DICOM folder).",
                                   epilog=SEGMENT_EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("input", help="CT file or DICOM series folder")
    parser.add_argument("--series", help="DICOM folder holding several image series: the one to read, by its "
                        "number in the list the error prints (1, 2, ...) or its SeriesInstanceUID "
                        "(default: the folder's only image series; SEG / RTSTRUCT objects are not image series)")
    parser.add_argument("-o", "--output", required=True,
                        help="output mask file (.nii.gz, .nrrd, .seg.nrrd with a Liver segment, .mha; .dcm: DICOM "
                             "SEG, for a DICOM series input)")
    parser.add_argument("--checkpoint", help="PolyCL checkpoint (default: the bundled starter model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices per forward pass (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--reference", help="reference liver mask: print Dice / HD / HD95 (default: none)")
    parser.add_argument("--probability", help="also write the liver probability map to this file (default: no)")
    parser.add_argument("--no-largest-component", action="store_true",
                        help="the network's raw mask: every connected component, no liver check (default: the "
                             "largest 3D component, emptied when it is no liver)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--allow-non-ct", action="store_true",
                        help="segment even when the intensities do not look like CT in Hounsfield units")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary (paths, liver mL, metrics, review slices, timings)")
    add_refine_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(handler=command_segment)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..io.samples import DEFAULT_SAMPLE
    from .finetune import add_finetune_command

    parser = ArgumentParser(prog="polycl", description="PolyCL liver segmentation in CT.")
    parser.add_argument("--version", action="version", version=f"polycl {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: $POLYCL_THREADS, else the CPUs this process may use: its "
                             "affinity and cgroup quota, not the machine's core count)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_segment(subparsers)
    add_finetune_command(subparsers)

    evaluate = subparsers.add_parser("evaluate", help="compare a mask with a reference",
                                     description="3D Dice, Hausdorff and HD95 in mm (+ 2D per-slice Dice).",
                                     epilog=EVALUATE_EPILOG, formatter_class=HelpFormatter)
    evaluate.add_argument("prediction", help="mask to score")
    evaluate.add_argument("reference", help="reference mask on the same grid")
    evaluate.add_argument("--json", action="store_true", help="print strict JSON (no NaN / Infinity)")
    evaluate.set_defaults(handler=command_evaluate)

    info = subparsers.add_parser("info", help="print a checkpoint's model card",
                                 description="Validate a checkpoint and print its model card.",
                                 epilog=INFO_EPILOG, formatter_class=HelpFormatter)
    info.add_argument("checkpoint", nargs="?", help="checkpoint file (default: the bundled starter model)")
    info.add_argument("--json", action="store_true", help="print the whole card as JSON")
    info.set_defaults(handler=command_info)

    sample = subparsers.add_parser("sample", help="get a sample CT and print its path",
                                   description="Print the path of a sample CT (embedded, cache, local data, or "
                                               "download).", epilog=SAMPLE_EPILOG, formatter_class=HelpFormatter)
    sample.add_argument("name", nargs="?", default=DEFAULT_SAMPLE,
                        help=f"sample name (default: {DEFAULT_SAMPLE}; see --list)")
    sample.add_argument("--list", action="store_true", help="list the known samples")
    sample.add_argument("--label", action="store_true", help="print only the reference liver mask's path")
    sample.add_argument("--offline", action="store_true", help="never download")
    sample.set_defaults(handler=command_sample)

    from .batch import add_batch_command
    from .outputs import add_series_command
    from .pretrain import add_pretrain_command
    from .sam import add_propagate_command
    from .suggest import add_suggest_command

    for add in (add_batch_command, add_propagate_command, add_pretrain_command, add_suggest_command,
                add_series_command):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        configure_threads(args.threads)
        if args.command != "batch":  # batch's Dask workers sleep at once (OMP_WAIT_POLICY=PASSIVE, no spin count)
            configure_openmp_wait()  # before torch's import: libgomp reads it when it loads
    except ValueError as error:
        print(f"polycl: error: {error}", file=sys.stderr)
        return EXIT_ERROR
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

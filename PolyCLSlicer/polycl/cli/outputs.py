"""CLI outputs people exchange, shared by ``segment`` and ``propagate``: DICOM SEG (``-o liver.dcm`` or
``--dicom-seg``), the overlay PNG (``--overlay``), and ``polycl series DIR`` (a folder's DICOM series)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..io.outputs import DICOM_SUFFIXES, wants_dicom_seg

SERIES_EPILOG = """examples:
  polycl series dicom_folder/
  polycl series dicom_folder/ --json
then: polycl segment dicom_folder/ --series 2 -o liver.dcm"""


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dicom-seg FILE`` and ``--overlay FILE.png``."""
    parser.add_argument("--dicom-seg", metavar="FILE.dcm",
                        help="also write the mask as a DICOM SEG referencing the input DICOM series (default: no; "
                             "-o liver.dcm does the same as the main output)")
    parser.add_argument("--overlay", metavar="FILE.png",
                        help="also write a PNG for a quick visual check: three axial slices and one coronal, liver "
                             "outlined, volume in mL (default: no)")


def check_extra_outputs(args: argparse.Namespace, inputs: tuple) -> None:
    """Before any work: DICOM SEG and overlay targets are writable, distinct, and a SEG has a DICOM series.

    Sets ``args.dicom_source`` to the files of the input series when a DICOM SEG is asked for.
    """
    from .common import CliError, check_output_path

    targets = [p for p in (args.output if wants_dicom_seg(args.output) else None, args.dicom_seg) if p]
    if args.dicom_seg:
        check_output_path(args.dicom_seg, args.overwrite, DICOM_SUFFIXES, inputs)
    if len(targets) == 2 and Path(targets[0]).absolute() == Path(targets[1]).absolute():
        raise CliError("--dicom-seg must differ from the output file")
    args.dicom_source = _dicom_source(args, targets[0]) if targets else None
    if args.overlay:
        check_output_path(args.overlay, args.overwrite, (".png",), inputs)


def _dicom_source(args: argparse.Namespace, target: str) -> list[str]:
    """The input series' files; refuses an input that is not a DICOM series folder."""
    from ..io.dicom import choose_series
    from ..io.dicom_seg import check_available
    from .common import CliError

    if not Path(args.input).is_dir():
        raise CliError(f"{target}: a DICOM SEG references a DICOM series, and the input {args.input} is a file, "
                       "not a DICOM series folder; write .nii.gz or .seg.nrrd instead")
    try:
        check_available()
    except ImportError as error:
        raise CliError(str(error)) from None
    return choose_series(Path(args.input), getattr(args, "series", None)).files


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def write_outputs(args: argparse.Namespace, volume, mask: np.ndarray, algorithm: str, version: str,
                  automatic: bool = True) -> list[str]:
    """The main output (mask file or DICOM SEG), then ``--dicom-seg`` and ``--overlay``; the paths written."""
    from ..io.outputs import write_liver_outputs

    written, notes = write_liver_outputs(
        [t for t in (args.output, args.dicom_seg) if t is not None], volume, mask, algorithm=algorithm,
        version=version, dicom_source=args.dicom_source, overlay=args.overlay,
        name=Path(str(args.input).rstrip("/")).name, automatic=automatic)
    for note in notes:  # e.g. UIDs generated for a series without them: said once, on one line
        print(f"polycl: warning: {note}", file=sys.stderr)
    return written


def model_identity(segmenter, checkpoint: str | None, refiner=None) -> tuple[str, str]:
    """(algorithm name, version) for a DICOM SEG: PolyCLSlicer + the model card's name, architecture, date."""
    from ..nets.model_card import algorithm_identity

    return algorithm_identity(segmenter.card, checkpoint, None if refiner is None else refiner.name)


def command_series(args: argparse.Namespace) -> int:
    """``polycl series DIR``: every DICOM series of a folder, numbered as ``--series`` takes them."""
    from ..io.dicom import list_series
    from .common import CliError

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{folder}: not a folder; give the folder that holds the DICOM files")
    found = list_series(folder)
    images = [s for s in found if s.is_image]
    rows = [{"number": images.index(s) + 1 if s.is_image else None, "uid": s.uid, "modality": s.modality,
             "description": s.description, "images": len(s.files), "is_image_series": s.is_image} for s in found]
    if args.json:
        print(json.dumps({"folder": str(folder), "series": rows}, indent=2))
        return 0
    if not found:
        raise CliError(f"{folder}: no DICOM series found (not recursive: point at the folder holding the files)")
    for row, series in zip(rows, found, strict=True):
        if row["number"] is None:
            print(f"[-] {series.modality or '?'} {series.description!r}, {plural(row['images'], 'file')}, "
                  f"UID {series.uid} (not an image series)")
        else:
            print(series.label(row["number"]))
    if len(images) == 1:
        print("1 image series: segment the folder as it is (no --series needed)")
    else:
        print(f"{len(images)} image series; pick one with --series NUMBER or --series UID" if images else
              "no image series here (only objects such as SEG or RTSTRUCT): nothing to segment")
    return 0


def add_series_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``polycl series``."""
    from .common import HelpFormatter

    parser = subparsers.add_parser("series", help="list the DICOM series of a folder",
                                   description="List a folder's DICOM series (UID, modality, description, number "
                                               "of images); image series are numbered as --series takes them.",
                                   epilog=SERIES_EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("folder", help="folder holding DICOM files (not searched recursively)")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(handler=command_series)

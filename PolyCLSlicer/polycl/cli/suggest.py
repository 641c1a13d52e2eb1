"""``polycl suggest``: which axial slices to paint next (where the model is least reliable)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  polycl suggest ct.nii.gz
  polycl suggest ct.nii.gz --checkpoint mine.safetensors --count 3 --annotated painted.nii.gz --json

Slices are numbered k along the image array's axial axis (the numbers 3D Slicer shows); slices where
--annotated has foreground are never suggested. --json prints {"slices": [k, ...], "scores": [...]},
best first. Score: test-time-augmentation uncertainty of the model per slice, relative to a typical
liver slice's area (0 where the model finds no liver)."""


def command_suggest(args: argparse.Namespace) -> int:
    from ..inference import Segmenter
    from ..io.volumes import read_mask, read_volume
    from ..suggest import suggest_slices
    from ..training.sparse import annotated_slices
    from .common import tqdm_progress

    if args.count < 1:
        raise ValueError(f"--count {args.count} must be at least 1")
    volume = read_volume(args.input)
    painted = annotated_slices(read_mask(args.annotated, volume).array, volume.ijk_to_ras) if args.annotated else []
    segmenter = Segmenter.from_checkpoint(args.checkpoint, args.device)
    progress, close = tqdm_progress("suggest")
    try:
        found = suggest_slices(segmenter, volume.array, volume.ijk_to_ras, args.count, painted, progress=progress)
    finally:
        close()
    if args.json:
        print(json.dumps(found.to_json()))
        return 0
    if not found.slices:
        print("no slice to suggest: the model finds no liver outside the annotated slices", file=sys.stderr)
        return 0
    print(f"axial slices (array axis {found.axis}) to paint next, least reliable first:")
    for k, score in zip(found.slices, found.scores, strict=True):
        print(f"  slice {k}: uncertainty {score:.3f}")
    return 0


def add_suggest_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``polycl suggest``."""
    from .common import HelpFormatter

    parser = subparsers.add_parser("suggest", help="rank the axial slices to annotate next",
                                   description="Rank axial slices where the segmentation model is least reliable.",
                                   epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("input", help="CT file or DICOM series folder")
    parser.add_argument("--checkpoint", help="PolyCL checkpoint (default: the bundled starter model)")
    parser.add_argument("--count", type=int, default=3, help="number of slices to suggest")
    parser.add_argument("--annotated", help="mask of the slices already painted (on the CT's grid); never suggested")
    parser.add_argument("--json", action="store_true", help='print {"slices": [...], "scores": [...]}')
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    parser.set_defaults(handler=command_suggest)
    return parser

"""Headless batch liver segmentation through the PolyCLSlicer Logic.

Inside 3D Slicer (no window):
    Slicer --no-main-window --python-script PolyCLSlicer/Scripts/batch.py --input DIR_OR_FILE --output DIR
With the project's environment (slicer-core; CI, servers):
    .venv/bin/python PolyCLSlicer/Scripts/batch.py --input DIR_OR_FILE --output DIR

Writes ``<name>.seg.nrrd`` (segment "Liver", SNOMED CT terminology, geometry of the input) and, with
``--nifti``, ``<name>_liver.nii.gz`` per input volume (existing outputs are kept unless ``--overwrite``; a
re-run writes only the missing ones), and ``summary.csv`` with the printed table.  A file that cannot
be read or segmented is reported and skipped (the computation runs in the PolyCL worker process,
started once and kept warm for the whole batch; a crash of it fails one file, the next starts a new
worker); the exit code is 1 when any input failed
(2 when the input does not exist).  Missing Python packages are reported before any work.  Any other
error ends the script with a one-line message and exit code 1: under ``--python-script`` an uncaught
exception would leave a headless Slicer running forever.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def volume_stem(path: Path) -> str:
    """File name without its volume extension (a DICOM folder keeps its name)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_inputs(path: Path) -> list[Path]:
    """The file itself, or the volumes (and DICOM series folders) directly inside a folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file() or any(path.glob("*.dcm")):
        return [path]
    found = []
    for child in sorted(path.iterdir()):
        if child.name.startswith(".") or child.name.lower().endswith(".seg.nrrd"):
            continue
        if child.is_file() and child.name.lower().endswith(VOLUME_SUFFIXES):
            found.append(child)
        elif child.is_dir() and any(child.glob("*.dcm")):
            found.append(child)
    earlier = output_names(found)  # outputs of this script are never inputs (output folder = input folder)
    return [child for child in found if child.name not in earlier]


def unique_stems(inputs: list[Path]) -> list[str]:
    """Each input's output stem: its name without the volume extension, ``_`` added until unique."""
    stems: list[str] = []
    for path in inputs:
        stem = volume_stem(path)
        while stem in stems:  # a.nii.gz and a.nrrd in one folder
            stem += "_"
        stems.append(stem)
    return stems


def output_names(inputs: list[Path]) -> set[str]:
    """The file names this script writes for ``inputs`` (with or without --nifti)."""
    return {name for stem in unique_stems(inputs) for name in (f"{stem}.seg.nrrd", f"{stem}_liver.nii.gz")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="CT file, DICOM series folder, or folder of them")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--checkpoint", default=None, help="PolyCL .safetensors checkpoint (default: starter model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--refine", default="none", choices=("none", "litemedsam", "sam", "sam2"),
                        help="SAM-family refinement of the PolyCL mask")
    parser.add_argument("--sam-checkpoint", default=None, help="segment-anything checkpoint (--refine sam)")
    parser.add_argument("--sam-model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--sam2-checkpoint", default=None, help="SAM 2 checkpoint (--refine sam2)")
    parser.add_argument("--sam2-config", default=None, help="sam2 config name of that checkpoint")
    parser.add_argument("--nifti", action="store_true", help="also write <name>_liver.nii.gz")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    return parser.parse_args(argv)


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, tuple("-" * w for w in widths), *rows]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import slicer
    from PolyCLSlicerLib import dependencies, mrml, undo

    from PolyCLSlicer import HAS_APP, PolyCLSlicerLogic

    needed = dependencies.missing(args.refine)  # checked before any work; a headless run installs nothing
    if needed:
        print("batch: error: Python packages not installed: " + ", ".join(needed) + ". Open the PolyCL Liver "
              "module in Slicer and press Apply once to install them (it asks first), then run again.",
              file=sys.stderr)
        return 1
    try:
        inputs = find_inputs(args.input)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    if not inputs:
        print(f"no CT volumes found in {args.input}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    scene = slicer.mrmlScene if HAS_APP else mrml.new_scene()
    logic = PolyCLSlicerLogic()
    options = {"checkpoint": args.checkpoint, "device": args.device, "refiner": args.refine,
               "samCheckpoint": args.sam_checkpoint, "samModel": args.sam_model,
               "sam2Checkpoint": args.sam2_checkpoint, "sam2Config": args.sam2_config}
    rows = []
    batch_started = time.perf_counter()
    for number, (path, stem) in enumerate(zip(inputs, unique_stems(inputs), strict=True), start=1):
        targets = [args.output / f"{stem}.seg.nrrd"] + ([args.output / f"{stem}_liver.nii.gz"] if args.nifti else [])
        missing = targets if args.overwrite else [t for t in targets if not t.exists()]
        started = time.perf_counter()
        before = undo.node_ids(scene)
        try:
            if not missing:
                rows.append((path.name, "skipped", "", "", "0.0",
                             f"{', '.join(t.name for t in targets)} exist (--overwrite replaces them)"))
            else:
                volume = logic.loadVolume(scene, path, stem)
                report = logic.segment(volume, **options)
                for target in missing:  # polycl.io.write_mask: the writer `polycl segment` uses (.seg.nrrd: Liver)
                    logic.exportSegment(report.segmentationNode, report.segmentId, volume, target)
                note = "; ".join([", ".join(t.name for t in missing), *report.warnings])
                status = "ok" if report.liverFound else "no liver"
                rows.append((path.name, status, f"{report.volumeMl:.1f}", str(len(report.slices)),
                             f"{time.perf_counter() - started:.1f}", note))
        except Exception as error:  # one bad file must not stop the batch
            message = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            rows.append((path.name, "FAILED", "", "", f"{time.perf_counter() - started:.1f}", message))
        finally:
            undo.remove_nodes_except(scene, before)
        print(f"[{number}/{len(inputs)}] {path.name}: {rows[-1][1]} "
              f"({time_left(time.perf_counter() - batch_started, number, len(inputs))})", file=sys.stderr, flush=True)
    header = ("input", "status", "liver ml", "slices", "seconds", "output / reason")
    print(format_table(rows, header))
    summary = write_summary(args.output / "summary.csv", rows, header)
    count = {status: sum(row[1] == status for row in rows) for status in ("ok", "no liver", "skipped", "FAILED")}
    processed = count["ok"] + count["no liver"]
    print(f"\n{processed} of {len(inputs)} processed, {count['skipped']} skipped (outputs exist), "
          f"{count['FAILED']} failed, {count['no liver']} with no liver found (empty masks); outputs in {args.output}, "
          f"table in {summary.name}")
    return 1 if count["FAILED"] else 0


def time_left(elapsed: float, done: int, total: int) -> str:
    """'1:05 elapsed, ~2:10 left' from the mean time per input so far."""
    def clock(seconds: float) -> str:
        minutes, seconds = divmod(int(round(seconds)), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"

    return f"{clock(elapsed)} elapsed, ~{clock(elapsed / max(done, 1) * (total - done))} left"


def write_summary(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Path:
    """The batch's table as CSV beside its outputs (written atomically)."""
    import csv

    from polycl.io.base import atomic_write

    def write(temp: Path) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *rows])

    return atomic_write(path, write, suffix=".csv")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def guarded_main(argv: list[str] | None = None) -> int:
    """``main`` whose every way out is an exit code: 0 done, 1 failed (one-line message), 2 usage / no input."""
    try:
        return main(argv)
    except SystemExit as stop:  # argparse usage errors and --help
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException as error:  # noqa: BLE001  (KeyboardInterrupt too: the app must still exit)
        traceback.print_exc(file=sys.stderr)
        message = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        print(f"batch: error: {message}", file=sys.stderr)
        return 1


def leave(code: int) -> None:
    """Exit with ``code``; inside Slicer through slicer.util.exit (``--python-script`` does not exit by itself)."""
    import slicer

    if hasattr(slicer, "app"):
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    leave(guarded_main(sys.argv[1:]))

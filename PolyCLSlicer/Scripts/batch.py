"""Headless batch liver segmentation with PolyCLSlicer (the same implementation as ``polycl batch``).

Inside 3D Slicer (no window):
    Slicer --no-main-window --python-script PolyCLSlicer/Scripts/batch.py --input DIR_OR_FILE --output DIR
With the project's environment (slicer-core; CI, servers):
    .venv/bin/python PolyCLSlicer/Scripts/batch.py --input DIR_OR_FILE --output DIR

Writes ``<name>.seg.nrrd`` (segment "Liver", SNOMED CT terminology, geometry of the input) and, with
``--nifti``, ``<name>_liver.nii.gz`` per input volume (existing outputs are kept unless ``--overwrite``; a
re-run writes only the missing ones), and ``summary.csv`` with the printed table.  The cases run on Dask
workers (``polycl.batch``): by default worker processes on this machine that keep the model loaded,
``--scheduler tcp://HOST:PORT`` for a running cluster.  A file that cannot be read or segmented is reported
and skipped; a worker that dies mid-case has the case retried on another worker.  The exit code is 1 when
any input failed (2 when the input does not exist).  Missing Python packages are reported before any work.
Any other error ends the script with a one-line message and exit code 1: under ``--python-script`` an
uncaught exception would leave a headless Slicer running forever.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


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
    parser.add_argument("--workers", type=int, default=None, help="local worker processes (default: sized to "
                        "this machine's CPUs and memory)")
    parser.add_argument("--scheduler", default=None, help="a running Dask scheduler, tcp://HOST:PORT")
    parser.add_argument("--retries", type=int, default=2, help="retries of a case whose worker died")
    return parser.parse_args(argv)


def find_inputs(path: Path) -> list[Path]:
    """The file itself, or the CT volumes (and DICOM series folders) of a folder; never this script's outputs."""
    from polycl.batch.cases import find_inputs as find

    return find([path])


def use_slicer_python() -> None:
    """Inside the Slicer application, worker processes start with PythonSlicer (Slicer's own executable
    is not a Python interpreter)."""
    import slicer

    if hasattr(slicer, "app"):
        import multiprocessing

        from PolyCLSlicerLib.worker_client import python_executable

        multiprocessing.set_executable(python_executable())


def run(args: argparse.Namespace) -> int:
    from PolyCLSlicerLib import dependencies

    needed = dependencies.missing(args.refine, batch=True)  # checked before any work; a headless run installs nothing
    if needed:
        print("batch: error: Python packages not installed: " + ", ".join(needed) + ". Open the PolyCL Liver "
              "module in Slicer and press Apply once to install them (it asks first), or install them with "
              "PythonSlicer -m pip install, then run again.", file=sys.stderr)
        return 1
    from polycl.batch.cases import plan_cases
    from polycl.batch.cluster import ClusterOptions
    from polycl.batch.runner import run_batch, table
    from polycl.batch.work import Settings

    try:
        inputs = find_inputs(args.input)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    if not inputs:
        print(f"no CT volumes found in {args.input}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    use_slicer_python()
    cases = plan_cases(inputs, args.output, ["seg.nrrd"] + (["nii.gz"] if args.nifti else []),
                       overwrite=args.overwrite)
    settings = Settings(checkpoint=args.checkpoint, device=args.device, refine=args.refine,
                        sam_checkpoint=args.sam_checkpoint, sam_model=args.sam_model,
                        sam2_checkpoint=args.sam2_checkpoint, sam2_config=args.sam2_config)
    options = ClusterOptions(scheduler=args.scheduler, workers=args.workers, retries=args.retries)
    report = run_batch(cases, settings, options, args.output)
    print(table(report))
    print(f"\n{report.line()}")
    return report.exit_code


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

"""``polycl batch``: segment many CTs on Dask (this machine, a running scheduler, or a SLURM/PBS/LSF/SGE
cluster through dask-jobqueue), resumable; ``summary.csv`` holds one row per case."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .common import CliError, HelpFormatter, check_input_path

EPILOG = """examples:
  polycl batch cohort/ -o masks/                         # every CT of the folder, this machine's cores
  polycl batch cases.csv -o masks/ --format seg.nrrd --format nii.gz --overlay
  polycl batch dicom_root/* -o masks/ --format dcm      # DICOM SEG per series folder
  polycl batch cohort/ -o masks/ --scheduler tcp://10.0.0.5:8786
  polycl batch cohort/ -o /shared/masks --cluster slurm --jobs 20 --cores 8 --memory 32GB --walltime 04:00:00

A re-run of the same command writes only the missing outputs.  Exit code 0 when every case was segmented
or skipped, 1 when any case failed, 2 for a usage error or a missing input, 130 when interrupted.
Details: docs/batch.md."""


def add_batch_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``polycl batch``."""
    from ..batch.cases import FORMATS
    from .sam import add_refine_arguments

    parser = subparsers.add_parser("batch", help="segment many CTs (folders, lists) on this machine or a cluster",
                                   description="Segment the liver in many CTs with Dask workers that keep the "
                                               "model loaded; one summary.csv row per case.",
                                   epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", help="CT files, folders of CTs, DICOM series folders, or .csv / .txt "
                        "lists of paths (first column)")
    parser.add_argument("-o", "--output", required=True, help="output folder (shared storage for a cluster)")
    parser.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                        help="output format, repeatable: CASE_liver.nii.gz / .nrrd / .mha, CASE.seg.nrrd (segment "
                             "Liver), CASE_liver.dcm (DICOM SEG, DICOM series inputs) (default: nii.gz)")
    parser.add_argument("--overlay", action="store_true", help="also write CASE_liver.png for a quick check")
    parser.add_argument("--json", action="store_true", help="print every case's row as JSON instead of the table")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--checkpoint", help="PolyCL checkpoint (default: the bundled starter model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--allow-non-ct", action="store_true", help="segment volumes that do not look like CT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, job scripts)")
    add_refine_arguments(parser)
    where = parser.add_argument_group("where it runs (default: a local cluster sized to this machine)")
    where.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="an existing Dask scheduler")
    where.add_argument("--workers", type=int, help="local worker processes (default: the usable CPUs / threads "
                       "per worker, capped at one per 4 GiB of memory)")
    where.add_argument("--threads-per-worker", type=int, help="local: torch threads of each worker (default: 2, "
                       "or the usable CPUs / --workers)")
    where.add_argument("--retries", type=int, default=2, help="times a case is retried on another worker when its "
                       "worker dies (killed, out of memory)")
    where.add_argument("--cluster", choices=["slurm", "pbs", "lsf", "sge"],
                       help="start workers as batch jobs with dask-jobqueue (settings not given here come from "
                            "~/.config/dask/jobqueue.yaml)")
    where.add_argument("--jobs", type=int, default=1, help="--cluster: batch jobs to start")
    for option, text in (("--cores", "cores per job"), ("--processes", "worker processes per job (default 1)"),
                         ("--memory", "memory per job, e.g. 32GB"), ("--walltime", "e.g. 04:00:00"),
                         ("--queue", "queue / partition"), ("--account", "account to charge"),
                         ("--python", "python on the nodes (default: this one)")):
        where.add_argument(option, type=int if option in ("--cores", "--processes") else str,
                           help=f"--cluster: {text}")
    parser.set_defaults(handler=command_batch)


def settings_from_args(args: argparse.Namespace):
    from ..batch.work import Settings

    return Settings(checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                    allow_non_ct=args.allow_non_ct, refine=args.refine, sam_checkpoint=args.sam_checkpoint,
                    sam_model=args.sam_model, sam2_checkpoint=args.sam2_checkpoint, sam2_config=args.sam2_config,
                    refine_margin=args.refine_margin, refine_min_iou=args.refine_min_iou,
                    refine_precision=args.refine_precision)


def cluster_from_args(args: argparse.Namespace):
    from ..batch.cluster import ClusterOptions

    job = {name: getattr(args, name) for name in ("cores", "processes", "memory", "walltime", "queue", "account",
                                                   "python")}
    return ClusterOptions(scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                          retries=args.retries, system=args.cluster, jobs=args.jobs, job=job)


def check_batch_args(args: argparse.Namespace) -> None:
    """What can be checked before any worker starts."""
    check_input_path(args.checkpoint, "--checkpoint")
    if Path(args.output).is_file():
        raise CliError(f"-o {args.output} is a file; give the output folder")
    if args.refine in ("sam", "sam2") and not (args.sam_checkpoint or args.sam2_checkpoint):
        raise CliError(f"--refine {args.refine} needs its checkpoint file (--sam-checkpoint / --sam2-checkpoint)")
    for value, option in ((args.workers, "--workers"), (args.threads_per_worker, "--threads-per-worker"),
                          (args.jobs, "--jobs"), (args.batch_size, "--batch-size")):
        if value is not None and value < 1:
            raise CliError(f"{option} {value} must be at least 1")
    if args.retries < 0:
        raise CliError(f"--retries {args.retries} must be 0 or more")
    if args.scheduler and args.cluster:
        raise CliError("give --scheduler or --cluster, not both")
    try:
        import distributed  # noqa: F401
        if args.cluster:
            import dask_jobqueue  # noqa: F401
    except ImportError as error:
        raise CliError(f"polycl batch needs Dask: pip install dask distributed dask-jobqueue ({error})") from None


def command_batch(args: argparse.Namespace) -> int:
    from ..batch.cases import find_inputs, plan_cases
    from ..batch.runner import run_batch, table

    check_batch_args(args)
    inputs = find_inputs(args.inputs)
    if not inputs:
        print(f"polycl: error: no CT volumes found in {', '.join(args.inputs)}", file=sys.stderr)
        return 1
    output = Path(args.output)
    cases = plan_cases(inputs, output, args.formats or ["nii.gz"], args.overlay, args.overwrite)
    report = run_batch(cases, settings_from_args(args), cluster_from_args(args), output,
                       progress=not args.no_progress)
    if args.json:
        print(json.dumps({"summary": str(report.summary), "exit_code": report.exit_code,
                          "cases": [asdict(row) for row in report.rows]}, indent=2))
    else:
        failed = [row for row in report.rows if row.status == "FAILED"]
        print(table(report) if len(report.rows) <= 50 else "\n".join(
            f"FAILED {row.input}: {row.warnings}" for row in failed))
        print(f"\n{report.line()}")
    if report.interrupted:
        print("polycl: interrupted; finished cases are kept, run the same command again to do the rest",
              file=sys.stderr)
    return report.exit_code

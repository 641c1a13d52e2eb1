"""``polycl pretrain``: self-supervised pretraining from the command line (single process or torchrun)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

METHOD_HELP = ("polycl-s: same scan / other scan (no labels); polycl-o: same / different organ presence "
               "(needs --labels or --flags); polycl-m: both; simclr: augmentation pairs; "
               "pix2rep: dense pixel contrast, pretrains the whole U-Net")

EPILOG = """examples:
  polycl pretrain --method polycl-s --data ../shared/data/unlabeled ../shared/data/labeled -o encoder.ckpt
  polycl pretrain --method polycl-m --data ct/ --labels masks/ --flags flags.json -o enc.ckpt --size 128
  polycl pretrain --method polycl-s --data ct/ -o enc.ckpt --resume enc.ckpt --epochs 200
  torchrun --nproc_per_node 4 -m polycl.cli pretrain --method pix2rep --data ct/ -o unet.ckpt --device cuda
then: polycl finetune --init enc.ckpt --images ... --labels ... -o liver.ckpt

Checkpoints are written every --save-every epochs and at the end; the Adam state goes beside them
(OUTPUT.optim) so --resume continues exactly.  Ctrl-C stops after the current batch and keeps the
last saved checkpoint."""


def add_pretrain_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``polycl pretrain`` (handler: ``command_pretrain``)."""
    from .common import HelpFormatter

    parser = subparsers.add_parser(
        "pretrain", help="self-supervised encoder pretraining (PolyCL-S/-O/-M, SimCLR, Pix2Rep)",
        description="Pretrain a U-Net encoder (Pix2Rep: the whole U-Net) on CT slices by contrastive learning.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--method", required=True, choices=["polycl-s", "polycl-o", "polycl-m", "simclr", "pix2rep"],
                        help=METHOD_HELP)
    parser.add_argument("--data", nargs="+", required=True,
                        help="CT files, folders of CT files, or DICOM series folders (label files are skipped)")
    parser.add_argument("--labels", help="folder of label volumes for organ presence T(s) "
                        "(<case>_liver.nii.gz for <case>_ct.nii.gz, or the same file name); "
                        "labels next to the CTs are found without this; default: none)")
    parser.add_argument("--flags", help="JSON of per-slice organ presence for scans without labels "
                        "({case: [0,1,...]} or {case: {num_slices, present, absent}}; default: none)")
    parser.add_argument("--organ", default="liver", help="label file suffix (<case>_<organ>.nii.gz; default liver)")
    parser.add_argument("-o", "--output", required=True, help="output checkpoint (.safetensors / .ckpt)")
    parser.add_argument("--architecture", default="polycl_unet", choices=["polycl_unet", "resunet", "transunet"],
                        help="network (transunet: the CPU-sized TransUNet; pretrain writes its encoder)")
    parser.add_argument("--epochs", type=int, default=100, help="total epochs (default 100)")
    parser.add_argument("--batch-size", type=int, default=20,
                        help="global minibatch M, split over torchrun processes (default 20; PolyCL tau = 1/M)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--size", type=int, default=256, help="input size in pixels, multiple of 16 (default 256)")
    parser.add_argument("--tau", type=float, default=None,
                        help="temperature (default 1/M for PolyCL, 0.5 for SimCLR and Pix2Rep)")
    parser.add_argument("--anchor-fraction", type=float, default=0.3,
                        help="anchors from the middle fraction of each scan (default 0.3; 1 = all slices)")
    parser.add_argument("--negative-source", default="paper", choices=["paper", "reference"],
                        help="PolyCL-M negatives: same scan (paper, default) or another scan (reference code)")
    parser.add_argument("--strict-negatives", action="store_true",
                        help="PolyCL-M: fail instead of taking a negative from the other source when none exists")
    parser.add_argument("--pixel-pairs", type=int, default=1000, help="Pix2Rep pixel pairs per batch (default 1000)")
    parser.add_argument("--resume", help="continue from this checkpoint's saved epoch (may equal --output; "
                        "default: start afresh)")
    parser.add_argument("--save-every", type=int, default=10, help="write a checkpoint every N epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available (torchrun: one GPU per process, NCCL; CPU: gloo); default auto")
    parser.add_argument("--cache-dir", help="slice cache folder (default $POLYCL_CACHE or ~/.cache/polycl)")
    parser.add_argument("--no-cache", action="store_true", help="re-read every volume (the cache is still refreshed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.set_defaults(handler=command_pretrain)
    return parser


def command_pretrain(args: argparse.Namespace) -> int:
    """Handler of ``polycl pretrain``; returns the exit code (0 ok, 2 error, 130 cancelled)."""
    from ..progress import Cancelled
    from ..training.pretraining.slice_index import build_slice_index
    from ..training.pretraining.trainer import PretrainConfig, init_distributed, pretrain

    output = Path(args.output)
    resuming_in_place = args.resume and Path(args.resume).resolve() == output.resolve()
    if output.exists() and not args.overwrite and not resuming_in_place:
        print(f"polycl: error: {output} exists; pass --overwrite or --resume {output}", file=sys.stderr)
        return 2
    config = PretrainConfig(
        method=args.method, architecture=args.architecture, input_size=args.size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, tau=args.tau, anchor_fraction=args.anchor_fraction,
        negative_source=args.negative_source, strict_negatives=args.strict_negatives, pixel_pairs=args.pixel_pairs,
        save_every=args.save_every, seed=args.seed, device=args.device)
    context = init_distributed(args.device)
    cancel = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: cancel.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    main = context.is_main
    try:
        if not main:
            context.barrier()  # rank 0 builds / refreshes the slice cache first
        index = build_slice_index(args.data, labels=args.labels, flags=args.flags, size=args.size,
                                  cache_dir=args.cache_dir, use_cache=not (args.no_cache and main),
                                  write_cache=main, organ=args.organ)
        if main:
            context.barrier()
            summary = index.summary()
            print(f"pretrain {args.method}: {len(index.scans)} scans, {summary['slices']} slices "
                  f"({summary['slices_with_organ']} with organ, {summary['slices_without_organ']} without, "
                  f"{summary['slices_presence_unknown']} unknown); {context.world_size} process(es) on "
                  f"{context.device}", file=sys.stderr)

        def report(epoch_report) -> None:
            if not args.quiet:
                print(f"epoch {epoch_report.epoch}/{epoch_report.epochs}  loss "
                      f"{epoch_report.metrics.get('mean_loss_all_ranks', epoch_report.loss):.4f}  "
                      f"{epoch_report.seconds:.1f}s", file=sys.stderr)

        result = pretrain(index, output, config, resume=args.resume, progress=report, cancel=cancel,
                          overwrite=args.overwrite or bool(resuming_in_place),
                          data_description={"command": "polycl pretrain", "inputs": [str(p) for p in args.data]})
    except Cancelled:
        context.close(clean=False)
        if main:
            print(f"polycl: pretraining cancelled; the last saved checkpoint (if any) is {output}", file=sys.stderr)
        return 130
    except BaseException:
        context.close(clean=False)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    context.close()
    if main:
        loss = result.card["metrics"].get("final_loss")
        print(f"wrote {result.path} ({result.card['kind']}, {args.method}, final loss {loss})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m polycl.cli_pretrain ...``), same as ``polycl pretrain ...``."""
    parser = argparse.ArgumentParser(prog="polycl")
    add_pretrain_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"polycl: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

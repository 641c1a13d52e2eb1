"""Train the bundled starter model (issue 9 recipe): labelled CT + pseudo-labelled CT + liver-free slices.

Run (reproduces PolyCLSlicer/polycl/weights/polycl_liver_starter.safetensors):
  nice -n 10 .venv/bin/python bench/pseudo_labels.py --out /tmp/pseudo --cases totalseg_full totalseg_aorta_cta
  nice -n 10 .venv/bin/python bench/train_starter.py --pseudo /tmp/pseudo -o starter.safetensors

Training data (``--recipe``):
* ``labelled``: the three labelled shared cases (the previous starter's data); with ``--extra-cases`` also the
  two of ``labeled-extra/`` (``chaos_ctset3``, ``totalsegds_s0009``: every k-th slice, ~``--extra-slice-mm`` apart);
* ``negatives``: + liver-free slice ranges (``bench/presence_flags.json``, checked by eye) of the Apache /
  BSD unlabelled CTs as (CT, empty mask) volumes: pelvis of ``totalseg_full``, chest with the heart of
  ``totalseg_aorta_cta`` and both ``pyradiomics_lung`` scans;
* ``pseudo`` (default): ``totalseg_full`` as a whole scan (TotalSegmentator label of ``totalseg_sm``,
  the same scan, + a propagated liver tip, empty elsewhere) in place of ``totalseg_sm``,
  ``totalseg_aorta_cta`` as a whole scan with its propagated pseudo-label, + the lung negatives.

``--exclude CASE`` drops a labelled case and every scan of the same patient (leave-one-case-out:
``totalseg_sm`` is slices 82-111 of ``totalseg_full``).  ``ircad01`` (CC BY-NC-ND) is never used.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXTRA_CASES, ROOT, data_root, labelled_files, machine  # noqa: E402  (also puts polycl on sys.path)

from polycl.geometry import CanonicalOrientation, voxel_spacing  # noqa: E402
from polycl.io import Volume, read_mask, read_volume  # noqa: E402
from polycl.training import FinetuneConfig, finetune  # noqa: E402

LABELLED = ("totalseg_sm", "totalseg_dcm", "dcmqi_3slice")
SAME_PATIENT = {"totalseg_sm": {"totalseg_full"}}
UNLABELLED_FILES = {
    "totalseg_full": "totalseg_full_ct.nii.gz",
    "totalseg_aorta_cta": "totalseg_aorta_cta_ct.nii.gz",
    "pyradiomics_lung1": "pyradiomics_lung1_ct.nrrd",
    "pyradiomics_lung2": "pyradiomics_lung2_ct.nrrd",
}
# every k-th slice of liver-free ranges and of whole pseudo-labelled scans: neighbouring slices are
# near-duplicates at 128 px, and the CPU budget of a shared 2-core machine is the limit
NEGATIVE_STRIDE = 3
WHOLE_SCAN_STRIDE = 2
RECIPES = ("labelled", "negatives", "pseudo")


def canonical_volume(volume: Volume, first: int = 0, last: int | None = None, stride: int = 1) -> Volume:
    """Canonical slices first..last (inclusive, every ``stride``-th) as a volume with a correct matrix."""
    orientation = CanonicalOrientation.from_matrix(volume.ijk_to_ras)
    array = orientation.to_canonical(volume.array)
    matrix = orientation.canonical_matrix(volume.ijk_to_ras, volume.array.shape)
    last = len(array) - 1 if last is None else last
    pick = np.eye(4)
    pick[0, 0], pick[0, 3] = stride, first
    return Volume(np.ascontiguousarray(array[first:last + 1:stride]), matrix @ pick, volume.source)


def num_slices(volume: Volume) -> int:
    return volume.array.shape[CanonicalOrientation.from_matrix(volume.ijk_to_ras).slice_axis]


def negative_pair(ct: Volume, first: int, last: int, stride: int = 1) -> tuple[Volume, Volume]:
    """(CT, all-zero mask) on the canonical slice range first..last."""
    crop = canonical_volume(ct, first, last, stride)
    return crop, Volume(np.zeros(crop.array.shape, np.uint8), crop.ijk_to_ras, crop.source + " (no liver)")


def strided_pair(ct: Volume, label: Volume | None, first: int, last: int, stride: int, context: bool
                 ) -> tuple[tuple[Volume, Volume], list[int] | None]:
    """(CT, mask) on canonical slices first..last, every ``stride``-th (label None: an all-zero mask), and the
    slices to train on.  A 2.5D network (``context``) gets the whole scan and the slice list, so that its
    neighbours stay the scan's adjacent slices; a 2D one the cropped volume (same training slices)."""
    if not context:
        pair = negative_pair(ct, first, last, stride) if label is None else (
            canonical_volume(ct, first, last, stride), canonical_volume(label, first, last, stride))
        return pair, None
    whole = canonical_volume(ct)
    mask = canonical_volume(label) if label is not None else Volume(
        np.zeros(whole.array.shape, np.uint8), whole.ijk_to_ras, whole.source + " (no liver)")
    return (whole, mask), list(range(first, last + 1, stride))


def extra_stride(ct: Volume, slice_mm: float) -> int:
    """Every k-th slice so that training slices lie about ``slice_mm`` apart (1: every slice)."""
    spacing = voxel_spacing(ct.ijk_to_ras)[CanonicalOrientation.from_matrix(ct.ijk_to_ras).slice_axis]
    return max(1, round(slice_mm / spacing)) if slice_mm else 1


def training_pairs(data: Path, recipe: str, pseudo: Path | None, exclude: str | None, flags: dict,
                   negative_stride: int = NEGATIVE_STRIDE, context: bool = False, positive_repeat: int = 1,
                   extra: bool = False, extra_slice_mm: float = 0.0, known_only: bool = False
                   ) -> tuple[list[tuple[Volume, Volume]], list[str], list[list[int]] | None]:
    """(CT, mask) pairs of one recipe, a one-line description of each, and (2.5D) the canonical slices to
    train on per pair (None: every slice of every pair).  ``positive_repeat`` lists every scan with a
    liver label that many times (class balance against the liver-free slices); ``extra`` adds the
    labeled-extra cases, every k-th slice (``extra_stride``); ``known_only`` trains a pseudo-labelled scan only
    on the pseudo-label's axial extent and its ranges flagged liver-free by eye, not on the unknown slices
    between them (where the pseudo-label may have stopped short of the liver's end)."""
    skip = {exclude, *SAME_PATIENT.get(exclude, ())} if exclude else set()
    pairs, notes, keep = [], [], []
    labelled = [case for case in LABELLED + (EXTRA_CASES if extra else ()) if case not in skip]
    if recipe == "pseudo" and pseudo is None:
        raise SystemExit("--recipe pseudo needs --pseudo DIR (bench/pseudo_labels.py output)")
    if recipe == "pseudo" and (pseudo / "totalseg_full_liver.nii.gz").is_file():
        labelled = [case for case in labelled if case != "totalseg_sm"]  # replaced by the whole scan
    for case in labelled:
        ct_file, mask_file = labelled_files(data, case)
        ct = read_volume(ct_file)
        stride = extra_stride(ct, extra_slice_mm) if case in EXTRA_CASES else 1
        label = read_mask(mask_file, ct)
        pair, slices = (((ct, label), list(range(num_slices(ct)))) if stride == 1 else
                        strided_pair(ct, label, 0, num_slices(ct) - 1, stride, context))
        pairs += [pair] * positive_repeat
        keep += [slices] * positive_repeat
        notes.append(f"{case}: labelled, {num_slices(ct)} slices" + (f", every {stride}. slice" if stride > 1 else "")
                     + _repeated(positive_repeat))
    if recipe == "labelled":
        return pairs, notes, keep if context else None
    for case, file in UNLABELLED_FILES.items():
        if case in skip:
            continue
        ct = read_volume(data / "unlabeled" / file)
        if recipe == "pseudo" and (pseudo / f"{case}_liver.nii.gz").is_file():
            label = read_mask(pseudo / f"{case}_liver.nii.gz", ct)
            if known_only:
                present = np.flatnonzero(canonical_volume(label).array.any((1, 2)))
                for first, last, repeat in [(present[0], present[-1], positive_repeat),
                                            *[(a, b, 1) for a, b in flags[case]["absent"]]]:
                    pair, slices = strided_pair(ct, label, int(first), int(last), WHOLE_SCAN_STRIDE, context)
                    pairs += [pair] * repeat
                    keep += [slices] * repeat
                    notes.append(f"{case}: canonical slices {first}-{last}, pseudo-label, every "
                                 f"{WHOLE_SCAN_STRIDE}. slice" + _repeated(repeat))
                continue
            pair, slices = strided_pair(ct, label, 0, num_slices(ct) - 1, WHOLE_SCAN_STRIDE, context)
            pairs += [pair] * positive_repeat
            keep += [slices] * positive_repeat
            notes.append(f"{case}: whole scan, pseudo-label, every {WHOLE_SCAN_STRIDE}. slice"
                         + _repeated(positive_repeat))
            continue
        for first, last in flags[case]["absent"]:
            pair, slices = strided_pair(ct, None, first, last, negative_stride, context)
            pairs.append(pair)
            keep.append(slices)
            notes.append(f"{case}: canonical slices {first}-{last} (liver-free), every {negative_stride}. slice, "
                         "empty mask")
    return pairs, notes, keep if context else None


def _repeated(times: int) -> str:
    return f", listed {times}x" if times > 1 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--recipe", choices=RECIPES, default="pseudo")
    parser.add_argument("--pseudo", type=Path, help="folder with bench/pseudo_labels.py output")
    parser.add_argument("--exclude", choices=LABELLED + EXTRA_CASES,
                        help="leave this labelled case (and its patient) out")
    parser.add_argument("--extra-cases", action="store_true",
                        help="also train on the labelled cases of labeled-extra/ (chaos_ctset3, totalsegds_s0009)")
    parser.add_argument("--extra-slice-mm", type=float, default=4.0,
                        help="labeled-extra scans: every k-th slice, about this many mm apart (0: every slice)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--restart-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--architecture", default="polycl_unet",
                        choices=["polycl_unet", "resunet", "transunet", "polycl_unet25d"])
    parser.add_argument("--context-slices", type=int, default=3, help="polycl_unet25d: adjacent axial slices per input")
    parser.add_argument("--bce-weight", type=float, default=1.0, help="+ weight x pixel BCE (0: soft Dice only)")
    parser.add_argument("--pooled-dice", action="store_true",
                        help="soft Dice pooled over each batch instead of per slice")
    parser.add_argument("--init", type=Path, help="initial segmentation checkpoint (warm start)")
    parser.add_argument("--augment-intensity", type=float, default=0.05, help="offset range, window units")
    parser.add_argument("--augment-noise", type=float, default=0.0, help="max noise sd, window units")
    parser.add_argument("--augment-organ-contrast", type=float, default=0.0,
                        help="liver-only offset range, window units (contrast phases)")
    parser.add_argument("--field-of-view", type=float, default=0.0,
                        help="mm square around the body as the input (0: whole slice resized)")
    parser.add_argument("--pseudo-known-only", action="store_true",
                        help="pseudo-labelled scans: only the pseudo-label's extent and the flagged liver-free ranges")
    parser.add_argument("--fov-crop", type=float, default=0.0,
                        help="probability per sample of a simulated 150-350 mm scanner field of view (needs "
                             "--field-of-view)")
    parser.add_argument("--negative-stride", type=int, default=NEGATIVE_STRIDE, help="every k-th liver-free slice")
    parser.add_argument("--positive-repeat", type=int, default=1,
                        help="list each scan with a liver label k times per epoch (against the liver-free slices)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = data_root(args.data)
    flags = json.loads((ROOT / "bench" / "presence_flags.json").read_text())
    print(machine(), flush=True)
    context = args.architecture == "polycl_unet25d"
    pairs, notes, keep = training_pairs(data, args.recipe, args.pseudo, args.exclude, flags, args.negative_stride,
                                        context, args.positive_repeat, args.extra_cases, args.extra_slice_mm,
                                        args.pseudo_known_only)
    slices = sum(len(k) for k in keep) if keep else sum(num_slices(ct) for ct, _ in pairs)
    print("\n".join(notes), f"\n{slices} slices", flush=True)
    architecture_args = {"dropout": args.dropout}
    if args.architecture == "polycl_unet25d":
        architecture_args["context_slices"] = args.context_slices
    config = FinetuneConfig(architecture=args.architecture, architecture_args=architecture_args,
                            input_size=args.size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            restart_epochs=args.restart_epochs, val_fraction=0.0, seed=args.seed, device="cpu",
                            bce_weight=args.bce_weight, dice_pooled=args.pooled_dice,
                            augment_intensity=args.augment_intensity, augment_noise=args.augment_noise,
                            augment_organ_contrast=args.augment_organ_contrast, augment_fov_crop=args.fov_crop,
                            field_of_view_mm=args.field_of_view, train_slices=keep)
    started = time.perf_counter()
    command = "nice -n 10 .venv/bin/python bench/train_starter.py " + shlex.join(sys.argv[1:])
    result = finetune(pairs, args.output, config, init=args.init, overwrite=True,
                      progress=lambda r: print(f"epoch {r.epoch}/{r.epochs} loss {r.loss:.4f} {r.seconds:.0f}s",
                                               flush=True),
                      data_description={"recipe": args.recipe, "excluded": args.exclude, "parts": notes},
                      recipe_notes={"command": command})
    print(f"wrote {result.path} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

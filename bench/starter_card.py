"""Complete a trained starter checkpoint's model card and install it as the bundled starter (issue 9).

Run:  .venv/bin/python bench/starter_card.py starter.safetensors --loo loo.json --plausibility plaus.json \
          --minutes 40 [-o PolyCLSlicer/polycl/weights/polycl_liver_starter.safetensors]

Adds the name, intended use, the Dice on each labelled case it was trained on (``training_set_dice_3d``,
read by the Slicer tests), the leave-one-case-out figures (JSON lines of ``bench/starter_loo.py``) and
the plausibility rows (JSON lines of ``bench/starter_plausibility.py``), then writes the checkpoint
atomically through ``polycl.nets.checkpoints`` (the card is validated, the weights are unchanged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CASES, ROOT, data_root  # noqa: E402  (also puts polycl on sys.path)

from polycl.inference import Segmenter  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.metrics import dice  # noqa: E402
from polycl.nets.checkpoints import read_checkpoint, save_checkpoint  # noqa: E402

STARTER = ROOT / "PolyCLSlicer" / "polycl" / "weights" / "polycl_liver_starter.safetensors"


def json_lines(path: Path | None) -> list[dict]:
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", default=None)
    parser.add_argument("--loo", type=Path, help="bench/starter_loo.py output")
    parser.add_argument("--plausibility", type=Path, help="bench/starter_plausibility.py output")
    parser.add_argument("--minutes", type=float, required=True, help="training wall-clock minutes")
    parser.add_argument("--earlier-stage", action="append", default=[],
                        help="command of an earlier training stage (its checkpoint was --init), oldest first")
    parser.add_argument("-o", "--output", type=Path, default=STARTER)
    args = parser.parse_args()
    data = data_root(args.data)
    tensors, card = read_checkpoint(args.checkpoint)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    fit = {}
    for case in CASES:
        ct = read_volume(data / "labeled" / f"{case}_ct.nii.gz")
        reference = read_mask(data / "labeled" / f"{case}_liver.nii.gz", ct)
        fit[case] = round(dice(segmenter.segment(ct.array, ct.ijk_to_ras).mask, reference.array), 3)
    card["name"] = "PolyCL liver starter model"
    card["intended_use"] = ("Research starter model for CPU demos and tests: liver in abdominal CT, trained on 3 "
                            "labelled scans (one extended by a pseudo-labelled liver tip and its liver-free slices) "
                            "and liver-free chest slices of 3 more CTs; finetune on your own data before relying "
                            "on it. Not for clinical use.")
    if args.earlier_stage:
        card["recipe"]["earlier_stages"] = args.earlier_stage
    card["recipe"]["hardware"] = f"2 shared CPU cores (AMD EPYC), {args.minutes:.0f} min"
    card["metrics"]["training_set_dice_3d"] = fit
    card["metrics"]["leave_one_case_out"] = [
        {key: row[key] for key in ("held_out", "dice", "hd95_mm") if key in row} for row in json_lines(args.loo)]
    card["metrics"]["unseen_ct_plausibility"] = json_lines(args.plausibility)
    save_checkpoint(args.output, tensors, card, overwrite=True)
    print(json.dumps(card["metrics"], indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

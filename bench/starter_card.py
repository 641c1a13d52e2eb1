"""Complete a trained starter checkpoint's model card and install it as the bundled starter (issue 9).

Run:  .venv/bin/python bench/starter_card.py starter.safetensors --loo loo.json --plausibility plaus.json \
          --held-out ircad01.json --presence presence.jsonl --minutes 12 \
          [-o PolyCLSlicer/polycl/weights/polycl_liver_starter.safetensors]

Adds the name, intended use, the Dice on each labelled case it was trained on (``training_set_dice_3d``,
read by the Slicer tests), the leave-one-case-out figures (JSON lines of ``bench/starter_loo.py``) and
the plausibility rows (JSON lines of ``bench/starter_plausibility.py``), the one evaluation on the unseen
expert-labelled CT (``--held-out``) and the liver-presence rows (``bench/liver_presence.py --json``), names the
training data's licences, replaces this machine's paths by portable ones, then writes the checkpoint
atomically through ``polycl.nets.checkpoints`` (the card is validated, the weights are unchanged).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CASES, EXTRA_CASES, ROOT, data_root, labelled_files, machine  # noqa: E402  (polycl on path)

from polycl.inference import Segmenter  # noqa: E402
from polycl.io.volumes import read_mask, read_volume  # noqa: E402
from polycl.metrics import dice  # noqa: E402
from polycl.nets.checkpoints import read_checkpoint, save_checkpoint  # noqa: E402

STARTER = ROOT / "PolyCLSlicer" / "polycl" / "weights" / "polycl_liver_starter.safetensors"


def json_lines(path: Path | None) -> list[dict]:
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


LICENCES = {
    "totalseg_full, totalseg_sm, totalseg_dcm, totalseg_aorta_cta": "Apache-2.0 (TotalSegmentator test files)",
    "totalsegds_s0009": "CC BY 4.0 (TotalSegmentator dataset, Wasserthal et al., Radiology: AI 2023)",
    "chaos_ctset3": "CC BY-SA 4.0 (CHAOS challenge, Kavur et al., Medical Image Analysis 2021): share-alike may "
                    "extend to these weights",
    "dcmqi_3slice": "BSD-style (QIICR dcmqi test data)",
    "pyradiomics_lung1, pyradiomics_lung2": "BSD-3 (pyradiomics test data)",
    "ircad01": "CC BY-NC-ND 3.0: never trained on; evaluation only",
}


def portable(value, replacements: dict[str, str]):
    """The card with this machine's paths replaced (a data folder, a scratch folder), recursively."""
    if isinstance(value, dict):
        return {key: portable(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, replacements) for item in value]
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return re.sub(r"/(?:work|home|tmp)/[\w./-]*/(pseudo|checks)\b", r"/tmp/\1", value)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", default=None)
    parser.add_argument("--loo", type=Path, help="bench/starter_loo.py output")
    parser.add_argument("--plausibility", type=Path, help="bench/starter_plausibility.py output")
    parser.add_argument("--minutes", type=float, required=True, help="training wall-clock minutes")
    parser.add_argument("--earlier-stage", action="append", default=[],
                        help="command of an earlier training stage (its checkpoint was --init), oldest first")
    parser.add_argument("--held-out", type=Path, help="JSON line: the one score on the unseen expert-labelled CT")
    parser.add_argument("--presence", type=Path, help="bench/liver_presence.py --json output")
    parser.add_argument("--version", default="4")
    parser.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                        help="a path of this machine to replace in the card (e.g. a scratch folder)")
    parser.add_argument("-o", "--output", type=Path, default=STARTER)
    args = parser.parse_args()
    data = data_root(args.data)
    tensors, card = read_checkpoint(args.checkpoint)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    fit = {}
    for case in (*CASES, *EXTRA_CASES):
        ct_file, mask_file = labelled_files(data, case)
        ct = read_volume(ct_file)
        reference = read_mask(mask_file, ct)
        fit[case] = round(dice(segmenter.segment(ct.array, ct.ijk_to_ras).mask, reference.array), 3)
    card["name"] = f"PolyCL liver starter model, version {args.version}"
    card["intended_use"] = ("Research starter model: the liver in CT of adults, on CPU or GPU; trained on 5 labelled "
                            "scans (one a 178 mm small field of view), a pseudo-labelled liver tip and liver-free "
                            "chest and pelvis slices; finetune on your own data before relying on it. Not for "
                            "clinical use.")
    card["data_licences"] = LICENCES
    if args.earlier_stage:
        card["recipe"]["earlier_stages"] = args.earlier_stage
    card["recipe"]["hardware"] = f"{machine()}; {args.minutes:.0f} min"
    card["metrics"]["training_set_dice_3d"] = fit
    card["metrics"]["leave_one_case_out"] = [
        {key: row[key] for key in ("held_out", "dice", "hd95_mm", "fn_pct", "fp_pct") if key in row}
        for row in json_lines(args.loo)]
    card["metrics"]["unseen_ct_plausibility"] = json_lines(args.plausibility)
    if args.held_out:
        card["metrics"]["held_out_expert_ct"] = json_lines(args.held_out)
    if args.presence:
        card["metrics"]["liver_presence_and_small_fields_of_view"] = [  # training cases and crops of ircad01
            {key: row[key] for key in ("crop", "expected", "status", "mask_ml", "dice") if row.get(key) is not None}
            for row in json_lines(args.presence)]
    card = portable(card, {str(data): "../shared/data", **dict(item.split("=", 1) for item in args.replace)})
    save_checkpoint(args.output, tensors, card, overwrite=True)
    print(json.dumps(card["metrics"], indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

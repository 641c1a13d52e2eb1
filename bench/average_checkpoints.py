"""Average the weights of checkpoints trained from one initial checkpoint with different seeds (a "model soup").

Run:  .venv/bin/python bench/average_checkpoints.py seed0.safetensors seed1.safetensors -o soup.safetensors

Members trained from the same initial weights for a few epochs at a low learning rate stay in one basin of
the loss, so the mean of their weights is a network of the same cost that is usually as good as the mean of
their outputs (Wortsman et al., ICML 2022).  Every member must have the same architecture, input (size,
window, field of view, channels) and tensors; the card is the first member's, with ``recipe.weight_average``
naming the members, their seeds and commands, and ``recipe.command`` this script's.  Written atomically
through ``polycl.nets.checkpoints``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts polycl on sys.path)

from polycl.nets.checkpoints import CheckpointError, read_checkpoint, save_checkpoint  # noqa: E402

SAME_INPUT = ("kind", "architecture", "architecture_args", "input_size", "window", "field_of_view_mm",
              "input_channels", "context_slices")


def average_checkpoints(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean weights of ``paths`` and the first card with the members recorded; CheckpointError on a mismatch."""
    if len(paths) < 2:
        raise CheckpointError("give at least two checkpoints to average")
    members = [read_checkpoint(path) for path in paths]
    first_tensors, first_card = members[0]
    for path, (tensors, card) in zip(paths[1:], members[1:], strict=True):
        differing = [key for key in SAME_INPUT if card.get(key) != first_card.get(key)]
        if differing:
            raise CheckpointError(f"{path} differs from {paths[0]} in {', '.join(differing)}")
        shapes = {key: tuple(value.shape) for key, value in tensors.items()}
        if shapes != {key: tuple(value.shape) for key, value in first_tensors.items()}:
            raise CheckpointError(f"{path} holds other tensors than {paths[0]}")
    average = {}
    for key, value in first_tensors.items():
        if value.is_floating_point():
            average[key] = torch.stack([tensors[key].double() for tensors, _ in members]).mean(0).to(value.dtype)
        else:  # counters (none in the shipped networks): the first member's
            average[key] = value
    card = dict(first_card, metrics={})  # a member's loss and best epoch say nothing of the mean
    card["recipe"] = dict(first_card.get("recipe", {}))
    card["recipe"]["weight_average"] = [
        {"file": path.name, "seed": member_card.get("recipe", {}).get("seed"),
         "command": member_card.get("recipe", {}).get("command")}
        for path, (_, member_card) in zip(paths, members, strict=True)]
    return average, card


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.output.exists() or args.output in args.checkpoints:
        sys.exit(f"{args.output} exists; choose a new file name (members are never overwritten)")
    try:
        tensors, card = average_checkpoints(args.checkpoints)
    except (CheckpointError, FileNotFoundError) as error:
        sys.exit(f"average_checkpoints: {error}")
    card["recipe"]["command"] = " ".join([".venv/bin/python bench/average_checkpoints.py",
                                          *map(str, args.checkpoints), "-o", str(args.output)])
    save_checkpoint(args.output, tensors, card, overwrite=False)
    print(f"wrote {args.output}: mean of {len(args.checkpoints)} checkpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

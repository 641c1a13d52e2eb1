"""bench/average_checkpoints.py, the tool that built starter version 6: the mean of the members' weights, members
that differ refused, a member's training metrics not carried over, and no file overwritten."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polycl.nets.checkpoints import CheckpointError, default_card, read_checkpoint, save_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "average_checkpoints.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("average_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def member(path: Path, value: float, seed: int, input_size: int = 32) -> Path:
    card = default_card("polycl_unet", {"base": 4}, input_size,
                        recipe={"seed": seed, "command": f"train --seed {seed}"}, metrics={"train_loss": 0.8})
    tensors = {"conv.weight": torch.full((2, 3), value), "conv.bias": torch.full((2,), -value)}
    save_checkpoint(path, tensors, card)
    return path


def test_the_mean_of_the_weights_with_the_members_named(tmp_path):
    tool = load_tool()
    paths = [member(tmp_path / "a.safetensors", 1.0, 0), member(tmp_path / "b.safetensors", 2.0, 1)]
    tensors, card = tool.average_checkpoints(paths)
    assert torch.equal(tensors["conv.weight"], torch.full((2, 3), 1.5))
    assert torch.equal(tensors["conv.bias"], torch.full((2,), -1.5))
    assert [m["seed"] for m in card["recipe"]["weight_average"]] == [0, 1]
    assert card["metrics"] == {}  # a member's loss says nothing of the mean


def test_members_that_differ_are_refused(tmp_path):
    tool = load_tool()
    a = member(tmp_path / "a.safetensors", 1.0, 0)
    with pytest.raises(CheckpointError, match="input_size"):
        tool.average_checkpoints([a, member(tmp_path / "c.safetensors", 2.0, 1, input_size=64)])
    with pytest.raises(CheckpointError, match="at least two"):
        tool.average_checkpoints([a])


def test_the_command_writes_a_new_file_and_never_overwrites(tmp_path):
    a, b = member(tmp_path / "a.safetensors", 1.0, 0), member(tmp_path / "b.safetensors", 3.0, 1)
    out = tmp_path / "soup.safetensors"
    run = [sys.executable, str(SCRIPT), str(a), str(b), "-o", str(out)]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    tensors, card = read_checkpoint(out)
    assert torch.equal(tensors["conv.weight"], torch.full((2, 3), 2.0))
    assert "average_checkpoints" in card["recipe"]["command"]
    before = a.read_bytes()
    refused = subprocess.run([*run[:-1], str(a)], capture_output=True, text=True)
    assert refused.returncode != 0 and "exists" in refused.stderr and a.read_bytes() == before

"""Sparse finetuning (issue 10): only painted slices and listed liver-free slices reach the loss.

Synthetic volumes carry the organ on every slice of the CT but a label on a few slices only, so a
finetune that trained on an unpainted slice (as background) or took a listed empty slice from the
wrong end of a flipped / permuted volume is caught by looking at what the loss sees.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

import polycl.training.finetuning as finetuning
from polycl.cli.main import main as polycl
from polycl.io.base import Volume
from polycl.io.volumes import write_mask, write_volume
from polycl.nets.checkpoints import default_card, load_checkpoint, read_checkpoint, save_model
from polycl.nets.registry import build_model
from polycl.progress import Cancelled
from polycl.training.config import FinetuneConfig
from polycl.training.finetuning import finetune
from polycl.training.sparse import annotated_slices, held_out_painted, is_sparse_annotation, select_slices

SMALL = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}
SIZE = 48  # in-plane size = model input: no resizing, so areas seen by the loss are the label's areas
SLICES = 8
ORGAN_FREE = 6  # base slice whose CT has no organ


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Small volumes: one torch thread."""


def radius(k: int) -> int:
    return 6 + k  # a different organ area on every slice


def base_case(painted: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT [i, j, k] with the organ on every slice but ORGAN_FREE, label only on ``painted``; k runs superior."""
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    body = ((i - 24) / 23) ** 2 + ((j - 24) / 22) ** 2 < 1
    ct = np.where(body, 0.0, -1000.0)[..., None].repeat(SLICES, 2) + rng.normal(0, 5, (SIZE, SIZE, SLICES))
    label = np.zeros((SIZE, SIZE, SLICES), np.uint8)
    for k in range(SLICES):
        organ = (i - 20) ** 2 + (j - 22) ** 2 < radius(k) ** 2
        if k != ORGAN_FREE:
            ct[..., k] += np.where(organ, 60, 0)
        if k in painted:
            label[..., k] = organ
    return ct.astype(np.int16), label, np.diag([1.5, 1.5, 3.0, 1.0])


def axial_first_flipped(array: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same patient: the axial axis becomes array axis 0 and runs superior -> inferior."""
    permuted = np.transpose(array, (2, 0, 1))
    out = np.array(matrix, float)[:, [2, 0, 1, 3]]
    out[:3, 3] = out[:3, :3] @ np.array([SLICES - 1, 0, 0]) + out[:3, 3]
    out[:3, 0] = -out[:3, 0]
    return np.ascontiguousarray(permuted[::-1]), out


def spy_training(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (images, masks) of every training batch: inputs via a forward hook, targets via the loss."""
    seen, inputs = [], []
    build, loss = finetuning.build_model, finetuning.soft_dice_loss

    def build_spied(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, x: inputs.append(x[0].detach().clone()) if module.training
                                        else None)
        return model

    def loss_spied(logits, target, *args, **kwargs):
        if torch.is_grad_enabled():  # training batches; validation runs under no_grad
            seen.append((inputs[-1], target.detach().clone()))
        return loss(logits, target, *args, **kwargs)

    monkeypatch.setattr(finetuning, "build_model", build_spied)
    monkeypatch.setattr(finetuning, "soft_dice_loss", loss_spied)
    return seen


def sparse_config(**overrides) -> FinetuneConfig:
    values = dict(architecture="polycl_unet", architecture_args=SMALL, input_size=SIZE, epochs=2, batch_size=4,
                  lr=1e-3, augment=False, device="cpu", slices="annotated")
    return FinetuneConfig(**{**values, **overrides})


def areas(masks: torch.Tensor) -> list[int]:
    return [int(m.sum()) for m in masks]


def test_sparse_mode_trains_on_painted_and_listed_empty_slices_only_in_array_order(tmp_path, monkeypatch):
    ct, label, matrix = base_case(painted={1, 4})
    ct, matrix_flipped = axial_first_flipped(ct, matrix)
    label, _ = axial_first_flipped(label, matrix)
    empty = SLICES - 1 - ORGAN_FREE  # array index of the organ-free slice in the flipped volume (1)
    assert annotated_slices(label, matrix_flipped) == [3, 6]
    seen = spy_training(monkeypatch)
    result = finetune([(Volume(ct, matrix_flipped, "flipped"), Volume(label, matrix_flipped))],
                      tmp_path / "sparse.safetensors", sparse_config(empty_slices=[empty]))
    images = torch.cat([batch[0] for batch in seen])
    masks = torch.cat([batch[1] for batch in seen])
    painted_areas = {int(label[k].sum()) for k in (3, 6)}
    assert set(areas(masks)) == painted_areas | {0}
    organ_pixels = (images > 0.5).flatten(1).float().mean(1)  # windowed organ (60 HU) is 0.55, body 0.4
    background = masks.flatten(1).sum(1) == 0
    assert background.any() and organ_pixels[background].max() < 0.01  # the organ-free slice, never another
    card = read_checkpoint(result.path)[1]
    assert card["data"]["slice_mode"] == "annotated"
    assert card["data"]["slices_used"] == [{"scan": "flipped", "painted": [3, 6], "empty": [1], "validation": []}]


def test_three_or_more_painted_slices_hold_one_out_for_validation(tmp_path, monkeypatch):
    ct, label, matrix = base_case(painted={0, 2, 4, 7})
    seen = spy_training(monkeypatch)
    reports = []
    result = finetune([(Volume(ct, matrix, "case"), Volume(label, matrix))], tmp_path / "m.safetensors",
                      sparse_config(), progress=reports.append)
    used = result.card["data"]["slices_used"][0]
    assert len(used["validation"]) == 1 and sorted(used["painted"] + used["validation"]) == [0, 2, 4, 7]
    trained = set(areas(torch.cat([batch[1] for batch in seen])))
    assert trained == {int(label[..., k].sum()) for k in used["painted"]}  # the held-out slice never trains
    assert all("val_dice" in report.metrics for report in reports)
    assert held_out_painted([select_slices(label, matrix)], seed=0) == [(0, used["validation"][0])]


def test_bad_sparse_labels_give_one_line_errors(tmp_path):
    ct, label, matrix = base_case(painted={2})
    pair = (Volume(ct, matrix, "case"), Volume(label, matrix))
    nothing = (Volume(ct, matrix, "case"), Volume(np.zeros_like(label), matrix))
    with pytest.raises(ValueError, match="no foreground: paint the liver"):
        finetune([nothing], tmp_path / "a.safetensors", sparse_config())
    with pytest.raises(ValueError, match="slice 2 is listed as liver-free but the label has liver"):
        finetune([pair], tmp_path / "b.safetensors", sparse_config(empty_slices=[2]))
    with pytest.raises(ValueError, match="empty slice 8 is outside 0..7"):
        finetune([pair], tmp_path / "c.safetensors", sparse_config(empty_slices=[8]))
    with pytest.raises(ValueError, match="only apply to sparse finetuning"):
        finetune([pair], tmp_path / "d.safetensors", sparse_config(slices="all", empty_slices=[5]))
    with pytest.raises(ValueError, match="exactly one scan"):
        finetune([pair, pair], tmp_path / "e.safetensors", sparse_config(empty_slices=[5]))
    assert not list(tmp_path.iterdir())


def test_sparse_finetune_keeps_the_initial_model_when_training_collapses(tmp_path, monkeypatch):
    ct, label, matrix = base_case(painted={1, 3, 5, 7})
    init = save_model(tmp_path / "init.safetensors", build_model("polycl_unet", **SMALL),
                      default_card("polycl_unet", SMALL, SIZE))
    make_optimizer = finetuning.make_optimizer

    def collapsing(parameters, *args, **kwargs):  # every step ends with a network that predicts no liver
        parameters = list(parameters)
        optimizer, scheduler = make_optimizer(parameters, *args, **kwargs)
        step, output_bias = optimizer.step, parameters[-1]
        assert output_bias.numel() == 1

        def step_then_collapse(*step_args, **step_kwargs):
            result = step(*step_args, **step_kwargs)
            with torch.no_grad():
                output_bias.fill_(-100.0)
            return result

        optimizer.step = step_then_collapse
        return optimizer, scheduler

    monkeypatch.setattr(finetuning, "make_optimizer", collapsing)
    with pytest.warns(UserWarning, match="keeps the initial weights"):
        result = finetune([(Volume(ct, matrix), Volume(label, matrix))], tmp_path / "collapsed.safetensors",
                          sparse_config(epochs=2), init=init)
    assert result.best_epoch == 0 and "initial_val_dice" in result.card["data"]
    before, after = load_checkpoint(init)[0].state_dict(), load_checkpoint(result.path)[0].state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_cancelled_sparse_finetune_leaves_the_previous_checkpoint(tmp_path):
    ct, label, matrix = base_case(painted={1, 4, 6})
    output = tmp_path / "model.safetensors"
    save_model(output, build_model("polycl_unet", **SMALL), default_card("polycl_unet", SMALL, SIZE))
    before, cancel = output.read_bytes(), threading.Event()
    with pytest.raises(Cancelled):
        finetune([(Volume(ct, matrix), Volume(label, matrix))], output, sparse_config(), overwrite=True,
                 cancel=cancel, on_batch=lambda index, total, loss: cancel.set())
    assert output.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_cli_sparse_finetune_records_slices_and_checks_options(tmp_path, capsys):
    ct, label, matrix = base_case(painted={2, 5})
    write_volume(tmp_path / "case_ct.nii.gz", ct, matrix)
    write_mask(tmp_path / "case_liver.nii.gz", label, matrix)
    init = save_model(tmp_path / "init.safetensors", build_model("polycl_unet", **SMALL),
                      default_card("polycl_unet", SMALL, SIZE))
    common = ["finetune", "--images", str(tmp_path / "case_ct.nii.gz"), "--labels", str(tmp_path / "case_liver.nii.gz"),
              "--init", str(init), "--epochs", "1", "--device", "cpu"]
    assert polycl([*common, "-o", str(tmp_path / "bad.safetensors"), "--empty-slices", "6"]) == 2
    assert "--empty-slices needs --slices annotated" in capsys.readouterr().err
    assert polycl([*common, "-o", str(tmp_path / "out.safetensors"), "--slices", "annotated",
                   "--empty-slices", str(ORGAN_FREE)]) == 0
    assert "training on painted slices [2, 5], liver-free slices [6]" in capsys.readouterr().err
    card = json.loads(json.dumps(read_checkpoint(tmp_path / "out.safetensors")[1]))
    assert card["data"]["slices_used"][0]["empty"] == [ORGAN_FREE]
    assert card["recipe"]["lr"] == 1e-4 and card["recipe"]["slices"] == "annotated"  # sparse defaults


def test_automatic_choice_of_sparse_mode():
    assert is_sparse_annotation([3, 9, 15], (0, 20))[0]  # gaps
    assert is_sparse_annotation([8, 9, 10], (0, 20))[0]  # contiguous but 3 of 21 slices
    assert not is_sparse_annotation(list(range(2, 19)), (0, 20))[0]  # a whole-volume segmentation
    assert not is_sparse_annotation([], (0, 20))[0]


@pytest.mark.slow
@pytest.mark.parametrize("shift_hu, floor", [(250.0, 0.85), (0.0, 0.9)])  # starter v4 as is: 0.922
def test_three_painted_slices_fix_the_starter_where_it_fails_and_keep_it_where_it_works(
        labeled_case, tmp_path, shift_hu, floor):
    """totalseg_sm with +250 HU (a contrast shift the starter never saw) and as is (~0.92 with version 4):
    painting 3 slices must lift the other slices above ``floor`` and never lose more than 0.02."""
    from polycl.inference import Segmenter
    from polycl.metrics import dice
    from polycl.nets.model_card import STARTER_CHECKPOINT

    ct, liver = labeled_case("totalseg_sm")
    ct = Volume(ct.array.astype(np.float32) + shift_hu, ct.ijk_to_ras, "totalseg_sm")
    painted_slices = [5, 15, 25]  # array k (axis 2 of this RAS volume)
    painted = np.zeros_like(liver.array)
    painted[:, :, painted_slices] = liver.array[:, :, painted_slices]
    others = [k for k in range(ct.array.shape[2]) if k not in painted_slices]

    def other_slice_dice(checkpoint) -> float:
        mask = Segmenter.from_checkpoint(checkpoint, "cpu").segment(ct.array, ct.ijk_to_ras).mask
        return dice(mask[:, :, others], liver.array[:, :, others])

    before = other_slice_dice(STARTER_CHECKPOINT)
    config = FinetuneConfig(slices="annotated", epochs=6, lr=1e-4, batch_size=8, device="cpu")
    result = finetune([(ct, Volume(painted, ct.ijk_to_ras))], tmp_path / "sparse.safetensors", config,
                      init=STARTER_CHECKPOINT)
    after = other_slice_dice(result.path)
    assert after >= floor and after >= before - 0.02, (before, after)
    used = result.card["data"]["slices_used"][0]
    assert sorted(used["painted"] + used["validation"]) == painted_slices

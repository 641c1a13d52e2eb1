"""Finetuning (loss goes down, split by scan, cancel/crash safety) and whole-volume inference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import oblique_matrix
from polycl.devices import resolve_device
from polycl.geometry import CanonicalOrientation
from polycl.inference import Segmenter
from polycl.io.base import Volume
from polycl.masks import keep_largest_component
from polycl.nets.checkpoints import default_card, load_checkpoint, save_model
from polycl.nets.registry import build_model
from polycl.progress import Cancelled
from polycl.training.config import FinetuneConfig
from polycl.training.finetuning import finetune, split_scans

SMALL = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}


def synthetic_case(seed: int, shape=(48, 48, 6)) -> tuple[Volume, Volume]:
    """A soft-tissue ellipse ('liver', ~60 HU) in a body (0 HU) surrounded by air."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((i - 24) / 22) ** 2 + ((j - 24) / 20) ** 2 < 1
    ci, cj = 18 + rng.integers(-3, 4), 20 + rng.integers(-3, 4)
    organ = ((i - ci) / 10) ** 2 + ((j - cj) / 8) ** 2 < 1
    ct = np.where(body, 0, -1000)[..., None] + np.where(organ, 60, 0)[..., None] + rng.normal(0, 5, shape)
    mask = np.repeat(organ[..., None], shape[2], axis=2).astype(np.uint8)
    matrix = np.diag([1.5, 1.5, 3.0, 1.0])
    return Volume(ct.astype(np.int16), matrix, f"synthetic{seed}"), Volume(mask, matrix)


def small_config(**overrides) -> FinetuneConfig:
    values = dict(architecture_args=SMALL, input_size=32, epochs=4, batch_size=6, lr=1e-2, val_fraction=0.34,
                  augment=False, device="cpu")
    values.update(overrides)
    return FinetuneConfig(**values)


def test_split_is_by_scan_and_keeps_training_data():
    train, val = split_scans(5, 0.2, seed=0)
    assert len(val) == 1 and sorted(train + val) == list(range(5))
    assert split_scans(1, 0.5, 0) == ([0], [])
    assert split_scans(3, 0.0, 0) == ([0, 1, 2], [])


def test_finetuning_lowers_the_loss_and_writes_a_model_card(tmp_path):
    pairs = [synthetic_case(s) for s in range(3)]
    reports = []
    result = finetune(pairs, tmp_path / "model.safetensors", small_config(epochs=6, augment=True),
                      progress=reports.append)
    assert [r.epoch for r in reports] == list(range(1, 7))
    assert reports[-1].loss < reports[0].loss
    assert all("val_dice" in r.metrics for r in reports)
    model, card = load_checkpoint(result.path)
    assert card["recipe"]["loss"] == "soft Dice" and card["data"]["val_scans"] and card["metrics"]["best_epoch"]
    assert set(card["data"]["train_scans"]).isdisjoint(card["data"]["val_scans"])


def test_cancel_leaves_the_previous_checkpoint_intact(tmp_path):
    output = tmp_path / "model.safetensors"
    save_model(output, build_model("polycl_unet", **SMALL), default_card("polycl_unet", SMALL, 32))
    before = output.read_bytes()
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        finetune([synthetic_case(0), synthetic_case(1)], output, small_config(batch_size=2), overwrite=True,
                 cancel=cancel, on_batch=lambda index, total, loss: cancel.set())
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_crash_mid_run_leaves_the_previous_checkpoint_intact(tmp_path):
    output = tmp_path / "model.safetensors"
    output.write_bytes(b"previous")

    def crash(report):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        finetune([synthetic_case(0)], output, small_config(), overwrite=True, progress=crash)
    assert output.read_bytes() == b"previous"
    with pytest.raises(FileExistsError):
        finetune([synthetic_case(0)], output, small_config())


def test_finetune_rejects_mask_on_another_grid():
    ct, mask = synthetic_case(0)
    mask.ijk_to_ras = mask.ijk_to_ras @ np.diag([1, 1, 1.5, 1])
    with pytest.raises(ValueError, match="geometry"):
        finetune([(ct, mask)], "/nonexistent/never_written.safetensors", small_config())


@pytest.fixture(scope="module")
def random_segmenter():
    torch.manual_seed(0)
    model = build_model("polycl_unet", **SMALL)
    return Segmenter(model, default_card("polycl_unet", SMALL, 32), device="cpu", precision="fp32")


@pytest.mark.parametrize("seed", range(4))
def test_reoriented_copy_gives_the_same_mask_in_world_space(random_segmenter, seed):
    rng = np.random.default_rng(seed)
    ct = (rng.normal(0, 300, (20, 24, 7))).astype(np.int16)
    ct[0, 0, 0], ct[-1, -1, -1] = -1000, 400
    matrix = oblique_matrix(angles=(0.1 * seed, -0.15, 0.2))
    reindex = CanonicalOrientation(tuple(rng.permutation(3)), tuple(bool(b) for b in rng.integers(0, 2, 3)))
    copy_ct, copy_matrix = reindex.to_canonical(ct), reindex.canonical_matrix(matrix, ct.shape)
    original = random_segmenter.segment(ct, matrix, batch_size=3, largest_component=False, probability=True)
    copied = random_segmenter.segment(copy_ct, copy_matrix, batch_size=5, largest_component=False, probability=True)
    assert original.mask.shape == ct.shape and copied.mask.shape == copy_ct.shape
    np.testing.assert_allclose(reindex.from_canonical(copied.probability), original.probability, atol=1e-5)
    np.testing.assert_array_equal(reindex.from_canonical(copied.mask), original.mask)


def test_inference_reports_progress_and_cancels(random_segmenter):
    ct = np.random.default_rng(0).normal(0, 300, (16, 16, 10)).astype(np.int16)
    fractions = []
    random_segmenter.segment(ct, np.eye(4), batch_size=4, progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 3
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        random_segmenter.segment(ct, np.eye(4), cancel=cancel)


def test_largest_component_and_device_resolution():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:4, 1:4, 1:4] = True
    mask[6:9, 6:9, 6:8] = True
    kept = keep_largest_component(mask)
    assert kept.sum() == 27 and kept[2, 2, 2] and not kept[7, 7, 7]
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_organ_contrast_augmentation_shifts_the_liver_and_not_its_neighbours():
    """Contrast phases change the liver's brightness, not the whole image's: with ``organ`` > 0 the
    liver-minus-surroundings contrast varies between samples; without it, gain and offset move both alike."""
    from polycl.training.augment import augment_batch, organ_contrast

    images = torch.full((64, 1, 64, 64), 0.5)
    masks = torch.zeros(64, 1, 64, 64)
    masks[:, :, 24:40, 24:40] = 1
    shifted = organ_contrast(images[:2], masks[:2], torch.tensor([0.1, -0.2]))
    assert torch.allclose(shifted[:, 0, 28:36, 28:36], torch.tensor([0.6, 0.3])[:, None, None])
    assert torch.equal(shifted[:, :, :22], images[:2, :, :22]) and torch.equal(shifted[:, :, 42:], images[:2, :, 42:])
    centre = torch.linspace(-1, 1, 64).abs() < 0.7
    central = (centre[:, None] & centre[None, :])  # never reaches the warp's zero padding (scale, shift, rotation)

    def liver_contrast(organ: float) -> torch.Tensor:
        out, warped = augment_batch(images, masks, torch.Generator().manual_seed(0), organ=organ)
        inner = torch.nn.functional.max_pool2d(-warped, 5, 1, 2) < 0  # 2 px inside the label border
        outer = (torch.nn.functional.max_pool2d(warped, 5, 1, 2) == 0) & central  # 2 px outside it
        return torch.stack([out[k][inner[k]].mean() - out[k][outer[k]].mean() for k in range(len(out))])

    assert liver_contrast(0.0).abs().max() < 1e-3  # bilinear rounding at the rim of the central region
    spread = liver_contrast(0.15)
    assert spread.abs().max() > 0.1 and spread.min() < -0.05 < 0.05 < spread.max()
    assert spread.abs().max() <= 0.15 * 1.1 + 1e-5  # the offset range times the largest gain

"""Metric values on hand-made masks with known Dice and Hausdorff distances."""

from __future__ import annotations

import numpy as np
import pytest

from polycl.metrics import dice, evaluate, hausdorff, per_slice_dice
from polycl.training.finetuning import soft_dice_loss


def cube(shape, start, size):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def test_dice_known_values():
    a = cube((20, 20, 20), (0, 0, 0), 10)
    b = cube((20, 20, 20), (5, 0, 0), 10)  # overlaps half
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_hausdorff_is_in_millimetres_and_spacing_aware():
    a = cube((30, 30, 30), (5, 5, 5), 10)
    b = cube((30, 30, 30), (8, 5, 5), 10)  # shifted 3 voxels along i
    iso = hausdorff(a, b, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert iso["hd_mm"] == pytest.approx(3.0)
    assert iso["hd95_mm"] == pytest.approx(3.0)
    aniso = hausdorff(a, b, np.diag([2.5, 0.7, 0.7, 1.0]))  # 3 voxels x 2.5 mm
    assert aniso["hd_mm"] == pytest.approx(7.5)
    shifted_other_axis = hausdorff(a, cube((30, 30, 30), (5, 5, 8), 10), np.diag([2.5, 0.7, 0.7, 1.0]))
    assert shifted_other_axis["hd_mm"] == pytest.approx(2.1)


def test_hd95_ignores_a_small_outlier_but_hd_does_not():
    a = cube((60, 40, 40), (5, 5, 5), 20)
    b = a.copy()
    b[54, 20, 20] = 1  # one stray voxel 30 voxels from the surface (i = 24)
    result = hausdorff(b, a, np.eye(4))
    assert result["hd_mm"] == pytest.approx(30.0)
    assert result["hd95_mm"] == pytest.approx(0.0)


def test_empty_masks():
    empty = np.zeros((5, 5, 5))
    assert hausdorff(empty, empty, np.eye(4))["hd_mm"] == 0.0
    assert hausdorff(empty, cube((5, 5, 5), (1, 1, 1), 2), np.eye(4))["hd95_mm"] == float("inf")


def test_per_slice_dice_matches_papers_convention():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.zeros((4, 4, 3), np.uint8)
    a[:2, :, 0] = 1
    b[:, :, 0] = 1  # slice 0: Dice 2*8/(8+16) = 2/3
    a[:, :, 1] = 1  # slice 1: prediction only: 0; slice 2 empty/empty: 1
    np.testing.assert_allclose(per_slice_dice(a, b, axis=2), [2 / 3, 0.0, 1.0])
    assert evaluate(a, b, np.eye(4))["mean_slice_dice_2d"] == pytest.approx((2 / 3 + 1) / 3)


def test_soft_dice_loss_values():
    import torch

    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert soft_dice_loss(-perfect, target).item() == pytest.approx(1 - 1 / 65, abs=1e-3)


def test_pooled_soft_dice_loss_charges_a_liver_free_slice_its_false_pixels_only():
    import torch

    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 2:6] = 1  # slice 1 is liver-free
    logits = torch.where(target > 0, 50.0, -50.0)
    logits[1, :, 0, 0] = 50.0  # one false pixel on the liver-free slice
    per_slice = soft_dice_loss(logits, target).item()
    pooled = soft_dice_loss(logits, target, pooled=True).item()
    assert per_slice == pytest.approx((1 - 1 / 2) / 2, abs=1e-4)  # the empty slice's Dice drops to 1/2
    assert pooled == pytest.approx(1 - 33 / 34, abs=1e-4)  # one pixel of 16 + 17


@pytest.mark.parametrize("seed", range(6))
def test_distances_in_the_masks_box_equal_those_of_the_whole_volume(seed):
    """Hausdorff is computed inside both masks' bounding box: the same figures as on the whole
    arrays, also for masks that touch the array's edge (where the erosion's border counts as background)."""
    from polycl.metrics import directed_surface_distances

    rng = np.random.default_rng(seed)
    shape = (40, 36, 30)
    masks = []
    for _ in range(2):
        mask = np.zeros(shape, bool)
        for _ in range(3):  # a few blobs, some cut by the array's edge
            centre = rng.integers(0, shape)
            radius = rng.integers(3, 9)
            grid = np.ogrid[tuple(slice(0, n) for n in shape)]
            mask |= sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        masks.append(mask)
    matrix = np.diag([0.7, 0.9, 2.5, 1.0])
    spacing = np.array([0.7, 0.9, 2.5])
    forward = directed_surface_distances(masks[0], masks[1], spacing)
    backward = directed_surface_distances(masks[1], masks[0], spacing)
    result = hausdorff(masks[0], masks[1], matrix)
    assert result["hd_mm"] == pytest.approx(max(forward.max(), backward.max()))
    assert result["hd95_mm"] == pytest.approx(max(np.percentile(forward, 95), np.percentile(backward, 95)))

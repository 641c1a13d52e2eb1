"""Tests that catch the deliberate bugs of issue 11 section 2 (each was made and watched failing).

Contracts, not a function against itself: metrics against an independent k-d-tree implementation,
finetuning against what it reports and what its card says, boxes and stop rules on asymmetric inputs.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from polycl.io.base import Volume
from polycl.metrics import hausdorff

TINY_ARGS = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(single_torch_thread):
    """Tiny networks: one torch thread (shared 2-core machine)."""


# ------------------------------------------------------------------------ metrics (bugs 2 and 3)
def reference_directed(source: np.ndarray, target: np.ndarray, spacing) -> np.ndarray:
    """Directed surface distances by brute force: surface = mask voxels with a 6-neighbour outside the
    mask, where outside the array counts as outside (a mask touching the border has a surface there)."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(3, 1))
        return np.argwhere(padded & ~inner) - 1

    a, b = surface_points(source) * spacing, surface_points(target) * spacing
    return cKDTree(b).query(a)[0]


def test_hd95_is_the_larger_directed_95th_percentile_not_the_pooled_one():
    """Bug 2: HD95 from pooled distances.  One mask has a thin spike: >5% of its own surface is far from
    the other mask, but <5% of both surfaces together, so pooled and directed HD95 differ by millimetres."""
    a = np.zeros((40, 40, 60), bool)
    a[10:30, 10:30, 10:30] = True
    b = a.copy()
    b[18:22, 18:22, 30:50] = True  # a 4x4 spike 20 voxels long: ~7% of b's surface, ~4% of both
    spacing = np.array([0.8, 0.8, 2.0])
    forward, backward = reference_directed(b, a, spacing), reference_directed(a, b, spacing)
    directed = max(np.percentile(forward, 95), np.percentile(backward, 95))
    pooled = np.percentile(np.concatenate([forward, backward]), 95)
    assert directed - pooled > 2.0, "the fixture must tell the two definitions apart"
    result = hausdorff(b, a, np.diag([*spacing, 1.0]))
    assert result["hd95_mm"] == pytest.approx(directed, abs=1e-6)
    assert result["hd_mm"] == pytest.approx(max(forward.max(), backward.max()), abs=1e-6)


def test_surface_at_the_volume_border_counts():
    """Bug 3: surface extraction treating the border as foreground drops the faces on the border."""
    a = np.zeros((30, 20, 20), bool)
    a[0:10, 5:15, 5:15] = True  # its face i = 0 lies on the volume border
    b = np.zeros_like(a)
    b[1:10, 5:15, 5:15] = True  # the same block one voxel shorter: every surface point within 1 mm
    spacing = np.array([1.0, 1.0, 1.0])
    forward, backward = reference_directed(a, b, spacing), reference_directed(b, a, spacing)
    result = hausdorff(a, b, np.eye(4))
    assert max(forward.max(), backward.max()) == pytest.approx(1.0)
    assert result["hd_mm"] == pytest.approx(max(forward.max(), backward.max()))
    assert result["hd95_mm"] == pytest.approx(max(np.percentile(forward, 95), np.percentile(backward, 95)))


# ----------------------------------------------------------------- largest component (bug 4)
def test_largest_component_is_26_connected():
    """Two cubes touching only at a corner are one 26-connected component: both are kept."""
    from polycl.masks import keep_largest_component

    mask = np.zeros((20, 20, 20), bool)
    mask[2:7, 2:7, 2:7] = True  # 125 voxels
    mask[7:11, 7:11, 7:11] = True  # 64 voxels, touching (6, 6, 6) only diagonally
    mask[15:18, 15:18, 15:18] = True  # 27 voxels, separate
    kept = keep_largest_component(mask)
    assert kept.sum() == 125 + 64 and not kept[16, 16, 16]


# --------------------------------------------------------------------- finetuning (bugs 1, 6, 7)
def tiny_pairs(count: int = 4, size: int = 32, slices: int = 4):
    rng = np.random.default_rng(0)
    pairs = []
    for n in range(count):
        ct = rng.normal(-300, 150, (size, size, slices)).astype(np.float32)
        mask = np.zeros((size, size, slices), np.uint8)
        mask[6 + n:20 + n, 8:24 - n] = 1
        ct[mask > 0] = rng.normal(60, 20, int(mask.sum()))
        matrix = np.diag([1.5, 1.5, 3.0, 1.0])
        pairs.append((Volume(ct, matrix, f"scan{n}"), Volume(mask, matrix, f"label{n}")))
    return pairs


def test_training_window_is_the_window_in_the_card(tmp_path):
    """Bug 1: finetuning windows with other values than the card records (inference uses the card's)."""
    from polycl.geometry import CanonicalOrientation
    from polycl.training.config import FinetuneConfig
    from polycl.training.finetuning import finetune
    from polycl.training.slices import slices_from_pairs

    pairs = tiny_pairs(2)
    result = finetune(pairs, tmp_path / "m.safetensors", FinetuneConfig(
        architecture_args=TINY_ARGS, input_size=32, epochs=1, batch_size=4, val_fraction=0, device="cpu"))
    center, width = result.card["window"]["center"], result.card["window"]["width"]
    images = slices_from_pairs(pairs, 32).images[:, 0].numpy()
    ct, _ = pairs[0]
    canonical = CanonicalOrientation.from_matrix(ct.ijk_to_ras).to_canonical(ct.array)
    expected = np.clip((canonical - (center - width / 2)) / width, 0, 1)
    np.testing.assert_allclose(images[: len(canonical)], expected, atol=1e-6)


def test_finetune_saves_the_best_epoch_not_the_last(tmp_path):
    """Bug 6: the saved weights must be the epoch with the lowest validation loss."""
    from polycl.nets.checkpoints import load_checkpoint
    from polycl.training.config import FinetuneConfig
    from polycl.training.finetuning import _subset, evaluate_slices, finetune, split_scans
    from polycl.training.slices import slices_from_pairs

    config = FinetuneConfig(architecture_args=TINY_ARGS, input_size=32, epochs=5, batch_size=4, lr=0.1,
                            val_fraction=0.5, augment=False, seed=3, device="cpu")
    _, val_scans = split_scans(4, config.val_fraction, config.seed)
    pairs, reports = tiny_pairs(4), []
    for n in val_scans:  # validation labels mark the background: the better the fit, the worse on them
        ct, label = pairs[n]
        pairs[n] = (ct, Volume((1 - label.array).astype(np.uint8), label.ijk_to_ras, label.source))
    result = finetune(pairs, tmp_path / "m.safetensors", config, progress=reports.append)
    losses = [r.metrics["val_loss"] for r in reports]
    best = int(np.argmin(losses))
    assert best != len(losses) - 1, f"the run must not end on its best epoch: {losses}"
    model, card = load_checkpoint(tmp_path / "m.safetensors")
    val = _subset(slices_from_pairs(pairs, 32), val_scans, torch.device("cpu"))
    with torch.no_grad():
        saved = evaluate_slices(model, val, 4)["val_loss"]
    assert saved == pytest.approx(losses[best], abs=1e-4)
    assert card["metrics"]["best_epoch"] == reports[best].epoch == result.best_epoch


def test_cancel_after_finished_epochs_leaves_the_existing_checkpoint(tmp_path):
    """Bug 7: a cancel after a finished epoch must not write the best-so-far over the existing output."""
    from polycl.progress import Cancelled
    from polycl.training.config import FinetuneConfig
    from polycl.training.finetuning import finetune

    output = tmp_path / "m.safetensors"
    output.write_bytes(b"the user's model")
    cancel, epochs = threading.Event(), []

    def progress(report):
        epochs.append(report.epoch)
        if len(epochs) == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        finetune(tiny_pairs(2), output, FinetuneConfig(architecture_args=TINY_ARGS, input_size=32, epochs=50,
                                                        batch_size=4, val_fraction=0, device="cpu"),
                 progress=progress, cancel=cancel, overwrite=True)
    assert len(epochs) == 2
    assert output.read_bytes() == b"the user's model" and sorted(p.name for p in tmp_path.iterdir()) == [output.name]


# --------------------------------------------------------------------------- boxes (bug 10)
@pytest.mark.parametrize("largest_only", [False, True])
def test_boxes_are_x_columns_y_rows_on_an_asymmetric_mask(largest_only):
    """Bug 10: rows and columns swapped.  A wide, short rectangle off the diagonal tells them apart."""
    from polycl.sam.refine import component_boxes

    mask = np.zeros((50, 80), bool)
    mask[5:10, 20:60] = True  # rows 5..9, columns 20..59
    mask[30:33, 2:5] = True  # a small second component
    boxes, _ = component_boxes(mask, margin=2, min_area=5, largest_only=largest_only)
    assert tuple(boxes[0]) == (18, 3, 61, 11)


# ----------------------------------------------------------------------- stop rules (bug 11)
@pytest.mark.parametrize("shift", [-30.0, 30.0], ids=["darker", "brighter"])
def test_median_hu_drift_stops_in_both_directions(shift):
    """Bug 11: a one-sided drift rule lets a region darker (or brighter) than the seed run on."""
    from polycl.sam.propagation import StopRules, _SliceJudge

    rng = np.random.default_rng(0)
    ct = np.zeros((3, 40, 40), np.float32)
    seed_mask = np.zeros((40, 40), bool)
    seed_mask[10:30, 10:30] = True
    ct[1][seed_mask] = rng.uniform(0, 200, int(seed_mask.sum()))  # median ~100, 5-95 %: 10..190 HU
    rules = StopRules(min_containment=0, max_median_shift_hu=20.0)
    judge = _SliceJudge(rules, ct, 1, seed_mask, 1.0, None)
    ct[2][seed_mask] = rng.normal(judge.median + shift, 3, int(seed_mask.sum()))  # inside the HU range
    assert judge(2, seed_mask, None, seed_mask) == "intensity"
    ct[2][seed_mask] = rng.normal(judge.median + shift / 3, 3, int(seed_mask.sum()))  # a 10 HU drift is fine
    assert judge(2, seed_mask, None, seed_mask) is None


# ------------------------------------------------------------------ pretraining (bugs 8 and 9)
def test_polycl_m_reference_fallback_negatives_come_from_the_same_scan():
    """Bug 8: with negatives preferred from other scans ("reference"), an anchor whose opposite presence
    class exists only in its own scan falls back to that scan; the fallback must not go elsewhere."""
    from polycl.training.pretraining import PolyCLMSampler, SliceIndex

    index = SliceIndex.from_arrays([0] * 6 + [1] * 4, [0, 0, 0, 1, 1, 1] + [1, 1, 1, 1])
    sampler = PolyCLMSampler(index, anchor_fraction=None, seed=1, negative_source="reference")
    for epoch in (1, 2, 3):
        draw = sampler.draw(epoch)
        a, _, n = draw.items.T
        needs_fallback = (index.scan[a] == 0) & (index.presence[a] == 1)  # no organ-free slice elsewhere
        assert needs_fallback.sum() == 3 and draw.fallbacks == 3
        assert np.all(index.scan[n][needs_fallback] == 0) and np.all(index.presence[n][needs_fallback] == 0)
        assert np.all(index.scan[n][~needs_fallback] != index.scan[a][~needs_fallback])


def test_pretraining_uses_temperature_one_over_the_minibatch_size(tmp_path, monkeypatch):
    """Bug 9: the trainer must pass tau = 1/M (M = configured minibatch size), not a fixed value."""
    from test_pretraining import synthetic_index

    from polycl.training.pretraining import PretrainConfig, pretrain
    from polycl.training.pretraining import trainer as trainer_module

    seen, original = [], trainer_module.polycl_triplet_loss

    def recording(anchor, positive, negative, tau=None):
        seen.append((anchor.shape[0], tau))
        return original(anchor, positive, negative, tau)

    monkeypatch.setattr(trainer_module, "polycl_triplet_loss", recording)
    for batch_size in (6, 9):
        seen.clear()
        config = PretrainConfig(method="polycl-s", input_size=32, epochs=1, batch_size=batch_size,
                                anchor_fraction=None, architecture_args={"dropout": 0.0}, device="cpu")
        result = pretrain(synthetic_index(32), tmp_path / f"enc{batch_size}.ckpt", config)
        assert seen and all(tau == pytest.approx(1 / batch_size) for _, tau in seen), seen
        assert result.card["recipe"]["tau"] == pytest.approx(1 / batch_size)

"""Issue 12's optimised paths keep the reference results: segmentation without a float probability map,
largest component by ITK in the mask's bounding box, one-warp-per-batch augmentation, one host sync per
epoch, bf16 autocast only where the device policy chooses it, and a plain segment's lazy imports."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from polycl.devices import cpu_supports_bf16
from polycl.inference import Segmenter
from polycl.masks import keep_largest_component
from polycl.training.augment import warp_batch
from polycl.training.finetuning import training_precision
from polycl.training.loop import run_epoch

ROOT = Path(__file__).resolve().parents[1]


def scipy_largest_component(mask: np.ndarray) -> np.ndarray:
    """The reference: scipy 26-connected labelling of the whole volume, first largest label kept."""
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@pytest.mark.parametrize("seed", range(3))
def test_largest_component_matches_scipy_reference(seed):
    """Random blobs (diagonal contacts, equal-size ties, components at the faces, one component), 3D and 2D."""
    rng = np.random.default_rng(seed)
    volume = ndimage.binary_opening(rng.random((40, 36, 12)) > 0.55 - 0.05 * seed)
    volume[0, 0, 0] = volume[-1, -1, -1] = True
    tie = np.zeros((12, 12, 12), bool)
    tie[1:4, 1:4, 1:4] = tie[7:10, 7:10, 7:10] = True  # two 27-voxel cubes: the first in raster order wins
    plane = rng.random((50, 40)) > 0.6
    one = np.pad(np.ones((3, 4, 5), bool), 2)  # one component already: given back as it is
    for mask in (volume, tie, plane, one, np.zeros((5, 5, 5), bool)):
        # any memory layout (a canonical view of a read CT is F-ordered or flipped) and a non-bool mask
        for layout in (mask, np.asfortranarray(mask), mask[::-1], mask.astype(np.uint8) * 3):
            kept = keep_largest_component(layout)
            assert kept.dtype == bool and kept.shape == mask.shape
            single = layout.dtype == bool and (kept == layout).all() and layout.any()  # one component already
            assert np.shares_memory(kept, layout) == bool(single)  # else a new array: the input is never written
            np.testing.assert_array_equal(kept, scipy_largest_component(layout != 0))


def test_segment_without_probability_gives_the_reference_mask_on_real_ct(labeled_case, single_torch_thread):
    """Starter model on a 512x512 CT: the uint8 mask thresholded batch by batch (no float map kept) equals the
    reference path (full probability map > 0.5, scipy's largest component), with and without that step."""
    ct, _ = labeled_case("totalseg_dcm")
    segmenter = Segmenter.from_checkpoint(None, "cpu", precision="fp32")
    reference = segmenter.segment(ct.array, ct.ijk_to_ras, largest_component=False, probability=True)
    assert reference.probability.dtype == np.float32 and reference.probability.shape == ct.array.shape
    binary = reference.probability > 0.5
    assert binary.sum() > 10000  # real liver voxels, so the comparison means something
    np.testing.assert_array_equal(reference.mask, binary)
    for largest in (False, True):
        fast = segmenter.segment(ct.array, ct.ijk_to_ras, largest_component=largest)
        assert fast.probability is None and fast.mask.dtype == np.uint8
        # laid out as the CT (a read volume is k-major): writing it back is a straight copy, not a transpose
        assert np.argsort(fast.mask.strides).tolist() == np.argsort(ct.array.strides).tolist()
        np.testing.assert_array_equal(fast.mask, scipy_largest_component(binary) if largest else binary)


@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_instance_norm_equals_torchs_kernel_forward_and_backward(affine):
    """polycl's InstanceNorm2d (one GroupNorm group per channel) is nn.InstanceNorm2d up to float rounding,
    gradients included, with the same state_dict keys (the authors' checkpoints keep loading)."""
    from polycl.nets.unet import InstanceNorm2d

    torch.manual_seed(0)
    fast, reference = InstanceNorm2d(8, affine=affine), torch.nn.InstanceNorm2d(8, affine=affine)
    if affine:
        with torch.no_grad():
            fast.weight.uniform_(0.5, 2.0)
            fast.bias.uniform_(-1.0, 1.0)
        reference.load_state_dict(fast.state_dict())
    assert fast.state_dict().keys() == reference.state_dict().keys()
    x = (torch.randn(3, 8, 17, 23) * 5 + 3).requires_grad_()
    out_fast, out_reference = fast(x), reference(x)
    torch.testing.assert_close(out_fast, out_reference, atol=1e-5, rtol=0)
    grad = torch.randn_like(out_fast)
    torch.testing.assert_close(torch.autograd.grad(out_fast, x, grad)[0],
                               torch.autograd.grad(out_reference, x, grad)[0], atol=1e-5, rtol=0)


def test_group_norm_instance_norm_gives_torchs_masks_on_real_ct(labeled_case, single_torch_thread, monkeypatch):
    """The starter model on a 512x512 CT: the same mask voxel for voxel as with torch's instance_norm (both in the
    contiguous NCHW layout: in NHWC the two kernels round differently, 13 of 5.2 M voxels flip)."""
    from polycl.nets.unet import InstanceNorm2d

    ct, _ = labeled_case("totalseg_dcm")
    segmenter = Segmenter.from_checkpoint(None, "cpu", precision="fp32", channels_last=False)
    fast = segmenter.segment(ct.array, ct.ijk_to_ras, largest_component=False, probability=True)
    monkeypatch.setattr(InstanceNorm2d, "forward", torch.nn.InstanceNorm2d.forward)
    reference = segmenter.segment(ct.array, ct.ijk_to_ras, largest_component=False, probability=True)
    assert reference.mask.sum() > 10000
    np.testing.assert_array_equal(fast.mask, reference.mask)
    np.testing.assert_allclose(fast.probability, reference.probability, atol=1e-4)


def test_batched_warp_keeps_the_per_sample_contract():
    """Identity warp is the identity; masks stay binary and aligned with the image; one warp of a batch equals
    warping each sample alone; image channels (2.5D) move together."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 40, 48, generator=generator)
    masks = (torch.rand(5, 1, 40, 48, generator=generator) > 0.5).float()
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).repeat(5, 1, 1)
    same_images, same_masks = warp_batch(images, masks, identity)
    torch.testing.assert_close(same_images, images, atol=1e-5, rtol=0)
    assert torch.equal(same_masks, masks)

    angle, scale = torch.linspace(-0.26, 0.26, 5), torch.linspace(0.85, 1.15, 5)
    theta = torch.zeros(5, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = torch.linspace(-0.08, 0.08, 5)[:, None]
    warped_images, warped_masks = warp_batch(images, masks, theta)
    assert set(warped_masks.unique().tolist()) <= {0.0, 1.0} and warped_masks.dtype == masks.dtype
    for index in range(5):
        alone = warp_batch(images[index:index + 1], masks[index:index + 1], theta[index:index + 1])
        torch.testing.assert_close(alone[0], warped_images[index:index + 1])
        assert torch.equal(alone[1], warped_masks[index:index + 1])
    # aligned: an image channel equal to the mask warps onto the warped mask
    aligned_image, aligned_mask = warp_batch(masks.repeat(1, 3, 1, 1), masks, theta)
    for channel in range(3):
        assert torch.equal(aligned_image[:, channel:channel + 1] > 0.5, aligned_mask > 0.5)


def tiny_training(losses_seen: list[float], bad_batch: int | None = None):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)) for _ in range(5)]

    def loss_fn(net, batch):
        loss = ((net(batch[0]) - batch[1]) ** 2).mean()
        if len(losses_seen) == bad_batch:
            loss = loss * math.inf
        losses_seen.append(loss.item())
        return loss

    return model, batches, loss_fn, optimizer


def test_epoch_loss_is_the_mean_of_the_step_losses():
    seen: list[float] = []
    model, batches, loss_fn, optimizer = tiny_training(seen)
    reported: list[float] = []
    loss = run_epoch(model, batches, loss_fn, optimizer, on_batch=lambda i, n, value: reported.append(value))
    assert len(seen) == 5 and len(set(seen)) == 5
    assert loss == pytest.approx(float(np.mean(seen)), rel=1e-12)
    assert reported == pytest.approx(seen, rel=1e-7)  # per-batch progress still gets each step's loss
    without_progress: list[float] = []
    model, batches, loss_fn, optimizer = tiny_training(without_progress)
    assert run_epoch(model, batches, loss_fn, optimizer) == pytest.approx(float(np.mean(without_progress)),
                                                                          rel=1e-12)


def test_non_finite_loss_names_its_first_batch():
    model, batches, loss_fn, optimizer = tiny_training([], bad_batch=2)
    with pytest.raises(FloatingPointError, match="inf at batch 2; lower the learning rate"):
        run_epoch(model, batches, loss_fn, optimizer)


def test_training_precision_follows_the_device_policy():
    """bf16 autocast only where oneDNN runs bf16 natively; fp16 (would need loss scaling) trains in fp32."""
    cpu = torch.device("cpu")
    assert training_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert training_precision("fp32", cpu) == "fp32" and training_precision("fp16", cpu) == "fp32"
    assert training_precision("bf16", cpu) == "bf16"


def test_plain_segment_does_not_import_scipy_or_the_sam_stack(tmp_path, labeled_case):
    """Start-up cost: `polycl segment` without --refine / --reference / --overlay / DICOM output loads none of
    scipy.ndimage, segment_anything, sam2, matplotlib, highdicom (nibabel, for NIfTI header checks, brings
    the bare scipy package only)."""
    ct, _ = labeled_case("dcmqi_3slice")
    source = Path(ct.source)
    code = ("import sys; from polycl.cli import main; "
            f"code = main(['segment', {str(source)!r}, '-o', {str(tmp_path / 'mask.nii.gz')!r}, '--device', 'cpu']); "
            "heavy = ('scipy.ndimage', 'segment_anything', 'sam2', 'matplotlib', 'highdicom'); "
            "print(sorted(h for h in heavy if h in sys.modules)); sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "PolyCLSlicer"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "mask.nii.gz").exists()

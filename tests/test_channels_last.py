"""The shipped CPU inference path: the network channels-last (NHWC, oneDNN's own layout) and bf16 autocast where
the CPU has it (issue 25) give the plain fp32 contiguous outputs, on every backbone and on real CT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from polycl.inference import Segmenter
from polycl.metrics import dice
from polycl.nets.checkpoints import default_card
from polycl.nets.registry import build_model

BACKBONES = {
    "polycl_unet": ({"channels": (4, 8, 16, 32, 64), "dropout": 0.0}, 1),
    "resunet": ({"channels": (8, 8, 16, 32, 64), "dropout": 0.0}, 1),
    "transunet": ({"stem_width": 8, "stage_blocks": (1, 1, 1), "hidden": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
                   "img_size": 64, "decoder_channels": (16, 8, 8, 4), "dropout": 0.0}, 1),
    "polycl_unet25d": ({"context_slices": 3, "channels": (4, 8, 16, 32, 64), "dropout": 0.0}, 3),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_channels_last_network_gives_the_contiguous_networks_output(name, single_torch_thread):
    args, channels = BACKBONES[name]
    torch.manual_seed(0)
    model = build_model(name, **args).eval()
    reference = copy.deepcopy(model)
    segmenter = Segmenter(model, default_card(name, args, 64), device="cpu", precision="fp32")
    weights = [p for p in segmenter.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)

    batch = torch.rand(3, channels, 80, 72) * 2 - 0.5
    network_input = segmenter.to_network(batch, None)
    assert network_input.shape == (3, channels, 64, 64)
    assert network_input.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = reference(network_input.contiguous())
        got = segmenter.model(network_input)
    torch.testing.assert_close(got.contiguous(), expected, rtol=1e-4, atol=1e-4)


def test_segment_mask_is_unchanged_by_the_layout(single_torch_thread):
    """The whole segment path (window, resize, network, back to the grid) with and without the NHWC layout."""
    args, _ = BACKBONES["polycl_unet"]
    torch.manual_seed(1)
    model = build_model("polycl_unet", **args).eval()
    card = default_card("polycl_unet", args, 64)
    volume = np.random.default_rng(0).uniform(-1000, 300, (50, 44, 6)).astype(np.float32)
    matrix = np.diag([0.8, 0.9, 2.5, 1.0])
    fast = Segmenter(copy.deepcopy(model), card, device="cpu", precision="fp32")
    plain = Segmenter(copy.deepcopy(model), card, device="cpu", precision="fp32", channels_last=False)
    got = fast.segment(volume, matrix, probability=True, largest_component=False, check_liver=False).probability
    expected = plain.segment(volume, matrix, probability=True, largest_component=False,
                             check_liver=False).probability
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("case", ["totalseg_dcm", "dcmqi_3slice"])
def test_shipped_starter_path_is_within_0_002_dice_of_plain_fp32(labeled_case, case, single_torch_thread):
    """The starter as shipped on this CPU (bf16 autocast where oneDNN has native bf16, channels-last) against
    fp32 in the contiguous layout, on real CT: issue 25 allows a Dice change of 0.002 at most."""
    ct, reference = labeled_case(case)
    shipped = Segmenter.from_checkpoint(None, "cpu")
    plain = Segmenter.from_checkpoint(None, "cpu", precision="fp32", channels_last=False)
    masks = {name: segmenter.segment(ct.array, ct.ijk_to_ras).mask for name, segmenter in
             (("shipped", shipped), ("plain", plain))}
    scores = {name: dice(mask, reference.array) for name, mask in masks.items()}
    assert scores["plain"] > 0.9, scores  # a real liver came out
    assert abs(scores["shipped"] - scores["plain"]) <= 0.002, scores
    assert dice(masks["shipped"], masks["plain"]) >= 0.99

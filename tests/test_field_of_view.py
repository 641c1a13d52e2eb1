"""A fixed physical field of view (model card ``field_of_view_mm``): the liver has the same size in network
pixels whatever the scan's pixel spacing and reconstruction field of view; the mask lands back where the
liver is, on flipped, permuted and anisotropic volumes; cards and configs carry and check the setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_context25d import REINDEXINGS, canonical_matrix, reoriented
from torch import nn

from polycl.field_of_view import FieldOfView, check_field_of_view
from polycl.geometry import CanonicalOrientation
from polycl.inference import Segmenter
from polycl.io.base import Volume
from polycl.nets.checkpoints import CheckpointError, default_card, load_checkpoint, save_checkpoint, save_model
from polycl.nets.registry import build_model
from polycl.training.config import FinetuneConfig
from polycl.training.finetuning import finetune, resolve_config
from polycl.training.slices import slices_from_pairs

SMALL = {"channels": (4, 8, 16, 32, 64), "dropout": 0.0}
LIVER_RADIUS_MM = 60.0


def phantom(shape: tuple[int, int], spacing: tuple[float, float], body_offset_mm=(25.0, -30.0), slices: int = 3
            ) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (slices, H, W) HU volume and liver mask: a 300 x 220 mm body (0 HU) off the scan centre by
    ``body_offset_mm`` (row, column), a 60 mm radius liver (150 HU) 70 mm to the patient's right of the
    body centre, air outside; (row, column) pixel ``spacing`` in mm."""
    rows = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0] - body_offset_mm[0]
    cols = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1] - body_offset_mm[1]
    r, c = np.meshgrid(rows, cols, indexing="ij")
    body = (r / 110) ** 2 + (c / 150) ** 2 < 1
    liver = (r**2 + (c + 70) ** 2) < LIVER_RADIUS_MM**2  # canonical columns run right -> left
    ct = np.where(liver, 150, np.where(body, 0, -1000)).astype(np.int16)
    return np.repeat(ct[None], slices, 0), np.repeat(liver[None], slices, 0)


class BrightModel(nn.Module):
    """A fixed 'network': liver where the windowed input is above 0.6 (80 HU); counts the liver pixels it sees."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0))
        self.seen: list[float] = []
        self.extent: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x > 0.6
        self.seen.append(float(bright.float().sum() / len(x)))
        self.extent = tuple(int(bright[0, 0].any(axis).sum()) for axis in (1, 0))  # (rows, columns) of liver
        return self.scale * (x - 0.6)


def segment_phantom(field_of_view_mm, shape, spacing, permutation=(0, 1, 2), flips=(False, False, False)):
    canonical, liver = phantom(shape, spacing)
    array, matrix = reoriented(canonical, canonical_matrix((2.5, *spacing)), permutation, flips)
    card = default_card("polycl_unet", {}, 64)
    if field_of_view_mm:
        card["field_of_view_mm"] = field_of_view_mm
    model = BrightModel()
    mask = Segmenter(model, card, device="cpu", precision="fp32").segment(array, matrix, largest_component=False).mask
    reindex = CanonicalOrientation(tuple(permutation), tuple(flips))
    predicted = reindex.from_canonical(mask) > 0
    dice = 2 * (predicted & liver).sum() / (predicted.sum() + liver.sum())
    return float(np.mean(model.seen)), float(dice), model.extent


SCANS = [((512, 512), (0.6, 0.6)), ((512, 512), (1.0, 1.0)), ((280, 400), (1.2, 0.8)), ((101, 122), (3.0, 3.0))]


def test_the_liver_has_the_same_size_in_network_pixels_whatever_the_scans_field_of_view():
    results = [segment_phantom(400.0, shape, spacing) for shape, spacing in SCANS]
    expected = np.pi * LIVER_RADIUS_MM**2 / (400.0 / 64) ** 2  # disc area in 6.25 mm network pixels
    np.testing.assert_allclose([seen for seen, _, _ in results], expected, rtol=0.06)
    for _, _, extent in results:  # a round liver stays round (row and column spacing not swapped)
        np.testing.assert_allclose(extent, 2 * LIVER_RADIUS_MM / 6.25, atol=1.5)
    whole_slice = [segment_phantom(None, shape, spacing)[0] for shape, spacing in SCANS[:2]]
    assert whole_slice[0] > 2.5 * whole_slice[1]  # the papers' resize: 307 vs 512 mm scans differ ~2.8x


@pytest.mark.parametrize("permutation, flips", REINDEXINGS)
@pytest.mark.parametrize("shape, spacing", SCANS[1:3])
def test_the_mask_lands_on_the_liver_on_flipped_permuted_and_anisotropic_scans(permutation, flips, shape, spacing):
    assert segment_phantom(400.0, shape, spacing, permutation, flips)[1] > 0.95


def test_nothing_is_labelled_outside_the_square_and_a_cut_body_is_warned():
    canonical, _ = phantom((512, 512), (1.0, 1.0))
    canonical[:] = 150  # "liver" everywhere: the whole 512 mm scan is body
    canonical[:, 0, 0] = -1000  # (a constant volume is refused as empty)
    card = {**default_card("polycl_unet", {}, 64), "field_of_view_mm": 200.0}
    segmenter = Segmenter(BrightModel(), card, device="cpu", precision="fp32")
    with pytest.warns(UserWarning, match="outside the model's 200 mm field of view"):
        result = segmenter.segment(canonical, canonical_matrix((2.5, 1.0, 1.0)), largest_component=False,
                                   probability=True)
    assert 0.9 * 200**2 < result.mask[1].sum() < 1.1 * 200**2  # the 200 x 200 mm square, not the scan
    assert result.probability[1, :100].max() == 0.0  # 0 outside the square, not sigmoid(0) = 0.5
    with pytest.raises(ValueError, match="field of view"):
        segmenter.predict_slices(canonical)


@pytest.mark.parametrize("bad", [5, 2000.0, "400", True, float("nan")])
def test_a_card_with_an_invalid_field_of_view_is_refused(tmp_path, bad):
    model = build_model("polycl_unet", **SMALL)
    card = {**default_card("polycl_unet", SMALL, 32), "field_of_view_mm": bad}
    with pytest.raises(CheckpointError, match="field_of_view_mm"):
        save_checkpoint(tmp_path / "bad.safetensors", model.state_dict(), card)
    with pytest.raises(ValueError):
        check_field_of_view(bad)


def test_training_slices_use_the_field_of_view():
    canonical, liver = phantom((512, 512), (1.0, 1.0))
    matrix = canonical_matrix((2.5, 1.0, 1.0))
    pair = (Volume(canonical, matrix, "ct"), Volume(liver.astype(np.uint8), matrix))
    whole = slices_from_pairs([pair], 64).masks.sum() / 3
    square = slices_from_pairs([pair], 64, field_of_view_mm=400.0).masks.sum() / 3
    np.testing.assert_allclose(float(square), np.pi * LIVER_RADIUS_MM**2 / 6.25**2, rtol=0.06)
    assert square > 1.4 * whole  # 512 mm resized vs 400 mm: (512 / 400)^2 = 1.64x


def test_finetune_records_and_inherits_the_field_of_view(tmp_path):
    canonical, liver = phantom((96, 96), (3.0, 3.0), slices=4)
    matrix = canonical_matrix((2.5, 3.0, 3.0))
    pairs = [(Volume(canonical, matrix, "ct"), Volume(liver.astype(np.uint8), matrix))]
    base = FinetuneConfig(architecture_args=SMALL, input_size=32, epochs=1, batch_size=4, val_fraction=0.0,
                          augment=False, device="cpu")
    first = finetune(pairs, tmp_path / "a.safetensors", FinetuneConfig(**{**base.__dict__, "field_of_view_mm": 350}))
    assert first.card["field_of_view_mm"] == 350.0
    assert load_checkpoint(first.path)[1]["field_of_view_mm"] == 350.0
    assert resolve_config(base, first.path)[0].field_of_view_mm == 350.0  # None: the init's
    plain = FinetuneConfig(**{**base.__dict__, "field_of_view_mm": 0})
    assert resolve_config(plain, first.path)[0].field_of_view_mm == 0.0  # 0: whole slice, kept through a 2nd pass
    assert resolve_config(resolve_config(plain, first.path)[0], first.path)[0].field_of_view_mm == 0.0
    second = finetune(pairs, tmp_path / "b.safetensors", base, init=first.path)
    assert second.card["field_of_view_mm"] == 350.0
    save_model(tmp_path / "c.safetensors", build_model("polycl_unet", **SMALL), default_card("polycl_unet", SMALL, 32))
    assert "field_of_view_mm" not in load_checkpoint(tmp_path / "c.safetensors")[1]  # papers' checkpoints unchanged
    view = FieldOfView.of_volume(canonical, matrix, CanonicalOrientation.from_matrix(matrix), 350.0)
    assert view.body_outside(canonical) == 0.0


def test_cli_finetune_field_of_view_and_card_summaries(tmp_path, capsys):
    from PolyCLSlicerLib import core  # the Slicer panel's card summary (read without torch)

    from polycl.cli.main import main
    from polycl.io.volumes import write_volume

    canonical, liver = phantom((96, 96), (3.0, 3.0), slices=4)
    matrix = canonical_matrix((2.5, 3.0, 3.0))
    write_volume(tmp_path / "case_ct.nii.gz", canonical, matrix)
    write_volume(tmp_path / "case_liver.nii.gz", liver.astype(np.uint8), matrix)
    common = ["finetune", "--images", str(tmp_path / "case_ct.nii.gz"), "--labels", str(tmp_path / "case_liver.nii.gz"),
              "--size", "32", "--epochs", "1", "--val-fraction", "0", "--dropout", "0"]
    assert main([*common, "-o", str(tmp_path / "bad.safetensors"), "--field-of-view", "20"]) == 2
    assert "--field-of-view must be a number of millimetres in 100-1000" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "m.safetensors"), "--field-of-view", "350"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    assert "a 350 mm square around the body at 32 px (10.94 mm per pixel" in capsys.readouterr().out
    assert "field of view: 350 mm" in core.describe_card(core.read_card_header(tmp_path / "m.safetensors"))


class Echo(nn.Module):
    """Logits that are the network input itself (steep): elementwise ops, which autocast leaves in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 40.0


def test_the_sampling_grid_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast ``affine_grid``'s matmul gives a bf16 grid (coordinates off by up to ~1.5 mm at a
    400 mm square's edge): the field-of-view warps run outside autocast, so bf16 changes nothing but the network."""
    canonical, _ = phantom((300, 280), (0.8, 0.9))
    ramp = np.linspace(-150, 250, canonical.shape[2], dtype=np.float32)  # a smooth ramp shows any resampling shift
    canonical = np.where(canonical > -500, ramp[None, None, :], canonical).astype(np.float32)
    card = {**default_card("polycl_unet", {}, 192), "field_of_view_mm": 400.0}
    matrix = canonical_matrix((2.5, 0.8, 0.9))
    results = {}
    for precision in ("fp32", "bf16"):
        segmenter = Segmenter(Echo(), card, device="cpu", precision=precision)
        if segmenter.precision != precision:
            pytest.skip(f"{precision} is not used on this CPU")
        results[precision] = segmenter.segment(canonical, matrix, largest_component=False, probability=True,
                                               check_liver=False).probability
    np.testing.assert_allclose(results["bf16"], results["fp32"], atol=1e-5)

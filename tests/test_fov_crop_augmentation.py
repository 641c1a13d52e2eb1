"""The small-field-of-view crop augmentation (issue 20): air and no label outside a disc or square of a
physical diameter in the network frame, centred on the body; p=0 changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from polycl.training.augment import augment_batch, field_of_view_crop


def body_batch(count: int = 6, size: int = 128, value: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices that are body everywhere (window value 0.5) with a label everywhere."""
    return torch.full((count, 1, size, size), value), torch.ones(count, 1, size, size)


@pytest.mark.parametrize(("size", "field_of_view_mm", "diameter_px"),
                         [(128, 400.0, 64), (128, 800.0, 32), (64, 400.0, 32)])
@pytest.mark.parametrize("square", [False, True])
def test_outside_is_air_and_the_label_is_cut_alike_at_the_physical_size(size, field_of_view_mm, diameter_px, square):
    images, masks = body_batch(size=size)
    out, cut, _ = field_of_view_crop(images, masks, torch.Generator().manual_seed(0), 1.0, field_of_view_mm,
                                     diameter_mm=(200.0, 200.0), square_fraction=float(square))
    kept = out[:, 0] > 0
    assert torch.equal(out[:, 0][~kept], torch.zeros(int((~kept).sum())))  # air: what -1024 HU windows to
    assert torch.equal(out[:, 0][kept], torch.full((int(kept.sum()),), 0.5))  # inside: untouched
    assert torch.equal(cut[:, 0] > 0, kept)  # the label is cut exactly where the image is
    def area(diameter: float) -> float:  # 200 mm at field_of_view / size mm per pixel, ± 1 px of discretisation
        return diameter ** 2 if square else math.pi * diameter ** 2 / 4

    for sample in kept:
        rows, cols = torch.nonzero(sample, as_tuple=True)
        touches_edge = rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1 or cols.max() == size - 1
        if not touches_edge:  # a crop centred near the edge leaves the frame: only check whole ones
            assert area(diameter_px - 1) <= int(sample.sum()) <= area(diameter_px + 1)
            assert abs(int(cols.max() - cols.min() + 1) - diameter_px) <= 1


def test_probability_zero_is_the_identity():
    images, masks = body_batch()
    images[:, :, :40] = 0.0  # some air
    out, cut, centre = field_of_view_crop(images, masks, torch.Generator().manual_seed(0), 0.0, 400.0)
    assert torch.equal(out, images) and torch.equal(cut, masks) and not centre.any()
    plain = augment_batch(images, masks, torch.Generator().manual_seed(3))
    off = augment_batch(images, masks, torch.Generator().manual_seed(3), fov_crop=0.0, field_of_view_mm=400.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, off, strict=True))  # same random draws as before


def test_the_crop_is_centred_on_the_body_and_recentred_by_the_warp():
    images = torch.zeros(8, 1, 128, 128)
    images[:, :, 4:20, 100:120] = 0.6  # a small body near a corner: every crop centre lies on it
    masks = (images > 0).float()
    out, cut, centre = field_of_view_crop(images, masks, torch.Generator().manual_seed(1), 1.0, 400.0,
                                          diameter_mm=(200.0, 200.0))
    assert torch.equal(out, images) and torch.equal(cut, masks)  # a 64 px disc on the 16x20 px body keeps it all
    expected = torch.tensor([(2 * 109.5 + 1) / 128 - 1, (2 * 11.5 + 1) / 128 - 1])  # its centre, normalised (x, y)
    assert torch.allclose(centre, expected.expand_as(centre), atol=1e-5)
    warped, _ = augment_batch(images, masks, torch.Generator().manual_seed(1), intensity=0.0, fov_crop=1.0,
                              field_of_view_mm=400.0)
    grid = (2 * torch.arange(128) + 1) / 128 - 1
    weight = warped[:, 0].sum((1, 2))
    assert (weight > 0).all()
    x = (warped[:, 0].sum(1) * grid).sum(1) / weight
    y = (warped[:, 0].sum(2) * grid).sum(1) / weight
    assert x.abs().max() < 0.2 and y.abs().max() < 0.2  # moved from (0.72, -0.82) to the centre (± the shift)


def test_the_crop_needs_a_physical_field_of_view():
    images, masks = body_batch()
    with pytest.raises(ValueError, match="field_of_view_mm"):
        augment_batch(images, masks, torch.Generator().manual_seed(0), fov_crop=0.5)

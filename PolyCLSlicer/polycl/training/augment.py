"""Training-time augmentation on network inputs, one batch at a time: a random affine warp of image and mask
together, intensity gain / offset / noise, a liver-only contrast offset, and a simulated small reconstruction
field of view."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FOV_CROP_MM = (150.0, 350.0)  # diameters of the simulated reconstruction fields of view (field_of_view_crop)


def warp_batch(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply each sample's 2x3 affine ``theta`` (output -> input, normalised coordinates) to its image and
    mask: one ``affine_grid`` and one ``grid_sample`` for the whole batch, image channels and mask together
    (bilinear, zeros outside); the mask is re-binarised at 0.5."""
    channels = images.shape[1]
    both = torch.cat([images, masks.to(images.dtype)], 1)
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return both[:, :channels], (both[:, channels:] > 0.5).to(masks.dtype)


def organ_contrast(images: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Add each sample's offset (window units) inside its organ mask, as a contrast phase changes the organ's
    enhancement and not its neighbours'.  The mask is softened over 3 px (a 3x3 box filter) so the change
    does not draw a step exactly on the label border; every input channel (2.5D neighbours) gets it."""
    soft = F.avg_pool2d(masks.to(images.dtype), 3, stride=1, padding=1, count_include_pad=False)
    return images + offsets[:, None, None, None] * soft


def field_of_view_crop(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, probability: float,
                       field_of_view_mm: float, diameter_mm: tuple[float, float] = FOV_CROP_MM,
                       square_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Imitate a small scanner reconstruction field of view (a spine or kidney protocol) on network inputs.

    ``images`` / ``masks`` (N, C, S, S) are in the network frame: a ``field_of_view_mm`` square, so a pixel is
    field_of_view_mm / S mm whatever the scan's spacing.  With ``probability`` per sample, a disc (or, for
    ``square_fraction`` of them, an axis-aligned square) of a diameter drawn from ``diameter_mm`` is centred
    on a random body pixel (window value > 0); outside it the image becomes air (0, what the window maps
    -1024 HU to) and the label is cut.  Also returns (N, 2) normalised (x, y) offsets of the kept body's
    centre (0 for untouched samples): adding them to the sampling grid's translation centres the crop as
    ``polycl.field_of_view`` centres a real small scan's body.  Vectorised: a few tensor ops per batch."""
    count, _, height, width = images.shape
    device = generator.device

    def draw() -> torch.Tensor:
        return torch.rand(count, generator=generator, device=device)

    chosen = draw() < probability
    radius = (diameter_mm[0] + (diameter_mm[1] - diameter_mm[0]) * draw()) / field_of_view_mm  # normalised
    square = draw() < square_fraction
    body = images[:, images.shape[1] // 2] > 0  # (N, S, S) soft tissue and denser: above the window's floor
    weights = body.flatten(1).to(device, torch.float32) + 1e-6  # a slice without body: anywhere
    pick = torch.multinomial(weights, 1, generator=generator)[:, 0]
    xs = (2 * torch.arange(width, device=device) + 1) / width - 1  # pixel centres (align_corners=False)
    ys = (2 * torch.arange(height, device=device) + 1) / height - 1
    dx = xs[None, None, :] - xs[pick % width][:, None, None]
    dy = ys[None, :, None] - ys[pick // width][:, None, None]
    limit = radius[:, None, None]
    inside = torch.where(square[:, None, None], (dx.abs() <= limit) & (dy.abs() <= limit),
                         dx * dx + dy * dy <= limit * limit) | ~chosen[:, None, None]
    inside = inside.to(images.device)
    kept = body.to(images.device) & inside
    counts = kept.sum((1, 2)).clamp(min=1)
    centre = torch.stack([(kept.sum(1) * xs.to(images.device)).sum(1) / counts,
                          (kept.sum(2) * ys.to(images.device)).sum(1) / counts], 1)
    centre = torch.where((chosen.to(images.device) & kept.any(2).any(1))[:, None], centre, torch.zeros_like(centre))
    keep = inside[:, None].to(images.dtype)
    return images * keep, masks * keep.to(masks.dtype), centre


def augment_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, intensity: float = 0.05,
                  noise: float = 0.0, organ: float = 0.0, fov_crop: float = 0.0, field_of_view_mm: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation (±15°), scale (0.85-1.15), shift (±8 %), gain (0.9-1.1), offset (±intensity in window
    units; 0.05 = ±20 HU at W400), Gaussian noise of standard deviation up to ``noise`` and, with ``organ``
    > 0, an offset of ±organ inside the label only (``organ_contrast``).  With ``fov_crop`` > 0 that share
    of the samples first gets a small field of view (``field_of_view_crop``, needs ``field_of_view_mm``),
    re-centred on its body by the same warp."""
    count = images.shape[0]
    centre = None
    if fov_crop > 0:
        if not field_of_view_mm:
            raise ValueError("the field-of-view crop augmentation needs a physical input (field_of_view_mm)")
        images, masks, centre = field_of_view_crop(images, masks, generator, fov_crop, field_of_view_mm)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, device=generator.device)

    angle = uniform(-math.pi / 12, math.pi / 12)
    scale = uniform(0.85, 1.15)
    theta = torch.zeros(count, 2, 3, device=generator.device)  # drawn on the generator's device: same per seed
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = torch.stack([uniform(-0.08, 0.08), uniform(-0.08, 0.08)], 1)
    if centre is not None:
        theta[:, :, 2] += centre.to(theta.device)
    images, masks = warp_batch(images, masks, theta.to(images.device))
    if organ > 0:
        images = organ_contrast(images, masks, uniform(-organ, organ).to(images.device))
    gain = uniform(0.9, 1.1).to(images.device)[:, None, None, None]
    bias = uniform(-intensity, intensity).to(images.device)[:, None, None, None]
    images = images * gain + bias
    if noise > 0:
        sigma = uniform(0.0, noise).to(images.device)[:, None, None, None]
        draw = torch.randn(images.shape, generator=generator, device=generator.device)
        images = images + sigma * draw.to(images.device)
    return images.clamp(0, 1), masks

"""Augmentations for SimCLR and Pix2Rep in plain torch (no torchvision), batched, seeded.

Spatial transforms are affine maps in ``affine_grid``'s normalised coordinates (align_corners=False),
which are resolution-independent: the same ``theta`` warps a 256² image and a 64² feature map
consistently, which is what Pix2Rep's equivariance target needs.

Devices: random numbers come from the caller's (CPU) generator, so a seed gives the same views on
any device; every image-sized tensor is made on the images' device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, device=generator.device)


def random_affine(count: int, generator: torch.Generator, max_rotation_deg: float = 30.0,
                  scale: tuple[float, float] = (0.7, 1.0), max_shift: float = 0.15, flip: bool = True
                  ) -> torch.Tensor:
    """(count, 2, 3) thetas: rotation, zoom-in crop (scale < 1 = crop), shift, horizontal flip."""
    angle = _uniform(count, -1, 1, generator) * math.radians(max_rotation_deg)
    zoom = _uniform(count, scale[0], scale[1], generator)
    draws = _uniform(count, 0, 1, generator)
    sign = torch.where(draws < 0.5, -1.0, 1.0) if flip else torch.ones_like(draws)
    theta = torch.zeros(count, 2, 3, device=draws.device)
    theta[:, 0, 0] = torch.cos(angle) * zoom * sign
    theta[:, 0, 1] = -torch.sin(angle) * zoom
    theta[:, 1, 0] = torch.sin(angle) * zoom * sign
    theta[:, 1, 1] = torch.cos(angle) * zoom
    theta[:, :, 2] = _uniform(2 * count, -max_shift, max_shift, generator).reshape(count, 2)
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``images`` (B, C, H, W) at theta-mapped output coordinates (zeros outside)."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def valid_region(theta: torch.Tensor, shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(B, H, W) bool: output pixels whose source point lies inside the input image."""
    ones = torch.ones(theta.shape[0], 1, *shape, device=device)
    return warp(ones, theta)[:, 0] > 0.999


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur; sigma (B,) in pixels (0 = no blur)."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    sigma = sigma.to(images.device, images.dtype).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / sigma) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K)
    count, channels, height, width = images.shape
    x = images.reshape(1, count * channels, height, width)
    k = kernel.repeat_interleave(channels, 0)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=count * channels)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=count * channels)
    return x.reshape(count, channels, height, width)


def intensity_transform(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random brightness, contrast, gamma, blur (p=0.5) and Gaussian noise on [0, 1] images."""
    count = images.shape[0]

    def per_image(low: float, high: float) -> torch.Tensor:
        return _uniform(count, low, high, generator).to(images.device)[:, None, None, None]

    s = strength
    x = images.clamp(0, 1) ** per_image(1 - 0.4 * s, 1 + 0.6 * s)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * per_image(1 - 0.4 * s, 1 + 0.4 * s) + mean + per_image(-0.2 * s, 0.2 * s)
    blur = _uniform(count, 0, 1, generator) < 0.5
    sigma = torch.where(blur, _uniform(count, 0.1, 1.5 * s, generator), 0.0)
    if bool(blur.any()):
        x = gaussian_blur(x, sigma)
    noise = torch.randn(images.shape, generator=generator, device=generator.device).to(images.device)
    x = x + noise * per_image(0.0, 0.05 * s)
    return x.clamp(0, 1)


def simclr_views(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent SimCLR views: random crop-resize / rotation / flip, then intensity jitter."""
    views = []
    for _ in range(2):
        theta = random_affine(images.shape[0], generator, max_rotation_deg=20, scale=(0.5, 1.0), max_shift=0.2)
        views.append(intensity_transform(warp(images, theta), generator))
    return views[0], views[1]


def pix2rep_views(images: torch.Tensor, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t(x), t'(phi(x)), theta of phi): phi is applied to the second view only."""
    theta = random_affine(images.shape[0], generator)
    first = intensity_transform(images, generator)
    second = intensity_transform(warp(images, theta), generator)
    return first, second, theta

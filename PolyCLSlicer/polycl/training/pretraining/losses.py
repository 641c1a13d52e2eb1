"""Contrastive losses: PolyCL triplet loss (METHOD §2), SimCLR NT-Xent, Pix2Rep pixel NT-Xent (§8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def polycl_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                        tau: float | None = None) -> torch.Tensor:
    """L = -log(e^{cos(z,z+)/tau} / (e^{cos(z,z+)/tau} + e^{cos(z,z-)/tau})), batch mean.

    ``tau`` defaults to 1/M with M the minibatch size (0.05 at M = 20).  Computed as
    softplus((cos(z,z-) - cos(z,z+)) / tau), which is the same quantity without overflow.
    """
    if not (anchor.shape == positive.shape == negative.shape) or anchor.ndim != 2:
        raise ValueError(f"embeddings must be (M, D) of equal shape, got {tuple(anchor.shape)}, "
                         f"{tuple(positive.shape)}, {tuple(negative.shape)}")
    tau = 1.0 / anchor.shape[0] if tau is None else float(tau)
    cos_pos = F.cosine_similarity(anchor, positive, dim=1)
    cos_neg = F.cosine_similarity(anchor, negative, dim=1)
    return F.softplus((cos_neg - cos_pos) / tau).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent: (z1[i], z2[i]) are positives, the other 2M - 2 embeddings negatives."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"embeddings must be (M, D) of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    count = z1.shape[0]
    if count < 2:
        raise ValueError("NT-Xent needs at least two pairs (the other pairs are the negatives)")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / tau
    logits = logits.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(count, 2 * count, device=z.device), torch.arange(count, device=z.device)])
    return F.cross_entropy(logits, target)


def sample_pixel_pairs(valid: torch.Tensor, count: int, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random (batch, flat pixel) positions where ``valid`` (B, H, W) is true."""
    flat = valid.reshape(-1).nonzero().squeeze(1)
    if len(flat) == 0:
        raise ValueError("no valid pixel to sample (the spatial transform moved the whole image out)")
    draw_device = generator.device if generator is not None else "cpu"  # same draws per seed on any device
    choice = torch.randperm(len(flat), generator=generator, device=draw_device)[:count] if len(flat) > count else \
        torch.arange(len(flat), device=flat.device)
    picked = flat[choice.to(flat.device)]
    per_image = valid.shape[1] * valid.shape[2]
    return picked // per_image, picked % per_image


def pixel_nt_xent(warped_features: torch.Tensor, features: torch.Tensor, valid: torch.Tensor,
                  num_pairs: int = 1000, tau: float = 0.5, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Pix2Rep dense NT-Xent over ~``num_pairs`` pixel pairs sampled across the batch.

    ``warped_features`` = phi(f(t(x))) and ``features`` = f(t'(phi(x))), both (B, C, H, W) on the
    same grid; ``valid`` (B, H, W) marks pixels where the warp had data.  Pixel i of one map and
    pixel i of the other are positives; every other sampled pixel is a negative.
    """
    if warped_features.shape != features.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(warped_features.shape)} vs {tuple(features.shape)}")
    batch, pixel = sample_pixel_pairs(valid, num_pairs, generator)
    channels = features.shape[1]
    a = warped_features.permute(0, 2, 3, 1).reshape(-1, channels)
    b = features.permute(0, 2, 3, 1).reshape(-1, channels)
    flat = batch * valid.shape[1] * valid.shape[2] + pixel
    return nt_xent(a[flat], b[flat], tau)

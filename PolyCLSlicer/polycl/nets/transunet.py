"""TransUNet (Chen et al. 2021, arXiv:2102.04306): CNN stem + Transformer over patch tokens + cascaded
upsampling decoder with skip connections, the third backbone of the PolyCL paper's Table 1.

One class, sized by :class:`TransUNetConfig`: the ``paper`` preset is the R50-ViT-B/16 hybrid
(ResNet-50 stages of 3/4/9 bottleneck units, hidden 768, 12 layers, 12 heads, MLP 3072, patch 1 on
the 1/16 feature map, 224 px, decoder 256/128/64/16), the ``small`` preset a CPU-sized variant.
Differences from the authors' code: one input channel and one output logit (CT, liver), plain
convolutions with GroupNorm in the stem (their StdConv2d only matters for loading BiT ImageNet
weights, which are not used here), PyTorch's fused multi-head attention (same parameters).

The encoder returns the feature list the decoder and the pretraining heads consume (finest first):
stem (1/2), stage 1 (1/4), stage 2 (1/8) and the Transformer output as a map (1/(16·patch)); its
last entry feeds the PolyCL projection head like the U-Net's deepest level.  Positional
embeddings are learnt for ``img_size`` and interpolated (bicubic) for other input sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .unet import SegmentationNet


@dataclass(frozen=True)
class TransUNetConfig:
    in_channels: int = 1
    stem_width: int = 64  # root conv channels; stages give 4x, 8x, 16x this
    stage_blocks: tuple[int, int, int] = (3, 4, 9)
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 1  # on the 1/16 CNN feature map (1: one token per 16x16 px)
    img_size: int = 224  # positional embeddings are learnt for this input size
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 16)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_blocks", tuple(int(v) for v in self.stage_blocks))
        object.__setattr__(self, "decoder_channels", tuple(int(v) for v in self.decoder_channels))
        if len(self.stage_blocks) != 3 or min(self.stage_blocks) < 1:
            raise ValueError(f"stage_blocks needs three counts >= 1, got {self.stage_blocks}")
        if len(self.decoder_channels) != 4:
            raise ValueError(f"decoder_channels needs four widths, got {self.decoder_channels}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.patch_size < 1 or self.img_size % (16 * self.patch_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of 16 x patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.img_size // (16 * self.patch_size)


PRESETS = {
    "paper": TransUNetConfig(),
    "small": TransUNetConfig(stem_width=16, stage_blocks=(1, 2, 2), hidden=192, depth=4, heads=4, mlp_dim=768,
                             img_size=256, decoder_channels=(64, 32, 16, 8)),
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 (stride) -> 1x1, GroupNorm) with a projected shortcut when needed."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), _norm(mid_channels), nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, bias=False), _norm(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False), _norm(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          _norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, hidden), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TransUNetEncoder(nn.Module):
    """ResNet stem (root + three stages) -> patch tokens + positional embeddings -> Transformer."""

    def __init__(self, config: TransUNetConfig):
        super().__init__()
        self.config = config
        width = config.stem_width
        self.root = nn.Sequential(nn.Conv2d(config.in_channels, width, 7, 2, 3, bias=False), _norm(width),
                                  nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.ModuleList()
        previous = width
        for stage, (units, mid) in enumerate(zip(config.stage_blocks, (width, 2 * width, 4 * width), strict=True)):
            blocks = [Bottleneck(previous if unit == 0 else 4 * mid, 4 * mid, mid,
                                 stride=2 if unit == 0 and stage > 0 else 1) for unit in range(units)]
            self.stages.append(nn.Sequential(*blocks))
            previous = 4 * mid
        self.patch_embed = nn.Conv2d(previous, config.hidden, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2, config.hidden))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config.hidden, config.heads, config.mlp_dim, config.dropout)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.hidden, eps=1e-6)
        self.skip_channels = (width, 4 * width, 8 * width)

    @property
    def out_channels(self) -> int:
        return self.config.hidden

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1, height*width, hidden) positional embeddings, bicubically interpolated from the learnt grid."""
        grid = self.config.grid
        if (height, width) == (grid, grid):
            return self.pos_embed
        table = self.pos_embed.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        step = 16 * self.config.patch_size
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"TransUNet input {tuple(x.shape[-2:])} px must be a multiple of {step} "
                             f"(16 x patch_size {self.config.patch_size})")
        root = self.root(x)
        features = [root]
        y = self.pool(root)
        for stage in self.stages:
            y = stage(y)
            features.append(y)
        tokens = self.patch_embed(features.pop())  # the 1/16 map is the Transformer's input, not a skip
        height, width = tokens.shape[-2:]
        tokens = self.dropout(tokens.flatten(2).transpose(1, 2) + self.position_embedding(height, width))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        features.append(tokens.transpose(1, 2).reshape(x.shape[0], -1, height, width))
        return features


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class TransUNetDecoder(nn.Module):
    """Cascaded upsampler: conv on the token map, then four (x2 upsample, concat skip, two convs) blocks."""

    def __init__(self, config: TransUNetConfig, skip_channels: tuple[int, int, int], out_channels: int = 1):
        super().__init__()
        self.patch_size = config.patch_size
        head = 2 * config.decoder_channels[0]  # 512 in the paper
        self.conv_more = _conv_bn_relu(config.hidden, head)
        skips = (skip_channels[2], skip_channels[1], skip_channels[0], 0)  # 1/8, 1/4, 1/2, none at full size
        inputs = (head, *config.decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(n_in + n_skip, n_out), _conv_bn_relu(n_out, n_out))
            for n_in, n_skip, n_out in zip(inputs, skips, config.decoder_channels, strict=True))
        self.conv_last = nn.Conv2d(config.decoder_channels[-1], out_channels, 3, padding=1)

    def last_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The full-resolution decoder features before the output conv (Pix2Rep's pixel features)."""
        x = self.conv_more(features[-1])
        if self.patch_size > 1:
            x = F.interpolate(x, scale_factor=self.patch_size, mode="bilinear", align_corners=False)
        skips = [features[2], features[1], features[0], None]
        for block, skip in zip(self.blocks, skips, strict=True):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            x = block(x if skip is None else torch.cat([x, skip], dim=1))
        return x

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_last(self.last_features(features))


class TransUNet(SegmentationNet):
    """TransUNet segmentation network; ``config`` holds every size argument."""

    def __init__(self, config: TransUNetConfig):
        encoder = TransUNetEncoder(config)
        super().__init__(encoder, TransUNetDecoder(config, encoder.skip_channels))
        self.config = config

    def size_differences(self, other: nn.Module) -> list[str]:
        """Size arguments (not dropout) in which network ``other`` differs from this one."""
        theirs = getattr(other, "config", None)
        if not isinstance(theirs, TransUNetConfig):
            return []
        return [f"{f.name} {getattr(theirs, f.name)} in the file, {getattr(self.config, f.name)} here"
                for f in fields(TransUNetConfig) if f.name != "dropout"
                and getattr(theirs, f.name) != getattr(self.config, f.name)]

    def explain_mismatch(self, tensors: dict[str, torch.Tensor], prefix: str = "encoder.") -> str:
        """Which size arguments of weights ``tensors`` differ from this network's (empty when none can be told)."""
        found = infer_config(tensors, prefix)
        own = asdict(self.config)
        diffs = [f"{name} {value} in the file, {own[name]} here" for name, value in found.items()
                 if value != own[name]]
        return "; ".join(diffs)


def infer_config(tensors: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict:
    """The TransUNet size arguments that can be read off encoder weight shapes (heads cannot)."""
    found: dict = {}
    patch = tensors.get(f"{prefix}patch_embed.weight")
    if patch is not None:
        found.update(hidden=int(patch.shape[0]), patch_size=int(patch.shape[-1]), stem_width=int(patch.shape[1]) // 16)
        position = tensors.get(f"{prefix}pos_embed")
        if position is not None:
            found["img_size"] = math.isqrt(int(position.shape[1])) * 16 * found["patch_size"]
    blocks = {key[len(prefix) + 7:].split(".", 1)[0] for key in tensors if key.startswith(f"{prefix}blocks.")}
    if blocks:
        found["depth"] = len(blocks)
    fc1 = tensors.get(f"{prefix}blocks.0.mlp.0.weight")
    if fc1 is not None:
        found["mlp_dim"] = int(fc1.shape[0])
    units = [len({key[len(prefix):].split(".")[2] for key in tensors if key.startswith(f"{prefix}stages.{s}.")})
             for s in range(3)]
    if all(units):
        found["stage_blocks"] = tuple(units)
    return found


def transunet_config(preset: str = "small", **overrides) -> TransUNetConfig:
    """A preset ('small' or 'paper') with some arguments changed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown TransUNet preset {preset!r}; use {' or '.join(PRESETS)}")
    known = {f.name for f in fields(TransUNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown TransUNet arguments {unknown}; known: {', '.join(sorted(known))}")
    return replace(PRESETS[preset], **overrides)


def build_transunet(preset: str = "small", **overrides) -> TransUNet:
    """TransUNet from a preset plus overrides (e.g. ``depth=6``); the registry's ``transunet``."""
    return TransUNet(transunet_config(preset, **overrides))

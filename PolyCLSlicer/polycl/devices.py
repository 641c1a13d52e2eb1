"""Compute device and numeric precision: one policy for the U-Net, SAM and SAM 2.

Device placement is a checked property: :func:`place` moves a model and verifies that every
parameter and buffer ended on the requested device.  The CUDA precision policy is one pure decision
function (:func:`precision_policy`, testable with capability tuples on any machine) plus one place
that applies it to the process (:func:`configure_precision`).  ``torchrun`` picks its process-group
backend through :func:`distributed_backend`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .threads import apply_to_torch

apply_to_torch()  # the process's thread decision (polycl.threads), also when made before torch's import

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA GPU is available to PyTorch; use --device cpu")
    if name not in ("cpu", "meta") and not name.startswith(("cuda", "mps")):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(name)  # 'meta' (shapes only) serves the device-placement tests


def _on(actual: torch.device, wanted: torch.device) -> bool:
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def misplaced(module: nn.Module, device: str | torch.device) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on ``device``."""
    wanted = torch.device(device)
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [f"{name} ({tensor.device})" for name, tensor in tensors if not _on(tensor.device, wanted)]


def place(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Move ``module`` to ``device`` and check that every parameter and buffer is there.

    Call it after any step that builds new layers (BatchNorm folding, dtype conversion ...): layers
    created later with the default device would stay behind and fail at the first forward pass.
    """
    module = module.to(device)
    wrong = misplaced(module, device)
    if wrong:
        raise RuntimeError(f"{len(wrong)} tensors of {type(module).__name__} are not on {device}: "
                           f"{', '.join(wrong[:3])}")
    return module


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a device runs: autocast precision, TF32 for the float32 ops, cuDNN autotuning."""

    precision: str  # fp32, bf16 or fp16
    allow_tf32: bool = False
    cudnn_benchmark: bool = False


def precision_policy(requested: str, device_type: str, cuda_capability: tuple[int, int] | None = None,
                     cpu_bf16: bool = False, fixed_shapes: bool = True) -> PrecisionPolicy:
    """The precision decision, a pure function of the request and the hardware.

    * ``auto`` on CUDA: bf16 autocast from compute capability 8.0 (Ampere: native bf16 tensor
      cores; same exponent range as fp32, so no overflow in attention logits); fp16 on 7.x (Volta /
      Turing tensor cores have fp16 only; bf16 there is emulated and slower than fp32); fp32 before.
      On CPU: bf16 where oneDNN has native kernels (AVX512-BF16 / AMX), else fp32.  Elsewhere fp32.
    * An explicit ``fp32`` / ``bf16`` / ``fp16`` is honoured as asked.
    * TF32 (float32 matmuls and convolutions on tensor cores, 10-bit mantissa) from capability 8.0,
      unless ``fp32`` was asked for explicitly: that request means IEEE float32.
    * ``cudnn.benchmark`` on CUDA when input shapes are fixed (slices resized to the model's input
      size, SAM's 1024 / 256 px frames): autotuning pays after the first batch.
    """
    requested = requested.lower()
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use {', '.join(PRECISIONS)}")
    if device_type != "cuda":
        chosen = "bf16" if requested == "auto" and device_type == "cpu" and cpu_bf16 else requested
        return PrecisionPolicy("fp32" if chosen == "auto" else chosen)
    if cuda_capability is None:
        raise ValueError("the CUDA precision policy needs the device's compute capability")
    major = cuda_capability[0]
    chosen = requested
    if requested == "auto":
        chosen = "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    return PrecisionPolicy(chosen, allow_tf32=major >= 8 and requested != "fp32", cudnn_benchmark=fixed_shapes)


def device_policy(precision: str, device: torch.device, fixed_shapes: bool = True) -> PrecisionPolicy:
    """:func:`precision_policy` for this machine's ``device``."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return precision_policy(precision, device.type, capability, device.type == "cpu" and cpu_supports_bf16(),
                            fixed_shapes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 / fp16 / fp32 for ``device`` (see :func:`precision_policy`); explicit values pass."""
    return device_policy(precision, device).precision


def apply_policy(policy: PrecisionPolicy) -> None:
    """Set the process-wide TF32 and cuDNN autotuning switches of a CUDA policy."""
    torch.backends.cuda.matmul.allow_tf32 = policy.allow_tf32
    torch.backends.cudnn.allow_tf32 = policy.allow_tf32
    torch.backends.cudnn.benchmark = policy.cudnn_benchmark


def configure_precision(precision: str, device: torch.device, fixed_shapes: bool = True) -> str:
    """Resolve the precision for ``device``; on CUDA also apply the policy's TF32 / cuDNN switches."""
    policy = device_policy(precision, device, fixed_shapes)
    if device.type == "cuda":
        apply_policy(policy)
    return policy.precision


def distributed_backend(device: torch.device, nccl_available: bool | None = None) -> str:
    """torchrun process-group backend: NCCL for CUDA processes where PyTorch has it, else gloo.

    (Windows builds have no NCCL; gloo then carries CUDA tensors' all-reduce, more slowly.)
    """
    if nccl_available is None:
        nccl_available = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    return "nccl" if device.type == "cuda" and nccl_available else "gloo"


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 / fp16 for those precisions, else a no-op context."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()

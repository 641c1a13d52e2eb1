"""LiteMedSAM's image encoder in another runtime (OpenVINO) vs the shipped torch path, on real CT slices.

Run:  .venv/bin/python bench/encoder_runtimes.py [--data DIR] [--slices 6] [--repeats 3] [--threads N]
      (needs ``pip install openvino``; it is not a dependency of polycl)

Issue 25 allows another runtime only where it wins by >= 1.5x on this CPU and gives the same masks.  In one run:
the mid-liver slices of ircad01 (512x512, never trained on), each embedded by the shipped encoder
(``build_litemedsam``: fused TinyViT forwards, pure bf16 where the CPU has it) and by OpenVINO compiled from
the plain fp32 encoder with the bf16 and the f32 precision hint, interleaved slice by slice (other load hits all
alike); the conversion + compile time; the embeddings' mean relative difference from the plain fp32 torch
encoder; and the masks: the shipped decoder on each runtime's embedding with the box of the starter model's
liver on that slice, pixels differing from the shipped path's mask.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_root, machine  # noqa: E402  (also puts polycl on sys.path)
from inference import cut_119  # noqa: E402

from polycl.inference import Segmenter  # noqa: E402
from polycl.masks import bounding_box  # noqa: E402
from polycl.sam.builders import build_litemedsam  # noqa: E402
from polycl.sam.refine import slice_to_rgb  # noqa: E402


def liver_slices(root: Path, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` mid-liver axial slices of the 119-slice ircad01 cut (RGB) and the starter mask's box on each."""
    cut, matrix = cut_119(root)
    mask = Segmenter.from_checkpoint(None, "cpu").segment(cut, matrix).mask
    with_liver = np.flatnonzero(mask.any((0, 1)))
    picks = with_liver[np.linspace(len(with_liver) * 0.3, len(with_liver) * 0.7, count).astype(int)]
    images, boxes = [], []
    for k in picks:
        rows, cols = bounding_box(mask[:, :, k].T)
        images.append(slice_to_rgb(cut[:, :, k].T))
        boxes.append(np.array([[cols.start, rows.start, cols.stop - 1, rows.stop - 1]]))
    return images, boxes


def openvino_encoders(encoder: torch.nn.Module, example: torch.Tensor, threads: int) -> tuple[dict, float]:
    """OpenVINO models of ``encoder`` compiled with the bf16 and f32 hints, and the conversion + compile seconds."""
    import openvino as ov

    started = time.perf_counter()
    model = ov.convert_model(encoder, example_input=example)
    core = ov.Core()
    compiled = {hint: core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                        "INFERENCE_NUM_THREADS": threads})
                for hint in ("bf16", "f32")}
    return compiled, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    try:
        import openvino
    except ImportError:
        print("OpenVINO is not installed: pip install openvino (an optional runtime; polycl does not need it)")
        return 2
    print(f"OpenVINO {openvino.__version__}, {args.threads} threads")
    images, boxes = liver_slices(data_root(args.data), args.slices)
    shipped = build_litemedsam("cpu")
    plain = build_litemedsam("cpu", precision="fp32", optimize=False)
    inputs = [plain.sam.preprocess(torch.as_tensor(plain.transform.apply_image(image)).permute(2, 0, 1).float()[None])
              for image in images]
    compiled, compile_seconds = openvino_encoders(copy.deepcopy(plain.sam.image_encoder).eval(), inputs[0],
                                                  args.threads)
    print(f"OpenVINO conversion + compile (bf16 and f32): {compile_seconds:.1f} s")
    seconds: dict[str, list[float]] = {"shipped torch": [], "openvino bf16": [], "openvino f32": []}
    embeddings: dict[str, list[torch.Tensor]] = {name: [] for name in seconds}
    for repeat in range(args.repeats):
        for image, tensor in zip(images, inputs, strict=True):
            started = time.perf_counter()
            features = shipped.embed([image], use_cache=False)[0]["features"]
            seconds["shipped torch"].append(time.perf_counter() - started)
            outputs = {"shipped torch": features}
            for hint, model in compiled.items():
                started = time.perf_counter()
                outputs[f"openvino {hint}"] = torch.from_numpy(model(tensor.numpy())[0].copy())
                seconds[f"openvino {hint}"].append(time.perf_counter() - started)
            if repeat == 0:
                for name, value in outputs.items():
                    embeddings[name].append(value)
    with torch.inference_mode():
        reference = [plain.sam.image_encoder(tensor) for tensor in inputs]
    base = float(np.median(seconds["shipped torch"]))
    print("\n| encoder | s per slice (median) | vs shipped | embedding rel. diff vs fp32 torch | mask pixels "
          "differing from shipped |\n|---|---|---|---|---|")
    for name, values in seconds.items():
        median = float(np.median(values))
        difference = np.mean([float((a - b).abs().mean() / b.abs().mean())
                              for a, b in zip(embeddings[name], reference, strict=True)])
        differing = 0
        for image, box, mine, ours in zip(images, boxes, embeddings[name], embeddings["shipped torch"], strict=True):
            size = {"input_size": tuple(plain.transform.apply_image(image).shape[:2]), "original_size": image.shape[:2]}
            mask_mine = shipped.decode({"features": mine, **size}, box)[0]
            mask_ours = shipped.decode({"features": ours, **size}, box)[0]
            differing += int((mask_mine != mask_ours).sum())
        print(f"| {name} | {median:.3f} | {base / median:.2f}x | {difference:.4f} | {differing} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

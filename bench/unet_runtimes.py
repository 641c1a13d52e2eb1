"""The segmentation U-Net in ONNX Runtime vs the shipped torch path, on the network inputs of a real CT.

Run:  .venv/bin/python bench/unet_runtimes.py [--data DIR] [--checkpoint FILE] [--repeats 3] [--threads N]
      (needs ``pip install onnxruntime onnx``; neither is a dependency of polycl)

Issue 25 asks whether ``polycl segment`` can reach 2.5 s on a 512x512x119 CT; importing torch alone takes
about 1 s of it, so the question is whether a torch-free runtime wins.  In one run:
* the import time of torch and of onnxruntime, each in a fresh interpreter (best of ``--repeats``);
* the network inputs that ``Segmenter.segment`` builds for the middle 119 slices of ircad01 (never trained
  on), recorded once, then the U-Net forward over them batch by batch: torch at the shipped precision (bf16
  autocast where the CPU has it), torch fp32, and ONNX Runtime fp32 (the model exported from torch, all graph
  optimisations), interleaved per repeat so other load hits all alike; the export + session time;
* the masks: pixels where ONNX Runtime's or the shipped path's ``logit > 0`` differs from torch fp32's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_root, machine  # noqa: E402  (also puts polycl on sys.path)
from inference import cut_119  # noqa: E402

from polycl.devices import autocast_context  # noqa: E402
from polycl.inference import Segmenter  # noqa: E402


def import_seconds(module: str, repeats: int) -> float:
    """Best wall time of ``import module`` in a fresh interpreter (minus the interpreter's own start)."""
    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - started
    bare = min(run("pass") for _ in range(repeats))
    return min(run(f"import {module}") for _ in range(repeats)) - bare


def network_inputs(segmenter: Segmenter, array: np.ndarray, matrix: np.ndarray) -> list[torch.Tensor]:
    """The batches ``segmenter.segment`` feeds its network for this volume, in order (not inference tensors)."""
    recorded: list[torch.Tensor] = []
    forward = segmenter.model.forward
    segmenter.model.forward = lambda x: recorded.append(torch.from_numpy(x.float().numpy().copy())) or forward(x)
    try:
        segmenter.segment(array, matrix)
    finally:
        segmenter.model.forward = forward
    return recorded


def torch_logits(model: torch.nn.Module, batches: list[torch.Tensor], precision: str) -> np.ndarray:
    with torch.inference_mode():
        out = []
        for batch in batches:
            with autocast_context(torch.device("cpu"), precision):
                out.append(model(batch).float())
    return torch.cat(out).numpy()


def onnx_session(model: torch.nn.Module, example: torch.Tensor, folder: Path, threads: int):
    import onnxruntime

    path = folder / "unet.onnx"
    with torch.no_grad():  # the loaded weights may be inference tensors
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(run) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled starter model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: pip install onnxruntime onnx (not a polycl dependency)")
        return 2
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu")
    model = segmenter.model.eval()
    array, matrix = cut_119(data_root(args.data))
    batches = network_inputs(segmenter, array, matrix)
    print(f"checkpoint: {args.checkpoint or 'bundled starter'}; {sum(len(b) for b in batches)} slices at "
          f"{segmenter.input_size} px in batches of {len(batches[0])}; shipped precision {segmenter.precision}; "
          f"{args.threads} threads")
    print(f"import torch {import_seconds('torch', args.repeats):.2f} s, import onnxruntime "
          f"{import_seconds('onnxruntime', args.repeats):.2f} s (fresh interpreter, best of {args.repeats})")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        session = onnx_session(model, batches[0], Path(folder), args.threads)
        print(f"ONNX export + session: {time.perf_counter() - started:.2f} s")
        runs = {"torch shipped": lambda: torch_logits(model, batches, segmenter.precision),
                "torch fp32": lambda: torch_logits(model, batches, "fp32"),
                "onnxruntime fp32": lambda: np.concatenate([session.run(None, {"x": b.numpy()})[0] for b in batches])}
        for run in runs.values():
            run()  # warm-up: oneDNN primitive caches, ORT arenas
        seconds = {name: [] for name in runs}
        logits = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                elapsed, logits[name] = timed(run)
                seconds[name].append(elapsed)
    reference = logits["torch fp32"] > 0
    shipped = min(seconds["torch shipped"])
    print("| runtime | network, 119 slices (best) | vs shipped | mask pixels differing from torch fp32 |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        differing = int(((logits[name] > 0) != reference).sum())
        print(f"| {name} | {min(values):.3f} s | {shipped / min(values):.2f}x | {differing} of {reference.size} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

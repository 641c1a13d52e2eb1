"""Inference benchmark: end-to-end `polycl segment` time and peak RSS, batched vs naive, GFLOP/s.

Run:  .venv/bin/python bench/inference.py [--data DIR] [--repeats N] [--baseline-commit SHA] [--baseline-checkpoint F]

Measures, in one run on this machine:
  1. end-to-end `polycl segment --json` (process start, imports, model load, read, inference, write) wall
     time, CPU time, peak RSS and the step laps, on the largest labelled case and on a 512x512x119 CT cut
     from ircad01: the package before issue 12 (``git archive`` of --baseline-commit) and now, alternated;
     then now with ``--probability`` (the float map written too);
  2. the network alone on the 119-slice volume: naive eager per-slice fp32 loop with torch's
     instance_norm kernel (baseline), the batched path with that kernel, and the
     shipped path (batched, inference_mode, bf16 autocast where the CPU has native bf16, channels-last
     (NHWC) on CPU), batch 4 also in the old contiguous (NCHW) layout;
  3. achieved GFLOP/s of both vs a matmul peak (fp32 and bf16) measured in the same run.
With ``--backbones [--size PX]`` instead: the shipped path for U-Net, ResU-Net and TransUNet (random
weights, 128 px) on the same 119 slices, the U-Net as baseline.
Figures depend on the machine and on other load: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, torch_instance_norm  # noqa: E402  (also puts polycl on sys.path)

from polycl.geometry import CanonicalOrientation  # noqa: E402
from polycl.inference import Segmenter  # noqa: E402
from polycl.io.samples import data_dir  # noqa: E402
from polycl.io.volumes import read_volume, write_volume  # noqa: E402
from polycl.nets.checkpoints import default_card, load_checkpoint, save_model
from polycl.nets.model_card import STARTER_CHECKPOINT  # noqa: E402
from polycl.nets.registry import build_model  # noqa: E402
from polycl.preprocessing import resize_slices, window

BASELINE_COMMIT = "4a7f70d"


def run_cli(argv: list[str], package: Path = ROOT / "PolyCLSlicer") -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `polycl` process (the polycl package found under ``package``)."""
    seconds, rss, _, _ = run_cli_detailed(argv, package)
    return seconds, rss


# Runs ``python -m polycl.cli`` and, at exit, writes the process's own peak RSS (VmHWM, KiB) to $POLYCL_BENCH_PEAK.
# wait4's ru_maxrss is no measure of the child: Linux keeps the high-water mark of the memory the child had
# before exec, and a child forked from this bench process (which holds torch, models and CTs) starts with all
# of the bench's pages, so ru_maxrss reported the bench's size (1.98 GiB for both packages, 2026-12-06).
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as status, open(os.environ["POLYCL_BENCH_PEAK"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM")))
atexit.register(peak)
sys.argv = ["polycl", *sys.argv[1:]]
runpy.run_module("polycl.cli", run_name="__main__", alter_sys=True)
"""


def polycl_process(argv: list[str], package: Path = ROOT / "PolyCLSlicer", env: dict[str, str] | None = None
                   ) -> tuple[float, float, float, str, str]:
    """One ``python -m polycl.cli`` process (the polycl package found under ``package``): wall seconds, its own
    peak RSS (MiB, VmHWM), CPU seconds (user + system, all threads), stdout and stderr; RuntimeError when it
    fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.NamedTemporaryFile("r") as peak:
        process = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *argv], stdout=stdout, stderr=subprocess.PIPE,
                                   env={**(env or os.environ), "PYTHONPATH": str(package),
                                        "POLYCL_BENCH_PEAK": peak.name})
        error = process.stderr.read().decode()  # stdout goes to a file: no pipe deadlock
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        stdout.seek(0)
        output = stdout.read().decode()
        peak_mib = int(peak.read() or 0) / 1024
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"polycl {' '.join(argv[:1])} failed: {error[-600:]}")
    return seconds, peak_mib, usage.ru_utime + usage.ru_stime, output, error


def run_cli_detailed(argv: list[str], package: Path = ROOT / "PolyCLSlicer") -> tuple[float, float, float, dict]:
    """Wall seconds, peak RSS (MiB), CPU seconds (user + system, all threads) and the ``--json`` step laps."""
    seconds, rss, cpu, output, _ = polycl_process(argv, package)
    laps = json.loads(output).get("seconds", {}) if "--json" in argv else {}
    return seconds, rss, cpu, laps


def baseline_package(commit: str, work: Path) -> Path | None:
    """The polycl package as of ``commit`` (git archive into ``work``), or None when git cannot give it."""
    target = work / f"baseline-{commit}"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "PolyCLSlicer/polycl"], capture_output=True)
    if archive.returncode != 0:
        print(f"   (no baseline: git archive {commit} failed: {archive.stderr.decode().strip()[:120]})")
        return None
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "PolyCLSlicer"


def compare_end_to_end(cases: dict[str, Path], checkpoint: Path, work: Path, baseline_commit: str,
                       repeats: int, baseline_checkpoint: Path | None = None) -> None:
    """`polycl segment` end to end, the package before issue 12 vs now, runs alternated; best of ``repeats``.
    The baseline runs ``baseline_checkpoint`` when given (e.g. the previous starter model), else ``checkpoint``."""
    baseline = baseline_package(baseline_commit, work)
    packages = {f"before ({baseline_commit})": baseline, "now": ROOT / "PolyCLSlicer"}
    print(f"\n1. end-to-end `polycl segment --json` (new process each run, alternated; best of {repeats}; "
          "CPU = user + system seconds of all threads)")
    for name, path in cases.items():
        argv = ["segment", str(path), "-o", str(work / "mask.nii.gz"), "--overwrite", "--json",
                "--checkpoint", str(checkpoint)]
        runs: dict[str, list] = {label: [] for label, package in packages.items() if package is not None}
        for _ in range(repeats):
            for label in runs:
                run_argv = argv if label == "now" else [*argv[:-1], str(baseline_checkpoint or checkpoint)]
                runs[label].append(run_cli_detailed(run_argv, packages[label]))
        best = {label: min(results, key=lambda r: r[0]) for label, results in runs.items()}
        for label, (seconds, rss, cpu, laps) in best.items():
            steps = "  ".join(f"{step} {value:.2f}" for step, value in laps.items())
            ratio = ""
            if label == "now" and len(best) == 2:
                ratio = f"  {next(iter(best.values()))[0] / seconds:4.2f}x"
            print(f"   {name:22s} {label:18s} {seconds:6.2f} s  CPU {cpu:6.2f} s  peak RSS {rss:6.0f} MiB  "
                  f"[{steps}]{ratio}  load {os.getloadavg()[0]:.1f}")
        seconds, rss, cpu, _ = run_cli_detailed([*argv, "--probability", str(work / "probability.nii.gz")])
        print(f"   {name:22s} {'now, --probability':18s} {seconds:6.2f} s  CPU {cpu:6.2f} s  peak RSS {rss:6.0f} MiB")


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of square matmuls; bf16 without native CPU support is emulated (~1 GFLOP/s): one 512 matmul."""
    from polycl.devices import cpu_supports_bf16

    if dtype == torch.bfloat16 and not cpu_supports_bf16():
        size, repeats = 512, 1
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def network_flops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, size, size))
    return float(counter.get_total_flops())


def naive_per_slice(model: torch.nn.Module, slices: np.ndarray, size: int) -> float:
    """Baseline: one slice at a time, fp32, autograd on (eager PyTorch as in the reference code)."""
    started = time.perf_counter()
    for index in range(len(slices)):
        image = window(torch.from_numpy(slices[index].astype(np.float32))[None, None])
        with torch.no_grad():
            torch.sigmoid(model(resize_slices(image, size)))
    return time.perf_counter() - started


def compare_network_paths(label: str, model: torch.nn.Module, card: dict, slices: np.ndarray,
                          peak32: float, peak16: float) -> None:
    """Network alone on all slices: naive per-slice fp32 loop vs the shipped batched paths."""
    size = card["input_size"]
    card = {key: value for key, value in card.items() if key != "field_of_view_mm"}  # whole-slice resize: the
    # network's cost is the same at the same input size; the end-to-end section times the field-of-view path
    flops = network_flops(model, size) * len(slices)
    print(f"\n3. network alone, {label}: {len(slices)} slices ({flops / 1e9:.0f} GFLOP)")
    with torch_instance_norm():
        naive = naive_per_slice(model, slices, size)
    print(f"   naive eager per-slice fp32     {naive:6.2f} s  {flops / naive / 1e9:6.1f} GFLOP/s "
          f"({flops / naive / 1e9 / peak32:4.0%} of fp32 peak)  baseline")
    for precision, batch_size, norm, layout in (("fp32", 16, "torch", "NHWC"), ("fp32", 16, "group", "NHWC"),
                                                ("auto", 4, "group", "NCHW"), ("auto", 4, "group", "NHWC"),
                                                ("auto", 16, "group", "NHWC")):
        # shipped: channels-last (NHWC); NCHW is the layout before issue 25's fourth session
        segmenter = Segmenter(model, card, device="cpu", precision=precision, channels_last=layout == "NHWC")
        with torch_instance_norm() if norm == "torch" else contextlib.nullcontext():
            segmenter.predict_slices(slices[:batch_size], batch_size=batch_size)  # warm-up (oneDNN primitives)
            started = time.perf_counter()
            segmenter.predict_slices(slices, batch_size=batch_size)
            seconds = time.perf_counter() - started
        dtype = segmenter.precision
        peak = peak16 if dtype == "bf16" else peak32
        print(f"   batched {batch_size:2d} {precision:4s} ({dtype:4s} {layout})  {seconds:6.2f} s  "
              f"{flops / seconds / 1e9:6.1f} GFLOP/s ({flops / seconds / 1e9 / peak:4.0%} of {dtype} peak)  "
              f"{naive / seconds:4.2f}x vs naive" + ("  (torch's instance_norm kernel)" if norm == "torch" else ""))


def compare_backbones(slices: np.ndarray, size: int = 128, repeats: int = 1) -> None:
    """Shipped path (batched, auto precision) per backbone, random weights; best of ``repeats``.

    Prints wall-clock and process CPU seconds: under shared load the CPU time (all threads) is the
    steadier figure; on an idle machine wall-clock is about CPU time / threads.
    """
    from polycl.nets.unet import count_parameters

    print(f"\nbackbones, {len(slices)} slices of {slices.shape[1]}x{slices.shape[2]} at {size} px "
          f"(random weights; best of {repeats})")
    baseline = None
    for name in ("polycl_unet", "resunet", "transunet"):
        torch.manual_seed(0)
        segmenter = Segmenter(build_model(name), default_card(name, input_size=size), device="cpu")
        segmenter.predict_slices(slices[:4])  # warm-up
        times = []
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            segmenter.predict_slices(slices)
            times.append((time.process_time() - cpu_started, time.perf_counter() - started))
        cpu, seconds = min(times)
        baseline = baseline or cpu
        print(f"   {name:12s} {count_parameters(segmenter.model):11,d} params  CPU {cpu:7.2f} s  wall {seconds:7.2f} s "
              f"({segmenter.precision})  {cpu / baseline:4.2f}x U-Net CPU time  load {os.getloadavg()[0]:.1f}")


def cut_119(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """ircad01's middle 119 slices (512x512x119) with the matching IJK->RAS matrix."""
    big = read_volume(data / "unlabeled" / "ircad01_ct.nii.gz")
    start = (big.array.shape[2] - 119) // 2
    matrix = big.ijk_to_ras.copy()
    matrix[:3, 3] = (big.ijk_to_ras @ np.array([0, 0, start, 1.0]))[:3]
    return big.array[:, :, start:start + 119], matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data_dir(), help="shared data folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled starter model")
    parser.add_argument("--backbones", action="store_true", help="only compare the three backbones' inference time")
    parser.add_argument("--size", type=int, default=128, help="--backbones: network input size (default 128)")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT,
                        help=f"end-to-end baseline: the polycl package of this commit (default {BASELINE_COMMIT}, "
                             "the last one before issue 12's segment changes)")
    parser.add_argument("--baseline-checkpoint", type=Path, default=None,
                        help="end-to-end baseline: run this checkpoint (default: the same as now)")
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end runs per package (best is printed)")
    args = parser.parse_args()
    if args.data is None:
        print("no data folder: set POLYCL_DATA or pass --data")
        return 2
    if args.backbones:
        print(f"machine: {machine()}")
        cut, matrix = cut_119(args.data)
        compare_backbones(CanonicalOrientation.from_matrix(matrix).to_canonical(cut), args.size)
        return 0
    checkpoint = args.checkpoint or (STARTER_CHECKPOINT if STARTER_CHECKPOINT.exists() else None)
    work = Path(tempfile.mkdtemp(prefix="polycl-bench-"))
    if checkpoint is None:  # timing only: random-init weights of the same architecture
        checkpoint = save_model(work / "random.safetensors", build_model("polycl_unet"), default_card())
    print(f"machine: {machine()}")
    print(f"checkpoint: {checkpoint}" + (f"; baseline: {args.baseline_checkpoint}" if args.baseline_checkpoint else ""))

    cut, matrix = cut_119(args.data)
    write_volume(work / "ct119.nii.gz", cut, matrix)
    cases = {"totalseg_dcm 512x512x20": args.data / "labeled" / "totalseg_dcm_ct.nii.gz",
             "ircad01 512x512x119": work / "ct119.nii.gz"}

    compare_end_to_end(cases, checkpoint, work, args.baseline_commit, args.repeats, args.baseline_checkpoint)

    model, card = load_checkpoint(checkpoint)
    slices = CanonicalOrientation.from_matrix(matrix).to_canonical(cut)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"\n2. matmul peak measured now: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    paper_model = (build_model("polycl_unet").eval(), default_card(input_size=256))
    for label, (net, net_card) in {f"the checkpoint, {card['input_size']} px": (model, card),
                                   "papers' 256 px U-Net (random weights, timing only)": paper_model}.items():
        compare_network_paths(label, net, net_card, slices, peak32, peak16)
    return 0


if __name__ == "__main__":
    sys.exit(main())

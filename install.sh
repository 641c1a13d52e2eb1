#!/usr/bin/env bash
# Create .venv at the repository root and install PolyCLSlicer's core, SAM/SAM 2 layer and
# slicer-core into it, with torch pinned (see requirements.txt).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# sam2 is sdist-only; build it against the torch installed above (no isolated build env that
# would fetch another torch). Its optional CUDA extension is skipped on CPU machines.
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install --quiet --no-build-isolation sam2==1.1.0
.venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import torch, polycl; print(f'polycl {polycl.__version__} installed with torch {torch.__version__}')"

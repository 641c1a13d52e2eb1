"""Extension build and catalog files: minimum Slicer version, the catalog entry and what the ExtensionsIndex
checks (``scripts/check_description_files.py``), the .s4ext from the same metadata, the guarded pytest ctest.

What the index checks online and cannot be checked here: that the icon and screenshot URLs resolve once
the repository is published, and the repository's GitHub topic ``3d-slicer-extension``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import extension_description  # noqa: E402

# Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json and v1.0.2.json (additionalProperties: false)
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                 "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
CATALOG_V102_ONLY = {"dicom_support_rule": str}
# ExtensionsIndex scripts/check_description_files.py
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
REPOSITORY_LIMIT_MB = 100


def schema_errors(entry: dict) -> list[str]:
    """The catalog schema's rules (v1.0.1, or v1.0.2 when the entry names it)."""
    types = dict(CATALOG_TYPES)
    if str(entry.get("$schema", "")).endswith("-v1.0.2.json#"):
        types.update(CATALOG_V102_ONLY)
    errors = [f"missing {key}" for key in sorted(CATALOG_REQUIRED - set(entry))]
    errors += [f"unknown key {key}" for key in sorted(set(entry) - set(types))]
    for key, value in entry.items():
        expected = types.get(key)
        if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            errors.append(f"{key} is not {expected.__name__}")
    if not all(isinstance(item, str) for item in entry.get("build_dependencies", [])):
        errors.append("build_dependencies holds a non-string")
    if entry.get("scm_type", "git") not in ("git", "local"):
        errors.append("scm_type is not git or local")
    if isinstance(entry.get("tier"), int) and not 1 <= entry["tier"] <= 5:
        errors.append("tier is outside 1..5")
    return errors


def test_catalog_entry_follows_the_schema():
    entry = extension_description.catalog_entry()
    assert schema_errors(entry) == []
    assert re.search(r"/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1\.0\.[12]\.json#$",
                     entry["$schema"])
    assert schema_errors({**entry, "tier": 0}) and schema_errors({**entry, "enabled": "yes"})  # the check can fail
    assert schema_errors({**entry, "homepage": "x"})
    assert schema_errors({key: value for key, value in entry.items() if key != "scm_url"})
    raw = (ROOT / "PolyCLSlicer.json").read_bytes()
    assert b"\r" not in raw, "the index refuses CR / CRLF line endings"


def test_catalog_entry_passes_the_extensions_index_checks():
    """Extension name, category, repository name and URL syntax, CMake project name and URLs, licence."""
    entry, cmake = extension_description.catalog_entry(), extension_description.cmake_metadata()
    name = "PolyCLSlicer"  # the entry's file name in the index
    assert not name.lower().startswith("slicer")
    url = urllib.parse.urlsplit(entry["scm_url"])
    assert url.scheme == "https" and url.netloc == "github.com"
    owner, repository = url.path.strip("/").split("/")
    assert repository.startswith(REPOSITORY_PREFIXES) and repository == "SlicerPolyCL"
    assert entry["category"] == cmake["category"] == "Segmentation"
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", top, re.I)[0] == name
    assert entry["build_dependencies"] == cmake["depends"].split() == ["PyTorch"]
    assert cmake["homepage"].startswith(entry["scm_url"] + "#")
    from PolyCLSlicerLib import sample_data

    assert sample_data.PROJECT_URL == entry["scm_url"]
    # icon and screenshots: raw URLs of this repository at the catalog's revision, PNG files that exist here
    assert re.search(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', top)
    assert re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', top)  # the index's pattern: no space
    urls = [cmake["iconurl"], *cmake["screenshoturls"].split()]
    prefix = f"https://raw.githubusercontent.com/{owner}/{repository}/{entry['scm_revision']}/"
    for image in urls:
        assert image.startswith(prefix), image
        path = ROOT / image[len(prefix):]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT,
                              capture_output=True).returncode == 0, f"{path} is not committed"
    licence = [ROOT / n for n in LICENSE_NAMES if (ROOT / n).is_file()]
    assert licence and "Apache License" in licence[0].read_text(encoding="utf-8")


def test_repository_is_within_the_index_size_limit():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    total = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    assert total < REPOSITORY_LIMIT_MB * 1024 * 1024 * 0.8, f"{total / 2**20:.1f} MB"


def test_s4ext_is_generated_from_cmake_and_the_catalog_entry():
    committed = (ROOT / "PolyCLSlicer.s4ext").read_text(encoding="utf-8")
    assert committed == extension_description.s4ext_text(), "regenerate: python tests/extension_description.py"
    fields = extension_description.parse_s4ext(committed)
    entry, cmake = extension_description.catalog_entry(), extension_description.cmake_metadata()
    for required in ("scm", "scmurl", "scmrevision", "homepage", "category"):  # Slicer's required fields
        assert fields[required], required
    assert (fields["scmurl"], fields["scmrevision"], fields["category"]) == (
        entry["scm_url"], entry["scm_revision"], entry["category"])
    assert fields["depends"].split() == entry["build_dependencies"]
    assert fields["description"] == cmake["description"] and "\n" not in fields["description"]
    assert fields["iconurl"] == cmake["iconurl"] and fields["screenshoturls"] == cmake["screenshoturls"]
    changed = extension_description.s4ext_text(entry={**entry, "scm_revision": "v1.0"})
    assert changed != committed  # the comparison above can fail


def test_minimum_slicer_version_is_declared_everywhere():
    sys.path.insert(0, str(ROOT / "PolyCLSlicer"))
    from PolyCLSlicerLib import dependencies

    major, minor = dependencies.MINIMUM_SLICER
    assert (major, minor) == (5, 10)
    assert f"find_package(Slicer {major}.{minor} REQUIRED)" in (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # wrapped lines joined
    assert f"Slicer {major}.{minor} or later" in readme


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

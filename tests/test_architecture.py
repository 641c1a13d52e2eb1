"""The package's layers (docs/ARCHITECTURE.md): every import of ``polycl`` (also those inside functions) runs
down the layers, no import loop exists between modules, and the Slicer adapter imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "PolyCLSlicer" / "polycl"
ADAPTER = [ROOT / "PolyCLSlicer" / "PolyCLSlicer.py", *sorted((ROOT / "PolyCLSlicer" / "PolyCLSlicerLib").glob("*.py"))]

# layer of each top-level module or subpackage: an import may only reach a lower layer (or its own group)
LAYERS = {
    "exports": 0, "geometry": 0, "heap": 0, "progress": 0, "threads": 0,
    "devices": 1, "preprocessing": 1, "field_of_view": 1, "masks": 1, "presence": 1,
    "io": 2, "metrics": 2,  # metrics crops to masks.bounding_box
    "nets": 3,
    "training": 4, "sam": 4,
    "inference": 5,
    "suggest": 6,
    "pipeline": 7,
    "batch": 8,
    "cli": 9, "worker": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path): path for path in sorted(package.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """polycl modules imported anywhere in the file (top level and inside functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "polycl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "polycl":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import inference` names a module; `from .io import x` a name
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported_modules(path, name, set(modules)) - {name} for name, path in modules.items()}


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in graph.items():
        for target in targets:
            source_group, target_group = group(source), group(target)
            if target_group in ("", source_group):  # the package root (__version__) or the same group
                continue
            if LAYERS[target_group] >= LAYERS[source_group]:
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, loops, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def test_every_group_has_a_layer():
    groups = {group(name) for name in all_modules()} - {""}
    assert groups <= set(LAYERS), f"new top-level module or subpackage without a layer: {groups - set(LAYERS)}"


def test_imports_run_down_the_layers():
    assert upward_imports(import_graph(all_modules())) == []


def test_no_import_loops():
    assert import_loops(import_graph(all_modules())) == []


def test_checks_catch_a_loop_and_an_upward_import():
    graph = {"polycl.io.volumes": {"polycl.io.dicom_seg"}, "polycl.io.dicom_seg": {"polycl.io.volumes"},
             "polycl.sam.refine": {"polycl.inference"}, "polycl.inference": set()}
    assert import_loops(graph) == [["polycl.io.dicom_seg", "polycl.io.volumes"]]
    assert upward_imports(graph) == ["polycl.sam.refine -> polycl.inference"]


def adapter_imports() -> set[str]:
    known = set(all_modules())
    found = set()
    for path in ADAPTER:
        found |= {name for name in imported_modules(path, "PolyCLSlicerLib.x", known) if name.startswith("polycl")}
    return found


def test_adapter_uses_no_worker_side_module():
    """The Slicer process imports only torch-free helpers of the core; compute runs in the worker."""
    imported = adapter_imports()
    assert imported, "the adapter imports nothing of polycl: the scan is broken"
    assert not imported & {"polycl.worker", "polycl.pipeline", "polycl.inference"}, imported


@pytest.mark.parametrize("module", sorted(adapter_imports()))
def test_adapter_imports_load_without_torch(module):
    code = f"import sys; import {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "PolyCLSlicer", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{module} imports torch (exit {result.returncode}): {result.stderr[-500:]}"

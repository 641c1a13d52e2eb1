"""Static checks of the PolyCLSlicer GUI (no Qt needed): the .ui, the Widget code and the parameter node agree."""

from __future__ import annotations

import ast
import enum
import json
import pathlib
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PolyCLSlicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "PolyCLSlicer.ui"
MODULE_FILE = MODULE_DIR / "PolyCLSlicer.py"
sys.path.insert(0, str(MODULE_DIR))

# Slicer's parameterNodeWrapper connectors (Docs/developer_guide/parameter_nodes/gui_connection.md)
CONNECTORS = {
    bool: {"QCheckBox", "ctkCheckBox", "QPushButton"},
    int: {"QSpinBox", "QSlider", "ctkSliderWidget"},
    float: {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider"},
    str: {"QLineEdit", "QTextEdit", "QLabel", "ctkPathLineEdit"},  # the last: PolyCLSlicerLib.gui_connectors
    enum.Enum: {"QComboBox", "ctkComboBox"},
    pathlib.Path: {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
QT_BUILTIN = {"QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QSpinBox", "QDoubleSpinBox",
              "QLineEdit", "QProgressBar", "QTableWidget", "QTextEdit", "QSlider"}


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def widgets(ui) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui.iter("widget")}


@pytest.fixture(scope="module")
def bindings(widgets) -> dict[str, list[str]]:
    """parameter name -> names of the widgets that carry it as SlicerParameterName."""
    bound: dict[str, list[str]] = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
                bound.setdefault(prop.findtext("string"), []).append(name)
    return bound


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def class_node(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def parameter_types() -> dict[str, object]:
    import PolyCLSlicer

    hints = typing.get_type_hints(PolyCLSlicer.PolyCLSlicerParameterNode, include_extras=True)
    return {name: typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            for name, hint in hints.items()}


def test_ui_parses_and_declares_its_custom_widgets(ui, widgets):
    assert ui.findtext("class") == "PolyCLSlicer"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "PolyCLSlicer"
    custom = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert used - QT_BUILTIN <= custom, f"undeclared custom widgets: {sorted(used - QT_BUILTIN - custom)}"
    assert len(widgets) == len(list(ui.iter("widget"))), "widget names must be unique"


def test_every_widget_the_code_looks_up_exists(widgets, module_tree):
    trees = [module_tree] + [ast.parse(path.read_text(encoding="utf-8"))  # the Widget's mixins (panel_jobs)
                             for path in sorted((MODULE_DIR / "PolyCLSlicerLib").glob("*.py"))]
    used = {node.attr for tree in trees for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    widget_class = class_node(module_tree, "PolyCLSlicerWidget")
    for node in ast.walk(widget_class):  # names listed as strings, e.g. ACTION_BUTTONS
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ACTION_BUTTONS" for t in node.targets):
            used |= {elt.value for elt in node.value.elts}
    assert used, "the Widget looks up no widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used in PolyCLSlicer.py but missing from the .ui: {missing}"


def test_every_parameter_is_bound_to_a_compatible_widget(widgets, bindings):
    import slicer

    types = parameter_types()
    assert set(bindings) <= set(types), f"unknown SlicerParameterName: {sorted(set(bindings) - set(types))}"
    for name, kind in types.items():
        assert name in bindings, f"parameter {name!r} is not bound to any widget"
        assert len(bindings[name]) == 1, f"parameter {name!r} is bound to several widgets: {bindings[name]}"
        widget = widgets[bindings[name][0]]
        if isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
            allowed = CONNECTORS["node"]
            node_types = [s.text for s in widget.iter("string") if s.text and s.text.startswith("vtkMRML")]
            assert kind.__name__ in node_types, f"{widget.get('name')}: nodeTypes {node_types} lack {kind.__name__}"
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            allowed = CONNECTORS[enum.Enum]
        else:
            allowed = CONNECTORS[kind]
        assert widget.get("class") in allowed, f"{name}: {widget.get('class')} cannot bind a {kind}"


def test_mrml_widgets_receive_the_scene(ui, widgets):
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {n for n, w in widgets.items() if w.get("class", "").startswith("qMRML") and n != "PolyCLSlicer"}
    assert mrml_widgets <= receivers, f"not connected to mrmlSceneChanged: {sorted(mrml_widgets - receivers)}"


def calls_in(function: ast.FunctionDef) -> list[str]:
    names = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            target = node.func
            names.append(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def test_parameter_node_only_after_ui_and_no_install_in_constructor(module_tree):
    widget = class_node(module_tree, "PolyCLSlicerWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    forbidden = {"getParameterNode", "initializeParameterNode", "setParameterNode", "install", "pip_install",
                 "pip_ensure", "_ensureDependencies"}
    assert not forbidden & set(calls_in(methods["__init__"])), "the constructor must not touch parameters or pip"
    setup = methods["setup"]
    ui_line = min(n.lineno for n in ast.walk(setup) if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Attribute) and t.attr == "ui" for t in n.targets))
    init_lines = [n.lineno for n in ast.walk(setup) if isinstance(n, ast.Call)
                  and getattr(n.func, "attr", "") == "initializeParameterNode"]
    assert init_lines and min(init_lines) > ui_line, "parameter node must be created after self.ui exists"
    assert not {"install", "pip_install", "pip_ensure", "_ensureDependencies"} & set(calls_in(setup))
    # installs happen only in reaction to a button press
    callers = [name for name, f in methods.items() if "_ensureDependencies" in calls_in(f)]
    assert callers and all(name.startswith("on") and name.endswith("Button") for name in callers), callers


def test_widget_stays_small_and_logic_holds_the_work(module_tree):
    widget = class_node(module_tree, "PolyCLSlicerWidget")
    assert widget.end_lineno - widget.lineno < 400, "the Widget should only gather options and show results"
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    import PolyCLSlicer

    logic = PolyCLSlicer.PolyCLSlicerLogic  # the task methods come from PolyCLSlicerLib mixins
    for name in ("segment", "segmentTask", "refine", "refineTask", "propagate", "propagateTask", "finetune",
                 "finetuneTask", "suggestSlice", "suggestSliceTask"):
        assert callable(getattr(logic, name, None)), f"PolyCLSlicerLogic.{name} is missing"


def test_importing_the_module_loads_neither_torch_nor_qt():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import PolyCLSlicer as m; "
            "print(m.HAS_APP, 'torch' in sys.modules, 'qt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr


def test_resources_are_real(tmp_path):
    from PolyCLSlicerLib import dependencies, terminology

    png = (MODULE_DIR / "Resources" / "Icons" / "PolyCLSlicer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 500
    content = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    (category,) = content["SegmentationCodes"]["Category"]
    assert (category["CodingSchemeDesignator"], category["CodeValue"]) == ("SCT", "123037004")
    assert [(t["CodeValue"], t["CodeMeaning"]) for t in category["Type"]] == [("10200004", "Liver")]
    text, color = terminology.liver_terminology()
    assert text.startswith(content["SegmentationCategoryTypeContextName"] + "~SCT^123037004^")
    assert all(0 <= c <= 1 for c in color)
    listed = {r.split("=")[0].split(">")[0].split("<")[0].lower() for r in dependencies.file_requirements()}
    groups = (dependencies.CORE, dependencies.LITEMEDSAM, dependencies.BATCH)
    known = {r.split("=")[0].split(">")[0].lower() for group in groups for r in group.values()}
    assert listed == known, f"requirements.txt and dependencies.py disagree: {listed ^ known}"


def test_cmake_lists_every_module_file():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "PolyCLSlicer")
    for name in ("PolyCLSlicer.py", "Resources/UI/PolyCLSlicer.ui", "Resources/Icons/PolyCLSlicer.png",
                 "Resources/requirements.txt", "Resources/polycl_liver.term.json", "WITH_GENERIC_TESTS"):
        assert name in cmake, f"{name} missing from PolyCLSlicer/CMakeLists.txt"
    for folder in ("PolyCLSlicerLib", "polycl"):
        assert folder in cmake
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "add_subdirectory(PolyCLSlicer)"):
        assert key in top, f"{key} missing from the extension CMakeLists.txt"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top


def test_sample_data_registration_matches_the_local_files(monkeypatch):
    import hashlib
    import types

    import PolyCLSlicer
    from conftest import shared_data_dir

    calls = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    PolyCLSlicer.registerSampleData()
    (kwargs,) = calls
    assert kwargs["category"] == "PolyCL" and kwargs["sampleName"] == "PolyCLLiverCT"
    assert len(kwargs["uris"]) == len(kwargs["fileNames"]) == len(kwargs["checksums"]) == len(kwargs["nodeNames"])
    assert kwargs["loadFileTypes"] == ["VolumeFile", "SegmentationFile"] and "loadFileType" not in kwargs
    assert Path(kwargs["thumbnailFileName"]).is_file()
    data = shared_data_dir()
    if data is None:
        pytest.skip("shared data not found: checksums not compared")
    for name, checksum in zip(kwargs["fileNames"], kwargs["checksums"], strict=True):
        local = data / PolyCLSlicer.sample_data.SAMPLE_LOCAL[name]
        assert checksum == "SHA256:" + hashlib.sha256(local.read_bytes()).hexdigest(), name


def test_annotation_selector_starts_at_none(widgets):
    """qMRMLSegmentSelectorWidget with noneEnabled=false selects the first segment ('Liver') by itself."""
    selector = widgets["annotationSegmentSelector"]
    props = {p.get("name"): p for p in selector.findall("property")}
    assert props["noneEnabled"].findtext("bool") == "true"


def test_file_parameters_are_empty_strings_in_path_line_edits(widgets, bindings):
    """Path parameters would show '.' when empty; ours are str ('' = no file) in ctkPathLineEdit."""
    import PolyCLSlicer

    types = parameter_types()
    for name in ("checkpointPath", "samCheckpoint", "sam2Checkpoint"):
        assert types[name] is str and getattr(PolyCLSlicer.PolyCLSlicerParameterNode, name) == ""
        assert widgets[bindings[name][0]].get("class") == "ctkPathLineEdit"
    assert pathlib.Path not in types.values()

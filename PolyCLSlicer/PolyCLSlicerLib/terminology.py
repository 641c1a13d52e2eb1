"""The liver's SNOMED CT terminology (``Resources/polycl_liver.term.json``) and colour on Slicer segments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import slicer

TERMINOLOGY_FILE = Path(__file__).resolve().parent.parent / "Resources" / "polycl_liver.term.json"


ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


# ----------------------------------------------------------------------------------- terminology
def register_terminology() -> None:
    """Make the PolyCL liver terminology known to the app's Terminologies module (no-op without the app)."""
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "terminologies"):
        modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))


def liver_terminology(path: str | os.PathLike = TERMINOLOGY_FILE) -> tuple[str, tuple[float, float, float]]:
    """Slicer terminology entry string and recommended colour (0-1) of the liver in our .term.json."""
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    context = content["SegmentationCategoryTypeContextName"]
    for category in content["SegmentationCodes"]["Category"]:
        for entry in category.get("Type", []):
            if entry["CodeValue"] == "10200004":
                text = f"{context}~{_code(category)}~{_code(entry)}~^^~{ANATOMIC_CONTEXT}~^^~^^"
                rgb = tuple(v / 255.0 for v in entry.get("recommendedDisplayRGBValue", (221, 130, 101)))
                return text, rgb
    raise KeyError(f"{path}: no SNOMED CT liver (10200004) entry")


def _code(entry: dict) -> str:
    return f"{entry['CodingSchemeDesignator']}^{entry['CodeValue']}^{entry['CodeMeaning']}"


def set_liver_terminology(segment: slicer.vtkSegment) -> None:
    terminology, color = liver_terminology()
    name = segment.GetName()
    segment.SetTerminology(terminology)
    segment.SetColor(*color)
    segment.SetName(name)


def is_liver_segment(segment: slicer.vtkSegment) -> bool:
    """Liver by SNOMED CT code in its terminology, else by name."""
    terminology = segment.GetTerminology() or ""
    return "^10200004^" in terminology or segment.GetName().strip().lower().startswith("liver")

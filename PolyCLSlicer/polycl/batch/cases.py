"""Which cases a batch holds and what it writes for each: inputs (files, folders, DICOM series folders, CSV or text
lists of paths), one output stem per input, the output files per format, and which of them are still missing.

Torch-free and Dask-free: the client plans here, the workers only receive a :class:`Case` (paths, not arrays).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io.cases import CaseDiscoveryError, find_ct_inputs, strip_suffix

LIST_SUFFIXES = (".csv", ".txt", ".lst")
FORMATS = ("nii.gz", "nrrd", "seg.nrrd", "mha", "dcm")  # dcm: DICOM SEG (DICOM series inputs only)
ATTEMPTS_FOLDER = ".polycl-batch"  # per-case attempt records beside the outputs (worker deaths, resumes)


def output_name(stem: str, output_format: str) -> str:
    """``case.seg.nrrd`` (a Slicer segmentation, segment "Liver"), else ``case_liver.<format>``."""
    if output_format not in FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; use one of {', '.join(FORMATS)}")
    return f"{stem}.seg.nrrd" if output_format == "seg.nrrd" else f"{stem}_liver.{output_format}"


def overlay_name(stem: str) -> str:
    return f"{stem}_liver.png"


@dataclass(frozen=True)
class Case:
    """One input and the files the batch writes for it; ``missing`` are the ones this run writes."""

    input: Path
    stem: str
    targets: tuple[Path, ...]
    overlay: Path | None
    missing: tuple[Path, ...]

    @property
    def name(self) -> str:
        return self.input.name

    @property
    def outputs(self) -> tuple[Path, ...]:
        return self.targets + ((self.overlay,) if self.overlay else ())

    @property
    def pending(self) -> bool:
        return bool(self.missing)


def read_path_list(path: Path) -> list[Path]:
    """Paths from a CSV (first column; a header row is skipped) or a text file (one a line, ``#`` comments);
    relative paths are taken from the list's folder."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        if path.suffix.lower() == ".csv":
            cells = [row[0].strip() for row in csv.reader(handle) if row and row[0].strip()]
        else:
            cells = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    paths = [Path(cell) if Path(cell).is_absolute() else path.parent / cell for cell in cells]
    if paths and not paths[0].exists() and path.suffix.lower() == ".csv":
        paths = paths[1:]  # a header such as "path" or "ct"
    return paths


def find_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """CT files as given, folders' CT volumes (label files and this tool's outputs are never inputs), DICOM series
    folders, and the paths listed in ``.csv`` / ``.txt`` files; FileNotFoundError for a path that does not exist."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        listed = path.is_file() and path.name.lower().endswith(LIST_SUFFIXES)
        expanded.extend(read_path_list(path) if listed else [path])
    try:
        return find_ct_inputs(expanded) if expanded else []
    except CaseDiscoveryError as error:
        if "no such file" in str(error):
            raise FileNotFoundError(str(error)) from None
        return []


def unique_stems(inputs: Sequence[Path]) -> list[str]:
    """Each input's output stem: its name without the volume extension, ``_`` added until unique."""
    stems: list[str] = []
    for path in inputs:
        stem = strip_suffix(path.name)
        while stem in stems:  # a.nii.gz and a.nrrd in one folder
            stem += "_"
        stems.append(stem)
    return stems


def plan_cases(inputs: Sequence[Path], output_dir: Path, formats: Sequence[str], overlay: bool = False,
               overwrite: bool = False) -> list[Case]:
    """One :class:`Case` per input; an existing output is kept (not in ``missing``) unless ``overwrite``."""
    if not formats:
        raise ValueError("no output format given")
    cases = []
    for path, stem in zip(inputs, unique_stems(inputs), strict=True):
        targets = tuple(output_dir / output_name(stem, fmt) for fmt in dict.fromkeys(formats))
        picture = output_dir / overlay_name(stem) if overlay else None
        outputs = targets + ((picture,) if picture else ())
        missing = outputs if overwrite else tuple(p for p in outputs if not p.exists())
        cases.append(Case(path, stem, targets, picture, missing))
    return cases


def attempts_file(case: Case) -> Path:
    """Where the workers record each start of ``case`` (one line per attempt)."""
    folder = (case.targets or (case.overlay,))[0].parent
    return folder / ATTEMPTS_FOLDER / f"{case.stem}.attempts"


def remove_stale_temporaries(case: Case) -> None:
    """Temporary files that a killed worker left beside ``case``'s outputs (``atomic_write`` names them
    ``.<target>.<random><suffix>``): a renamed output is complete, a temporary one is never used."""
    for target in case.missing:
        for stale in target.parent.glob(f".{target.name}.*"):
            stale.unlink(missing_ok=True)

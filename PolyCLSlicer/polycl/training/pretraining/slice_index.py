"""Slice index over a set of CT volumes: scan id, position and organ presence T(s) of every slice.

Slices are axial slices of the canonical orientation (inferior -> superior, taken through
``CanonicalOrientation``, never raw array axes).  Organ presence comes from a label volume
(``<case>_ct.nii.gz`` <-> ``<case>_liver.nii.gz``, or the same file name in a labels folder) or
from a per-slice flag list; it is ``-1`` (unknown) otherwise.

Per-volume records and the windowed, resized slices are cached on disk (default
``$POLYCL_CACHE`` or ``~/.cache/polycl``) keyed on the file path, size and modification time, so
re-runs never re-read a volume that did not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...geometry import CanonicalOrientation
from ...io.base import atomic_write
from ...io.cases import VOLUME_SUFFIXES, case_name, find_volumes, is_label_file  # noqa: F401  (re-exported)
from ...io.volumes import read_mask, read_volume
from ...preprocessing import middle_slices, resize_slices, window
from ...progress import CancelFlag, check_cancel

CACHE_VERSION = "1"
UNKNOWN = -1


class SliceIndexError(ValueError):
    """The inputs cannot form a slice index (no volumes, bad flag lists, mismatched labels)."""


@dataclass
class ScanInfo:
    """One indexed volume."""

    name: str
    source: str
    num_slices: int
    label_source: str | None = None
    presence_from: str = "none"  # "label" | "flags" | "none"
    spacing_mm: list[float] = field(default_factory=list)


@dataclass
class SliceIndex:
    """Flat per-slice arrays over all scans (N slices); ``images`` is (N, 1, S, S) when loaded."""

    scans: list[ScanInfo]
    scan: np.ndarray  # int32 (N,) scan number
    position: np.ndarray  # int32 (N,) canonical slice position inside its scan
    presence: np.ndarray  # int8 (N,) 1 organ present, 0 absent, -1 unknown
    images: torch.Tensor | None = None
    input_size: int | None = None

    def __len__(self) -> int:
        return int(len(self.scan))

    @classmethod
    def from_arrays(cls, scan: Sequence[int], presence: Sequence[int] | None = None,
                    names: Sequence[str] | None = None) -> SliceIndex:
        """Synthetic index (tests, per-slice flag experiments): scan number of every slice, in order."""
        scan = np.asarray(scan, np.int32)
        count = int(scan.max()) + 1 if len(scan) else 0
        position = np.zeros(len(scan), np.int32)
        for s in range(count):
            where = np.flatnonzero(scan == s)
            position[where] = np.arange(len(where))
        presence_arr = (np.full(len(scan), UNKNOWN, np.int8) if presence is None
                        else np.asarray(presence, np.int8))
        scans = [ScanInfo(names[s] if names else f"scan{s}", "", int((scan == s).sum()),
                          presence_from="none" if presence is None else "flags") for s in range(count)]
        return cls(scans, scan, position, presence_arr)

    def anchor_indices(self, fraction: float | None = 0.3) -> np.ndarray:
        """Indices of the middle ``fraction`` of each scan's slices (all slices for None / 1)."""
        if not fraction or fraction >= 1:
            return np.arange(len(self))
        keep = []
        for s in range(len(self.scans)):
            where = np.flatnonzero(self.scan == s)
            keep.append(where[middle_slices(len(where), fraction)] if len(where) else where)
        return np.concatenate(keep) if keep else np.zeros(0, np.int64)

    def summary(self) -> dict:
        """Counts for model cards and logs."""
        return {
            "scans": [info.name for info in self.scans],
            "slices": len(self),
            "slices_with_organ": int((self.presence == 1).sum()),
            "slices_without_organ": int((self.presence == 0).sum()),
            "slices_presence_unknown": int((self.presence == UNKNOWN).sum()),
        }


# ---------------------------------------------------------------------------------------------
# Discovering volumes and labels


def find_label(volume: Path, labels_dir: str | os.PathLike | None = None,
               organ: str = "liver") -> Path | None:
    """The label volume of a CT: ``<case>_<organ>.*`` (or the CT's own file name in ``labels_dir``)."""
    case = case_name(volume)
    folders = [Path(labels_dir)] if labels_dir else []
    folders.append(volume.parent)
    for folder in folders:
        if not folder.is_dir():
            continue
        for suffix in VOLUME_SUFFIXES + (".seg.nrrd",):
            candidate = folder / f"{case}_{organ}{suffix}"
            if candidate.is_file():
                return candidate
        if labels_dir and folder == Path(labels_dir) and (folder / volume.name).is_file() \
                and folder.resolve() != volume.parent.resolve():
            return folder / volume.name
    return None


def load_flags(path: str | os.PathLike) -> dict[str, list[int]]:
    """Per-slice presence flags from JSON, keyed by case name (keys starting with "_" are comments).

    Either a list ``[0, 1, -1, ...]`` (canonical order, inferior first; -1 = unknown) or ranges
    ``{"num_slices": N, "present": [[first, last], ...], "absent": [[first, last], ...]}``
    (inclusive); slices in no range are absent, or unknown when "absent" ranges are given.
    """
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SliceIndexError(f"{path}: cannot read presence flags ({error})") from None
    if not isinstance(raw, dict):
        raise SliceIndexError(f"{path}: presence flags must be a JSON object keyed by case name")
    flags = {}
    for case, value in raw.items():
        if case.startswith("_"):
            continue
        if isinstance(value, dict):
            try:
                count = int(value["num_slices"])
                row = np.full(count, UNKNOWN if "absent" in value else 0, np.int8)
                for key, flag in (("absent", 0), ("present", 1)):
                    for first, last in value.get(key, []):
                        row[int(first): int(last) + 1] = flag
            except (KeyError, TypeError, ValueError):
                raise SliceIndexError(f"{path}: flags of {case!r} need num_slices and ranges") from None
            flags[case] = row.tolist()
        else:
            flags[case] = [int(v) for v in value]
    return flags


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$POLYCL_CACHE``, else the platform user cache (platformdirs when installed), else ~/.cache."""
    if os.environ.get("POLYCL_CACHE"):
        return Path(os.environ["POLYCL_CACHE"])
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("polycl"))
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polycl"


def _fingerprint(path: Path | None) -> list:
    if path is None:
        return []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(volume: Path, label: Path | None) -> str:
    """Hash of path + size + mtime of the volume (and its label)."""
    payload = json.dumps([CACHE_VERSION, str(volume.resolve()), _fingerprint(volume), _fingerprint(label)])
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def _read_scan(volume: Path, label: Path | None, size: int | None) -> tuple[dict, np.ndarray | None]:
    ct = read_volume(volume)
    orientation = CanonicalOrientation.from_matrix(ct.ijk_to_ras)
    canonical = orientation.to_canonical(ct.array)
    record = {"num_slices": int(canonical.shape[0]),
              "spacing_mm": [round(float(s), 4) for s in ct.spacing],
              "presence": None}
    if label is not None:
        mask = orientation.to_canonical(read_mask(label, reference=ct).array)
        record["presence"] = [int(v) for v in mask.reshape(mask.shape[0], -1).any(1)]
    images = None
    if size is not None:
        tensor = window(torch.from_numpy(np.ascontiguousarray(canonical, np.float32))[:, None])
        images = resize_slices(tensor, size).numpy().astype(np.float16)
    return record, images


def build_slice_index(paths: Iterable[str | os.PathLike], labels: str | os.PathLike | None = None,
                      flags: Mapping[str, Sequence[int]] | str | os.PathLike | None = None,
                      size: int | None = None, cache_dir: str | os.PathLike | None = None,
                      use_cache: bool = True, write_cache: bool = True, organ: str = "liver",
                      progress: Callable[[float, str], None] | None = None,
                      cancel: CancelFlag | None = None) -> SliceIndex:
    """Index every axial slice of the CT volumes under ``paths`` (files, folders, DICOM folders).

    ``size`` also loads the windowed slices resized to ``size`` x ``size`` (``index.images``).
    ``flags`` (mapping or JSON file, see ``load_flags``) gives T(s) for scans without labels;
    a label volume wins over flags.  ``write_cache=False`` reads the cache without writing
    (non-zero ranks of a distributed run).
    """
    volumes = find_volumes(paths)
    flag_map = load_flags(flags) if isinstance(flags, (str, os.PathLike)) else dict(flags or {})
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    scans, scan_col, pos_col, pres_col, image_parts = [], [], [], [], []
    names_seen: dict[str, int] = {}
    for number, volume in enumerate(volumes):
        check_cancel(cancel, "slice indexing")
        if progress:
            progress(number / len(volumes), f"indexing {volume.name}")
        label = find_label(volume, labels, organ)
        key = cache_key(volume, label)
        record_path = cache / "index" / f"{key}.json"
        images_path = cache / "slices" / f"{key}_{size}.npy"
        record = images = None
        if use_cache and record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
                if size is not None:
                    images = np.load(images_path) if images_path.is_file() else None
            except (OSError, ValueError):
                record = images = None
        if record is None or (size is not None and images is None):
            record, images = _read_scan(volume, label, size)
            if write_cache:
                atomic_write(record_path, lambda p, r=record: p.write_text(json.dumps(r)))
                if images is not None:
                    atomic_write(images_path, lambda p, a=images: _save_npy(p, a))
        name = case_name(volume)
        names_seen[name] = names_seen.get(name, 0) + 1
        if names_seen[name] > 1:
            name = f"{name}#{names_seen[name]}"
        count = record["num_slices"]
        presence = record["presence"]
        source = "label" if presence is not None else "none"
        if presence is None and (name in flag_map or str(volume) in flag_map):
            presence = list(flag_map.get(name, flag_map.get(str(volume))))
            source = "flags"
            if len(presence) != count:
                raise SliceIndexError(f"presence flags of {name}: {len(presence)} values for {count} slices")
            if any(v not in (0, 1, UNKNOWN) for v in presence):
                raise SliceIndexError(f"presence flags of {name} must be 1, 0 or -1 (unknown)")
        scans.append(ScanInfo(name, str(volume), count, str(label) if label else None, source,
                              record.get("spacing_mm", [])))
        scan_col.append(np.full(count, number, np.int32))
        pos_col.append(np.arange(count, dtype=np.int32))
        pres_col.append(np.asarray(presence if presence is not None else [UNKNOWN] * count, np.int8))
        if images is not None:
            image_parts.append(images)
    unused = set(flag_map) - {s.name for s in scans} - {s.source for s in scans}
    if unused:
        warnings.warn(f"presence flags given for unknown cases: {', '.join(sorted(unused))}", stacklevel=2)
    if progress:
        progress(1.0, f"indexed {len(scans)} scans")
    index = SliceIndex(scans, np.concatenate(scan_col), np.concatenate(pos_col), np.concatenate(pres_col),
                       input_size=size)
    if size is not None:
        index.images = torch.from_numpy(np.concatenate(image_parts))
    return index


def describe(index: SliceIndex) -> dict:
    """JSON-able description of the indexed data (for model cards)."""
    return {**index.summary(), "volumes": [asdict(info) for info in index.scans]}

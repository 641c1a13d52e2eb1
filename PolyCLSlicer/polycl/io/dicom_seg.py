"""Liver masks as DICOM Segmentation objects (DICOM SEG), written and read with ``highdicom``.

Written: a BINARY SEG with one *Liver* segment (codes from ``seg_nrrd.LIVER_TERMINOLOGY``, the one source
of the project's terminology), the algorithm that made it, and one frame per slice of the source series,
each frame referencing the source image it was derived from.  The mask's grid is matched to the series'
grid through both affines (``highdicom.Volume.match_geometry``: axis permutation and flips, no
resampling), so any array orientation lands on the right slices.

Read: the liver segment as a 0/1 mask, on a reference CT's grid when one is given (padding slices the SEG
omits), else on the grid of the SEG's own plane positions (the [column, row, frame] order a DICOM series
reads in).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .base import LPS_TO_RAS, Volume, VolumeReadError, atomic_write
from .seg_nrrd import LIVER_COLOR, LIVER_TERMINOLOGY

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LIVER_TYPE = ("SCT", "10200004")
MISSING_LIBRARY = "DICOM SEG needs the highdicom package: pip install highdicom"


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise ImportError(MISSING_LIBRARY) from None
    return highdicom


def check_available() -> None:
    """Raise ImportError with the install command when highdicom is missing (call before any work)."""
    _highdicom()


def terminology_codes(terminology: str = LIVER_TERMINOLOGY) -> tuple:
    """(category, type) as pydicom Codes from a Slicer terminology string (``context~SCH^value^meaning~...``)."""
    from pydicom.sr.coding import Code

    fields = terminology.split("~")
    codes = []
    for field in fields[1:3]:
        scheme, value, meaning = field.split("^")
        codes.append(Code(value=value, scheme_designator=scheme, meaning=meaning))
    return tuple(codes)


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """True for a DICOM file (``DICM`` after the 128-byte preamble) whose SOP class is Segmentation Storage."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        handle.seek(128)
        if handle.read(4) != b"DICM":
            return False
    try:
        import pydicom
    except ImportError:
        raise VolumeReadError(f"{path}: a DICOM file; reading it as a mask needs highdicom: pip install highdicom")\
            from None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # a damaged DICOM file: not a SEG we can read; the volume reader says what is wrong
        return False
    return str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS


SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def fill_missing_uids(datasets: list) -> list[str]:
    """Give the in-memory source datasets one generated UID for each of Study / Series / Frame of Reference
    Instance UID that is empty in all of them (anonymisers blank them; a SEG with empty UIDs cannot be filed
    by a PACS), and warn once per UID: the SEG then references that UID, not the files'.  The names filled."""
    from pydicom.uid import generate_uid

    filled = []
    for key in SERIES_UIDS:
        if any(str(dataset.get(key, "")).strip() for dataset in datasets):
            continue
        uid = generate_uid()
        for dataset in datasets:
            setattr(dataset, key, uid)
        filled.append(key)
    if filled:
        warnings.warn(f"the DICOM series has no {', '.join(filled)}: the DICOM SEG uses new UIDs in their place "
                      "(its references to the series' images stay valid by SOP Instance UID)", stacklevel=3)
    return filled


def _sorted_sources(files: list[str]) -> list:
    """The series' datasets (pixel data not loaded) in volume order (highdicom's sort; regular spacing)."""
    import pydicom

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for dataset in datasets:
        if "ImagePositionPatient" not in dataset or "ImageOrientationPatient" not in dataset:
            raise ValueError(f"{dataset.filename}: no ImagePositionPatient / ImageOrientationPatient; "
                             "a DICOM SEG needs a CT series with slice geometry")
        for key in ("SOPClassUID", "SOPInstanceUID"):  # some anonymisers blank them; the file meta keeps them
            if not str(dataset.get(key, "")).strip():
                setattr(dataset, key, dataset.file_meta.get(f"MediaStorage{key}", ""))
        if "SpecificCharacterSet" in dataset and not any(str(v).strip() for v in
                                                         np.atleast_1d(dataset.SpecificCharacterSet)):
            del dataset.SpecificCharacterSet  # empty = the default repertoire; highdicom refuses ''
    fill_missing_uids(datasets)
    if len(datasets) == 1:
        return datasets, float(datasets[0].get("SpacingBetweenSlices", 0) or datasets[0].get("SliceThickness", 1))
    step, order = _highdicom().spatial.get_series_volume_positions(datasets)
    if step is None:
        raise ValueError("the DICOM series' slices are not regularly spaced; a DICOM SEG cannot reference it")
    return [datasets[order.index(n)] for n in range(len(datasets))], float(step)


def _series_geometry(sources: list, step: float):
    """highdicom VolumeGeometry (frame, row, column) of single-frame source images in volume order."""
    hd = _highdicom()
    first = sources[0]
    return hd.VolumeGeometry.from_attributes(
        image_position=first.ImagePositionPatient, image_orientation=first.ImageOrientationPatient, rows=first.Rows,
        columns=first.Columns, pixel_spacing=first.PixelSpacing, spacing_between_slices=step,
        number_of_frames=len(sources), coordinate_system="PATIENT",
        frame_of_reference_uid=first.get("FrameOfReferenceUID"))


def build_dicom_seg(mask: np.ndarray, ijk_to_ras: np.ndarray, source_files: list[str], algorithm: str,
                    version: str, automatic: bool = True):
    """The highdicom Segmentation of a binary ``[i, j, k]`` mask on the grid of the source series."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sources, step = _sorted_sources(source_files)
    geometry = _series_geometry(sources, step)
    volume = hd.Volume(array=(np.asarray(mask) > 0).astype(np.uint8), affine=LPS_TO_RAS @ np.asarray(ijk_to_ras),
                       coordinate_system="PATIENT", frame_of_reference_uid=geometry.frame_of_reference_uid)
    volume = volume.match_orientation(geometry)  # permutation and flips through both affines
    if not volume.geometry_equal(geometry, tol=1e-3):  # mm; ITK and the DICOM strings round differently
        raise ValueError("the mask is not on the DICOM series' voxel grid; a DICOM SEG can only reference "
                         "the series the mask was computed on")
    category, property_type = terminology_codes()
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver", segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type="AUTOMATIC" if automatic else "SEMIAUTOMATIC",
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm[:64], family=codes.cid7162.ArtificialIntelligence, version=version[:64]),
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in LIVER_COLOR)))
    with warnings.catch_warnings():  # the source's patient name is copied as it is; not the user's problem here
        warnings.filterwarnings("ignore", message="The string .* is unlikely to represent", category=UserWarning)
        return _segmentation(hd, sources, volume, description, algorithm)


def _segmentation(hd, sources: list, volume, description, algorithm: str):
    from .. import __version__

    return hd.seg.Segmentation(
        source_images=sources, pixel_array=volume, segmentation_type="BINARY",
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="PolyCLSlicer",
        manufacturer_model_name=algorithm[:64], software_versions=f"polycl {__version__}",
        device_serial_number="none", series_description="PolyCL liver segmentation",
        content_label="LIVER", omit_empty_frames=False)


def write_dicom_seg(path: str | os.PathLike, mask: np.ndarray, ijk_to_ras: np.ndarray, source_files: list[str],
                    algorithm: str, version: str, automatic: bool = True) -> Path:
    """Write ``mask`` as a DICOM SEG referencing ``source_files`` (the CT series), atomically."""
    seg = build_dicom_seg(mask, ijk_to_ras, source_files, algorithm, version, automatic)
    return atomic_write(path, lambda temp: seg.save_as(temp), suffix=".dcm")


def _liver_segment(seg, path: Path) -> int:
    """The segment number to read: the only segment, or the one coded (or labelled) as liver."""
    segments = list(seg.SegmentSequence)
    if len(segments) == 1:
        return int(segments[0].SegmentNumber)

    def is_liver(item) -> bool:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        return (code.CodingSchemeDesignator, code.CodeValue) == LIVER_TYPE or "liver" in item.SegmentLabel.lower()

    livers = [int(item.SegmentNumber) for item in segments if is_liver(item)]
    if len(livers) != 1:
        labels = ", ".join(str(item.SegmentLabel) for item in segments[:6])
        raise VolumeReadError(f"{path}: DICOM SEG holds {len(segments)} segments ({labels}) and "
                              f"{len(livers) or 'none'} of them is the liver; export the liver segment alone")
    return livers[0]


def read_dicom_seg(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """The liver segment of a DICOM SEG as a 0/1 ``[i, j, k]`` mask (on ``reference``'s grid if given)."""
    hd = _highdicom()
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except (ValueError, AttributeError, OSError) as error:
        raise VolumeReadError(f"{path}: not a readable DICOM SEG ({error})") from None
    number = _liver_segment(seg, path)
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=True, relabel=True)
    except (RuntimeError, ValueError) as error:
        raise VolumeReadError(f"{path}: the SEG's frames do not form a regular 3D volume ({error})") from None
    if reference is None:
        volume = volume.permute_spatial_axes([2, 1, 0])  # (column, row, frame) ...
        if np.linalg.det(volume.affine[:3, :3]) < 0:  # ... frames along the slice normal: a series' [i, j, k]
            volume = volume.flip_spatial(2)
        return Volume(array=(volume.array > 0).astype(np.uint8), ijk_to_ras=LPS_TO_RAS @ volume.affine,
                      source=str(path))
    grid = hd.VolumeGeometry(affine=LPS_TO_RAS @ np.asarray(reference.ijk_to_ras, float),
                             spatial_shape=reference.array.shape, coordinate_system="PATIENT")
    voxels = int(np.count_nonzero(volume.array))
    try:
        volume = volume.match_geometry(grid)  # permutation, flips, and padding of the frames a SEG omits
    except RuntimeError:
        volume = None
    if volume is None or int(np.count_nonzero(volume.array)) != voxels:
        raise VolumeReadError(f"{path}: the SEG's frames do not lie on the image's voxel grid (another "
                              "series or a resampled one?); use the SEG of this series")
    return Volume(array=(volume.array > 0).astype(np.uint8), ijk_to_ras=np.asarray(reference.ijk_to_ras, float),
                  source=str(path))

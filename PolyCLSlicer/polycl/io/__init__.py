"""Reading and writing: volumes and masks (NIfTI, NRRD, MHA, DICOM series), DICOM SEG, ``.seg.nrrd``, overlays,
file integrity checks, case folders and the bundled / downloadable samples.

Modules: ``base`` (``Volume``, atomic writes: below every reader and writer), ``integrity``, ``dicom``,
``dicom_seg``, ``seg_nrrd``, ``volumes`` (``read_volume`` dispatches to the others), ``cases``, ``samples``,
``overlay``.
"""

from ..exports import lazy_exports

EXPORTS = {
    **dict.fromkeys(("Volume", "VolumeReadError", "atomic_write", "check_output_file", "MASK_SUFFIXES",
                     "LPS_TO_RAS", "image_from_array", "ijk_to_ras_from_image"), "base"),
    **dict.fromkeys(("read_volume", "read_mask", "write_volume", "write_mask", "check_same_grid"), "volumes"),
    **dict.fromkeys(("DEFAULT_SAMPLE", "SAMPLES", "fetch_sample", "sample_label", "data_dir"), "samples"),
    **dict.fromkeys(("read_dicom_seg", "write_dicom_seg"), "dicom_seg"),
    **dict.fromkeys(("list_series", "read_series", "DicomSeriesError"), "dicom"),
    "write_segmentation": "seg_nrrd",
    "write_overlay": "overlay",
    **dict.fromkeys(("find_volumes", "find_label_files", "case_name", "is_label_file"), "cases"),
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)

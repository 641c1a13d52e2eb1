"""The NIfTI header checks read NIfTI-1 and NIfTI-2 headers in either byte order without nibabel (issue 25)."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from polycl.io.integrity import IncompleteFileError, check_complete

AFFINE = np.array([[0.7, 0, 0, -90], [0, 0.8, 0, 40], [0, 0, 2.5, -300], [0, 0, 0, 1.0]])


def _saved(path, image_class, endianness="<", sform=None, shape=(5, 6, 7)):
    header = image_class.header_class(endianness=endianness)
    header.set_data_dtype(np.int16)
    header.set_qform(AFFINE, code=1)
    header.set_sform(AFFINE if sform is None else sform, code=2)
    nib.save(image_class(np.zeros(shape, np.int16), None, header=header), str(path))  # the header as set
    return path


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_complete_files_pass_and_truncated_ones_fail(tmp_path, image_class, endianness, suffix):
    path = _saved(tmp_path / f"ct{suffix}", image_class, endianness)
    assert nib.load(str(path)).header.endianness == endianness
    check_complete(path)
    if suffix == ".nii":
        path.write_bytes(path.read_bytes()[:-20])  # the last voxels are gone
        with pytest.raises(IncompleteFileError, match="truncated"):
            check_complete(path)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_a_singular_sform_fails_in_both_versions(tmp_path, image_class):
    flat = AFFINE.copy()
    flat[:3, 2] = 0  # the third axis has no length
    with pytest.raises(IncompleteFileError, match="sform"):
        check_complete(_saved(tmp_path / "flat.nii", image_class, sform=flat))


def test_not_a_nifti_header(tmp_path):
    path = tmp_path / "fake.nii"
    path.write_bytes(b"\x00" * 600)
    with pytest.raises(IncompleteFileError, match="not a NIfTI file"):
        check_complete(path)


def test_reading_a_nifti_ct_does_not_import_nibabel(tmp_path):
    path = _saved(tmp_path / "ct.nii.gz", nib.Nifti1Image)
    code = (f"import sys\nfrom polycl.io.volumes import read_volume\nvolume = read_volume({str(path)!r})\n"
            "assert volume.array.shape == (5, 6, 7)\nassert 'nibabel' not in sys.modules, 'nibabel was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-600:]

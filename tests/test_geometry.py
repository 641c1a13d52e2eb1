"""Geometry: lossless I/O round trips, RAS/LPS, canonical orientation, DICOM import, re-oriented copies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import oblique_matrix
from polycl.geometry import CanonicalOrientation, axial_axis
from polycl.io.volumes import read_volume, write_mask, write_volume


def world(matrix: np.ndarray, ijk) -> np.ndarray:
    return (matrix @ np.append(np.asarray(ijk, float), 1.0))[:3]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_write_read_round_trip_is_lossless(tmp_path, suffix):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(17, 13, 9)).astype(np.int16)
    matrix = oblique_matrix()
    path = write_volume(tmp_path / f"volume{suffix}", array, matrix)
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.ijk_to_ras, matrix, atol=1e-5)


def test_nifti_is_ras_and_nrrd_is_lps_on_disk(tmp_path):
    import nibabel as nib

    matrix = oblique_matrix()
    write_mask(tmp_path / "m.nii.gz", np.ones((4, 5, 6)), matrix)
    np.testing.assert_allclose(nib.load(tmp_path / "m.nii.gz").affine, matrix, atol=1e-5)
    write_mask(tmp_path / "m.nrrd", np.ones((4, 5, 6)), matrix)
    header = (tmp_path / "m.nrrd").read_bytes().split(b"\n\n")[0].decode()
    assert "left-posterior-superior" in header
    np.testing.assert_allclose(read_volume(tmp_path / "m.nrrd").ijk_to_ras, matrix, atol=1e-5)


def test_write_is_atomic_and_rejects_bad_extension(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        write_mask(tmp_path / "mask.png", np.ones((3, 3, 3)), np.eye(4))
    write_mask(tmp_path / "mask.nii.gz", np.ones((3, 3, 3)), np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


ALL_REINDEXINGS = [CanonicalOrientation(tuple(p), tuple(f))
                   for p in itertools.permutations(range(3)) for f in itertools.product([False, True], repeat=3)]


@pytest.mark.parametrize("reindex", ALL_REINDEXINGS, ids=str)
def test_canonical_orientation_is_exact_and_world_consistent(reindex):
    rng = np.random.default_rng(1)
    array = rng.random((5, 6, 7))
    matrix = oblique_matrix(angles=(0.2, 0.1, -0.25))
    # A re-indexed copy of the same world content (permuted / flipped array axes, adapted matrix).
    copy_array = reindex.to_canonical(array)
    copy_matrix = reindex.canonical_matrix(matrix, array.shape)
    np.testing.assert_array_equal(reindex.from_canonical(copy_array), array)
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        copy_ijk = np.argwhere(copy_array == array[ijk])[0]
        np.testing.assert_allclose(world(copy_matrix, copy_ijk), world(matrix, ijk), atol=1e-9)
    # Both copies map to the same canonical array: orientation comes from the matrix, not the axes.
    canonical_a = CanonicalOrientation.from_matrix(matrix).to_canonical(array)
    canonical_b = CanonicalOrientation.from_matrix(copy_matrix).to_canonical(copy_array)
    np.testing.assert_array_equal(canonical_a, canonical_b)


@pytest.mark.parametrize("reindex", ALL_REINDEXINGS, ids=str)
def test_from_canonical_result_is_laid_out_for_writing_without_a_reorder(reindex):
    """A canonical result handed back in volume axes is never reordered voxel by voxel: the canonical array's own
    memory when that is contiguous in volume axes (an axial CT as read, no flip), else a straight copy in the
    canonical memory order; either way the writer's (k, j, i) transpose of an axial CT is free
    (tests/test_fast_paths.py checks that on a real CT)."""
    array = np.random.default_rng(2).random((5, 6, 7))
    canonical = np.ascontiguousarray(reindex.to_canonical(array))  # the network's canonical output
    back = reindex.from_canonical_result(canonical)
    np.testing.assert_array_equal(back, array)
    assert np.transpose(back, reindex.permutation).flags.c_contiguous  # canonical memory order
    assert np.shares_memory(back, canonical) == (not any(reindex.flips))  # copied only to undo a flip

def test_canonical_axes_point_superior_posterior_left():
    matrix = oblique_matrix(angles=(0.3, 0.2, -0.35))
    orientation = CanonicalOrientation.from_matrix(matrix)
    canonical = orientation.canonical_matrix(matrix, (10, 11, 12))[:3, :3]
    canonical = canonical / np.linalg.norm(canonical, axis=0)
    assert np.argmax(np.abs(canonical[:, 0])) == 2 and canonical[2, 0] > 0  # superior
    assert np.argmax(np.abs(canonical[:, 1])) == 1 and canonical[1, 1] < 0  # posterior
    assert np.argmax(np.abs(canonical[:, 2])) == 0 and canonical[0, 2] < 0  # left


def test_axial_axis_follows_direction_not_array_order():
    coronal_acquisition = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])
    assert axial_axis(coronal_acquisition) == 1
    assert axial_axis(np.diag([0.7, 0.7, 5.0, 1.0])) == 2
    assert axial_axis(np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])) == 0


def test_dicom_series_matches_nifti_of_same_series(data_dir):
    dicom = read_volume(data_dir / "dicom" / "totalseg_series")
    nifti = read_volume(data_dir / "labeled" / "totalseg_dcm_ct.nii.gz")
    np.testing.assert_array_equal(dicom.array, nifti.array)
    np.testing.assert_allclose(dicom.ijk_to_ras, nifti.ijk_to_ras, atol=1e-3)


def test_dicom_seg_label_map_nrrd_is_read_in_ras(data_dir):
    label = read_volume(data_dir / "dicom" / "dcmqi_3slice" / "liver_seg.nrrd")
    ct = read_volume(data_dir / "labeled" / "dcmqi_3slice_ct.nii.gz")
    assert label.array.shape == ct.array.shape
    np.testing.assert_allclose(label.ijk_to_ras[:3, :3], ct.ijk_to_ras[:3, :3], atol=1e-3)


def test_masks_are_written_as_0_1_with_at_most_one_copy(tmp_path):
    """A uint8 0/1 mask (what polycl makes) is written as it is; 0/255, bool or int masks become 0/1
    (positive = liver) in one copy; the file holds 0/1 either way."""
    from polycl.io.base import binary_uint8

    ones = np.zeros((4, 5, 6), np.uint8)
    ones[1:3, 2:4, 3:5] = 1
    assert binary_uint8(ones) is ones
    for other in (ones * 255, ones.astype(bool), ones.astype(np.int16) - (ones == 0)):  # the last: -1 / 1
        out = binary_uint8(other)
        assert out.dtype == np.uint8 and not np.shares_memory(out, other)
        np.testing.assert_array_equal(out, ones)
        write_mask(tmp_path / "m.nii.gz", other, np.eye(4))
        np.testing.assert_array_equal(read_volume(tmp_path / "m.nii.gz").array, ones)

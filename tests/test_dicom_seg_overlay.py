"""Issue 15, outputs people exchange: DICOM SEG (written with highdicom, geometry checked against the
source series, read back by pydicom / highdicom / polycl), ``polycl series``, and the ``--overlay`` PNG
(drawn in the patient's orientation, whatever the array axis order)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli_newcomer import no_work, readme_blocks, run_error, tiny_checkpoint  # noqa: F401  (no_work: fixture)

from polycl.cli.main import main
from polycl.io import samples
from polycl.io.base import LPS_TO_RAS
from polycl.io.volumes import check_same_grid, read_mask, read_volume

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")
SERIES = "dicom/totalseg_series"


def twin(array: np.ndarray, ijk_to_ras: np.ndarray, order=(1, 0, 2), flip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels (same patient image) stored in another axis order (stored axis a = old axis
    order[a]) with old axis ``flip`` reversed; the matrix follows."""
    stored = np.flip(array, flip).transpose(order)
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1.0
    for axis, old in enumerate(order):
        index_map[old, axis] = -1.0 if old == flip else 1.0
        index_map[old, 3] = array.shape[old] - 1 if old == flip else 0.0
    return np.ascontiguousarray(stored), np.asarray(ijk_to_ras, float) @ index_map


@pytest.fixture(scope="module")
def series(data_dir):
    """The 20-slice CT series, its liver mask with slices 0 and 7 emptied (frames must not be mixed up, and an
    empty slice keeps its own, empty frame)."""
    folder = data_dir / SERIES
    ct = read_volume(folder)
    mask = read_mask(data_dir / "labeled" / "totalseg_dcm_liver.nii.gz", ct).array.copy()
    mask[:40, :, :] = 1  # a band on one side only: a left-right or front-back flip would show
    mask[:, :, [0, 7]] = 0  # after the band, which would refill them (issue 26)
    assert not mask[:, :, [0, 7]].any() and mask[:, :, 1:7].any(axis=(0, 1)).all()
    from polycl.io.dicom import choose_series

    return folder, ct, mask, choose_series(folder).files


# ---------------------------------------------------------------------------------------- DICOM SEG
def test_dicom_seg_frames_match_the_source_slices_and_read_back_equal(series, tmp_path):
    from polycl.io.dicom_seg import write_dicom_seg
    from polycl.io.seg_nrrd import LIVER_TERMINOLOGY

    folder, ct, mask, files = series
    path = write_dicom_seg(tmp_path / "liver.dcm", mask, ct.ijk_to_ras, files, "PolyCLSlicer test model", "v1")
    seg = pydicom.dcmread(path)
    sources = {str(d.get("SOPInstanceUID") or d.file_meta.MediaStorageSOPInstanceUID): d
               for d in (pydicom.dcmread(f) for f in files)}
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == len(files)
    source_series = str(next(iter(sources.values())).SeriesInstanceUID)
    referenced = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    # the source's own UID; this anonymised series has none, so a new valid one (issue 22)
    assert referenced == source_series if source_series else pydicom.uid.UID(referenced).is_valid
    shared = seg.SharedFunctionalGroupsSequence[0]
    ijk_from_lps = np.linalg.inv(LPS_TO_RAS @ ct.ijk_to_ras)
    frames = seg.pixel_array
    seen = set()
    for number, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[uid]
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, np.asarray(source.ImagePositionPatient, float), atol=1e-3)
        np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                                   np.asarray(source.ImageOrientationPatient, float), atol=1e-4)
        np.testing.assert_allclose(np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float),
                                   np.asarray(source.PixelSpacing, float), atol=1e-4)
        # Frame pixel (row r, column c) sits at position + c * column step + r * row step: find its voxel.
        cosines = np.asarray(source.ImageOrientationPatient, float)
        row_mm, col_mm = (float(v) for v in source.PixelSpacing)
        origin, along_c, along_r = ((ijk_from_lps @ np.append(p, 1.0))[:3] for p in (
            position, position + col_mm * cosines[:3], position + row_mm * cosines[3:]))
        np.testing.assert_allclose([along_c - origin, along_r - origin], [[1, 0, 0], [0, 1, 0]], atol=1e-3)
        k = int(round(origin[2]))
        assert np.allclose(origin, [0, 0, k], atol=1e-3)
        assert np.array_equal(frames[number], mask[:, :, k].T), f"frame {number} is not source slice {k}"
        seen.add(k)
    assert seen == set(range(mask.shape[2]))
    # highdicom reads the segment and its codes (the project's one terminology source)
    read = hd.seg.segread(path)
    (segment,) = read.SegmentSequence
    category, kind = (field.split("^") for field in LIVER_TERMINOLOGY.split("~")[1:3])
    assert segment.SegmentLabel == "Liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert [kind[0], kind[1]] == ["SCT", "10200004"]
    assert (segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
            segment.SegmentedPropertyTypeCodeSequence[0].CodeValue) == tuple(kind[:2])
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category[1]
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "PolyCLSlicer test model"
    # polycl's reader: on the CT grid (given it, or from the SEG's own plane positions)
    on_grid = read_mask(path, ct)
    assert np.array_equal(on_grid.array, mask)
    alone = read_mask(path)
    check_same_grid(alone, ct)
    assert np.array_equal(alone.array, mask)


def test_dicom_seg_from_a_flipped_axes_twin_is_the_same_seg(series):
    """The writer places voxels through both affines: the same mask stored in another axis order gives
    the same frames."""
    from polycl.io.dicom_seg import build_dicom_seg

    _, ct, mask, files = series
    straight = build_dicom_seg(mask, ct.ijk_to_ras, files, "PolyCLSlicer", "v1")
    stored, matrix = twin(mask, ct.ijk_to_ras, order=(2, 0, 1), flip=1)  # slices first, rows reversed
    assert stored.shape == (20, 512, 512)
    twisted = build_dicom_seg(stored, matrix, files, "PolyCLSlicer", "v1")
    assert np.array_equal(straight.pixel_array, twisted.pixel_array)


def test_dicom_seg_refuses_a_mask_off_the_series_grid_and_a_reader_grid_it_does_not_fit(series, tmp_path):
    from polycl.io.base import Volume, VolumeReadError
    from polycl.io.dicom_seg import write_dicom_seg

    _, ct, mask, files = series
    shifted = ct.ijk_to_ras.copy()
    shifted[:3, 3] += [0.3, 0.0, 0.0]  # a third of a pixel: another grid
    with pytest.raises(ValueError, match="not on the DICOM series' voxel grid"):
        write_dicom_seg(tmp_path / "liver.dcm", mask, shifted, files, "PolyCLSlicer", "v1")
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary file
    path = write_dicom_seg(tmp_path / "liver.dcm", mask, ct.ijk_to_ras, files, "PolyCLSlicer", "v1")
    with pytest.raises(VolumeReadError, match="do not lie on the image's voxel grid"):
        read_mask(path, Volume(ct.array, shifted))
    small = Volume(ct.array[:, :, 5:15], ct.ijk_to_ras)  # the SEG's liver reaches beyond this grid
    with pytest.raises(VolumeReadError, match="do not lie on the image's voxel grid"):
        read_mask(path, small)


def test_foreign_dicom_seg_reads_onto_the_ct_grid(data_dir, tmp_path, capsys):
    """dcmqi's liver.dcm equals the NIfTI reference; evaluate reads it; a SEG written for this series (its
    CT files have an empty SpecificCharacterSet) reads back equal."""
    from polycl.io.dicom import choose_series
    from polycl.io.dicom_seg import write_dicom_seg

    folder = data_dir / "dicom" / "dcmqi_3slice"
    reference = data_dir / "labeled" / "dcmqi_3slice_liver.nii.gz"
    ct = read_volume(folder)
    expected = read_mask(reference, ct).array
    assert np.array_equal(read_mask(folder / "liver.dcm", ct).array, expected)
    ours = write_dicom_seg(tmp_path / "ours.dcm", expected, ct.ijk_to_ras, choose_series(folder).files, "t", "1")
    assert np.array_equal(read_mask(ours).array, expected)
    assert main(["evaluate", str(folder / "liver.dcm"), str(reference), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == 1.0


def test_segment_dicom_series_writes_seg_mask_and_overlay_in_one_run(series, tmp_path, capsys, single_torch_thread):
    folder, ct, _, _ = series
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["segment", str(folder), "-o", str(out / "liver.nii.gz"), "--dicom-seg", str(out / "liver.dcm"),
                 "--overlay", str(out / "liver.png"), "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--no-largest-component", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dicom_seg"] == str(out / "liver.dcm") and summary["overlay"] == str(out / "liver.png")
    assert sorted(p.name for p in out.iterdir()) == ["liver.dcm", "liver.nii.gz", "liver.png"]
    written = read_mask(out / "liver.nii.gz")
    assert written.array.any()
    assert np.array_equal(read_mask(out / "liver.dcm", ct).array, written.array)
    seg = pydicom.dcmread(out / "liver.dcm", stop_before_pixels=True)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName.startswith("PolyCLSlicer") and "polycl_unet" in algorithm.AlgorithmVersion
    assert (out / "liver.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, expected", [
    (["-o", "{tmp}/liver.dcm"], "is a file, not a DICOM series folder"),
    (["-o", "{tmp}/o.nii.gz", "--dicom-seg", "{tmp}/liver.dcm"], "is a file, not a DICOM series folder"),
    (["-o", "{tmp}/o.nii.gz", "--dicom-seg", "{tmp}/liver.nii.gz"], "unsupported output extension"),
    (["-o", "{tmp}/o.nii.gz", "--overlay", "{tmp}/o.jpg"], "unsupported output extension"),
    (["-o", "{tmp}/o.nii.gz", "--overlay", "{tmp}/missing/o.png"], "output folder"),
    (["-o", "{tmp}/o.nii.gz", "--overlay", "{tmp}/old.png"], "exists; pass --overwrite"),
])
@pytest.mark.usefixtures("no_work")
def test_seg_and_overlay_options_are_checked_before_any_work(extra, expected, tmp_path, capsys):
    (tmp_path / "ct.nii.gz").write_bytes(b"never read")
    (tmp_path / "old.png").write_bytes(b"a user's picture")
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (["segment"], ["propagate", "--annotation", str(tmp_path / "ct.nii.gz")]):
        err = run_error(capsys, [*command, str(tmp_path / "ct.nii.gz"), *[a.format(tmp=tmp_path) for a in extra]])
        assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "old.png").read_bytes() == b"a user's picture"


@pytest.mark.usefixtures("no_work")
def test_dicom_seg_refused_for_a_folder_without_an_image_series(data_dir, tmp_path, capsys):
    folder = tmp_path / "only_seg"
    folder.mkdir()
    shutil.copy(data_dir / "dicom" / "dcmqi_3slice" / "liver.dcm", folder)
    err = run_error(capsys, ["segment", str(folder), "-o", str(tmp_path / "liver.dcm")])
    assert "no DICOM image series" in err and not (tmp_path / "liver.dcm").exists()


def test_series_lists_image_and_non_image_series(data_dir, tmp_path, capsys):
    folder = data_dir / "dicom" / "dcmqi_3slice"
    assert main(["series", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1] CT") and "3 files" in lines[0]
    assert lines[1].startswith("[-] SEG") and "not an image series" in lines[1]
    assert main(["series", str(folder), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["series"]
    assert [(s["number"], s["modality"], s["images"], s["is_image_series"]) for s in listed] == [
        (1, "CT", 3, True), (None, "SEG", 1, False)]
    assert "not a folder" in run_error(capsys, ["series", str(folder / "liver.dcm")])
    assert "no DICOM series" in run_error(capsys, ["series", str(tmp_path)])
    shutil.copy(folder / "liver.dcm", tmp_path)
    assert main(["series", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("no image series here")


# ------------------------------------------------------------------------------------------ overlay
@pytest.fixture(scope="module")
def sample():
    ct = read_volume(samples.fetch_sample())
    return ct, read_mask(samples.sample_label(samples.DEFAULT_SAMPLE), ct).array


def test_overlay_png_has_four_panels_an_outline_and_the_volume(sample, tmp_path):
    import matplotlib.image

    from polycl.io.overlay import liver_caption, overlay_panels, write_overlay

    ct, mask = sample
    caption = liver_caption("sample", mask, ct.ijk_to_ras)
    millilitres = mask.sum() * np.prod(ct.spacing) / 1000
    assert f"{millilitres:.1f} mL" in caption
    panels = overlay_panels(ct.array, mask, ct.ijk_to_ras)
    assert [p.title.split()[0] for p in panels] == ["axial"] * 3 + ["coronal"]
    assert all(p.mask.any() for p in panels)  # every panel cuts the liver
    path = write_overlay(tmp_path / "o.png", ct.array, mask, ct.ijk_to_ras, caption)
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 3 * image.shape[0]
    outline = np.all(np.abs(image[..., :3] - np.array([0xFF, 0x5A, 0x1F]) / 255) < 0.08, axis=-1)
    assert outline.sum() > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def _render(ct, mask, matrix, path):
    import matplotlib.image

    from polycl.io.overlay import write_overlay

    return matplotlib.image.imread(write_overlay(path, ct, mask, matrix, "caption"))


def test_overlay_of_a_flipped_axes_twin_is_the_same_picture(sample, tmp_path):
    ct, mask = sample
    ct_twin, matrix = twin(ct.array, ct.ijk_to_ras)
    mask_twin, _ = twin(mask, ct.ijk_to_ras)
    assert ct_twin.shape != ct.array.shape
    assert np.array_equal(_render(ct.array, mask, ct.ijk_to_ras, tmp_path / "a.png"),
                          _render(ct_twin, mask_twin, matrix, tmp_path / "b.png"))


def test_overlay_shows_a_left_anterior_superior_marker_where_a_radiologist_expects_it():
    """A bright block in the patient's left-anterior-superior corner, on an oblique, flipped, anisotropic
    grid: right half of every image (patient left), top of the axial images (anterior), top of the coronal
    (superior), absent from the inferior axial slice; pixel aspect from the spacing."""
    from conftest import oblique_matrix
    from polycl.io.overlay import overlay_panels

    matrix = oblique_matrix(spacing=(0.9, 1.2, 2.5), angles=(0.05, -0.04, 0.03))  # columns ~ (L, A, S)
    matrix[:3, :3] = matrix[:3, :3][:, [2, 0, 1]] * [-1, -1, 1]  # stored as (S->I, L->R, P->A)
    shape = (16, 30, 24)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = (ijk @ matrix[:3, :3].T + matrix[:3, 3]).reshape(*shape, 3)
    centre = ras.reshape(-1, 3).mean(0)
    x, y, z = (ras[..., axis] - centre[axis] for axis in range(3))  # RAS: x right, y anterior, z superior
    ct = np.full(shape, -1000.0)
    mask = ((np.abs(x) < 8) & (np.abs(y) < 6) & (np.abs(z) < 14)).astype(np.uint8)
    ct[mask > 0] = 40.0
    ct[(x < -3) & (y > -1) & (z > 2)] = 1000.0  # the marker: left, anterior (to just past the centre), superior
    panels = overlay_panels(ct, mask, matrix)
    inferior, _, superior, coronal = panels
    assert not (inferior.ct == 1.0).any()
    for panel in (superior, coronal):
        rows, cols = np.nonzero(panel.ct == 1.0)
        assert rows.size and cols.mean() > panel.ct.shape[1] / 2, panel.title  # patient left: image right
        assert rows.mean() < panel.ct.shape[0] / 2, panel.title  # anterior / superior: image top
    assert superior.aspect == pytest.approx(1.2 / 0.9, rel=0.05)  # rows A-P (1.2 mm), columns R-L (0.9 mm)
    assert coronal.aspect == pytest.approx(2.5 / 0.9, rel=0.05)


# ------------------------------------------------------------------------------------------- README
def test_readme_dicom_seg_commands_run_as_written(data_dir, tmp_path, monkeypatch, capsys, single_torch_thread):
    """The README's DICOM SEG block, run from a folder where ../shared/data is the shared data."""
    import shlex

    (block,) = readme_blocks("DICOM SEG and a picture", "bash")
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["polycl", "series"], ["polycl", "segment"], ["polycl", "evaluate"]]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = [a.replace("../shared/data", str(data_dir)) for a in command[1:]]
        assert main(argv) == 0, command
    out = capsys.readouterr().out
    assert "[1] CT" in out and "[-] SEG" in out and "mL" in out
    dice = float(out.split("Dice ")[1].split()[0])
    assert dice > 0.9  # the starter model on its training case, round trip through the DICOM SEG
    assert (tmp_path / "liver.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_propagate_writes_a_semiautomatic_dicom_seg_and_an_overlay(series, tmp_path, monkeypatch, capsys):
    """The propagation itself is replaced (its own tests cover it): this checks what propagate writes."""
    from types import SimpleNamespace

    import polycl.sam.propagation
    from polycl.io.volumes import write_mask

    folder, ct, mask, _ = series
    one_slice = np.zeros_like(mask)
    one_slice[:, :, 10] = mask[:, :, 10]
    write_mask(tmp_path / "one.nii.gz", one_slice, ct.ijk_to_ras)

    def fake(array, ijk_to_ras, annotation, **kwargs):
        assert np.array_equal(annotation, one_slice)
        return SimpleNamespace(mask=mask, engine="fake", seed_indices=[10], slices_with_mask=18, seconds=0.1,
                               stops=["stopped: test"])

    monkeypatch.setattr(polycl.sam.propagation, "propagate_from_annotation", fake)
    assert main(["propagate", str(folder), "--annotation", str(tmp_path / "one.nii.gz"), "-o",
                 str(tmp_path / "liver.dcm"), "--overlay", str(tmp_path / "liver.png"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(tmp_path / "liver.dcm") and summary["overlay"] == str(tmp_path / "liver.png")
    assert np.array_equal(read_mask(tmp_path / "liver.dcm", ct).array, mask)
    (segment,) = pydicom.dcmread(tmp_path / "liver.dcm", stop_before_pixels=True).SegmentSequence
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "PolyCLSlicer propagate (fake)"
    assert (tmp_path / "liver.png").stat().st_size > 10_000


def test_failed_seg_and_overlay_writes_leave_the_old_files(series, sample, tmp_path, monkeypatch):
    """Both are written through atomic_write: a writer that dies half-way leaves the old file, no temp file."""
    import matplotlib.figure

    from polycl.io.dicom_seg import write_dicom_seg
    from polycl.io.overlay import write_overlay

    def half_then_fail(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    _, ct, mask, files = series
    (tmp_path / "liver.dcm").write_bytes(b"the user's old SEG")
    (tmp_path / "liver.png").write_bytes(b"the user's old picture")
    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_then_fail)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="nothing was written"):
        write_dicom_seg(tmp_path / "liver.dcm", mask, ct.ijk_to_ras, files, "PolyCLSlicer", "v1")
    sample_ct, sample_mask = sample
    with pytest.raises(OSError, match="nothing was written"):
        write_overlay(tmp_path / "liver.png", sample_ct.array, sample_mask, sample_ct.ijk_to_ras, "caption")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver.dcm", "liver.png"]
    assert (tmp_path / "liver.dcm").read_bytes() == b"the user's old SEG"
    assert (tmp_path / "liver.png").read_bytes() == b"the user's old picture"


def _two_segment_seg(data_dir, second_type):
    """A SEG of the 3-slice CT with segment 1 = a block labelled 'Organ' and segment 2 of ``second_type``."""
    from pydicom.sr.codedict import codes

    from polycl.io.dicom_seg import _sorted_sources, terminology_codes

    folder = data_dir / "dicom" / "dcmqi_3slice"
    sources, _ = _sorted_sources([str(f) for f in folder.glob("ct-3slice_*.dcm")])
    frames = np.zeros((3, sources[0].Rows, sources[0].Columns, 2), np.uint8)
    frames[:, 10:50, 20:60, 0] = 1
    frames[:, 200:300, 100:250, 1] = 1
    category, _ = terminology_codes()
    algorithm = hd.AlgorithmIdentificationSequence(name="test", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    segments = [hd.seg.SegmentDescription(number, label, category, kind, "AUTOMATIC", algorithm)
                for number, label, kind in ((1, "Organ", codes.SCT.Spleen), (2, "Second", second_type))]
    seg = hd.seg.Segmentation(sources, frames, "BINARY", segments, hd.UID(), 1, hd.UID(), 1, "test", "test", "1", "1")
    return folder, seg


@pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")  # the test CT's patient name
def test_multi_segment_seg_gives_the_liver_or_is_refused(data_dir, tmp_path):
    from pydicom.sr.codedict import codes

    from polycl.io.base import VolumeReadError

    folder, seg = _two_segment_seg(data_dir, codes.SCT.Liver)
    seg.save_as(tmp_path / "two.dcm")
    ct = read_volume(folder)
    liver = read_mask(tmp_path / "two.dcm", ct).array
    assert liver.sum() == 3 * 100 * 150 and liver[100:250, 200:300, :].all()  # segment 2 (rows 200:300, cols 100:250)
    folder, seg = _two_segment_seg(data_dir, codes.SCT.Kidney)
    seg.save_as(tmp_path / "none.dcm")
    with pytest.raises(VolumeReadError, match="2 segments .* none of them is the liver"):
        read_mask(tmp_path / "none.dcm", ct)


def test_overlay_of_an_empty_mask_says_no_liver(sample):
    from polycl.io.overlay import liver_caption, overlay_panels

    ct, mask = sample
    empty = np.zeros_like(mask)
    panels = overlay_panels(ct.array, empty, ct.ijk_to_ras)
    assert len(panels) == 4 and not any(p.mask.any() for p in panels)
    assert "no liver found" in liver_caption("sample", empty, ct.ijk_to_ras)

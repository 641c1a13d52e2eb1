"""The bundled starter model: valid model card, used by default, reaches its recorded Dice on real CT."""

from __future__ import annotations

import numpy as np
import pytest

from polycl.cli.main import main
from polycl.inference import Segmenter
from polycl.metrics import dice, evaluate
from polycl.nets.checkpoints import load_checkpoint
from polycl.nets.model_card import STARTER_CHECKPOINT


def card_floor(case: str) -> float:
    """The starter's own training-set Dice on ``case`` (its model card) minus 0.005, else 0.93: a floor
    just under what the model achieves (0.8 let a wrong HU window or a mirrored orientation pass)."""
    figures = load_checkpoint()[1].get("metrics", {}).get("training_set_dice_3d", {})
    return figures[case] - 0.005 if case in figures else 0.93


def test_starter_checkpoint_is_small_and_documented():
    assert STARTER_CHECKPOINT.is_file(), "the starter model must be committed with the package"
    assert STARTER_CHECKPOINT.stat().st_size < 9 * 2**20
    model, card = load_checkpoint()
    assert card["kind"] == "segmentation" and card["architecture"] == "polycl_unet"
    assert card["input_size"] == 192 and card["window"] == {"center": 40.0, "width": 400.0}  # since version 5
    assert card["recipe"]["loss"].startswith("soft Dice") and "command" in card["recipe"]
    scans = " ".join(card["data"]["scans"])
    assert "totalseg_dcm" in scans and "dcmqi_3slice" in scans and "ircad01" not in scans  # ircad01 stays unseen
    assert {row["case"] for row in card["metrics"]["unseen_ct_plausibility"]} >= {"ircad01"}


def test_starter_segments_totalseg_dcm(labeled_case):
    ct, reference = labeled_case("totalseg_dcm")
    result = Segmenter.from_checkpoint(None, device="cpu").segment(ct.array, ct.ijk_to_ras)
    assert result.mask.shape == ct.array.shape and result.mask.dtype == np.uint8
    metrics = evaluate(result.mask, reference.array, ct.ijk_to_ras)
    assert metrics["dice"] >= card_floor("totalseg_dcm"), metrics


@pytest.mark.slow
def test_cli_segment_uses_the_starter_by_default(labeled_case, data_dir, tmp_path, capsys):
    ct, reference = labeled_case("totalseg_sm")
    output = tmp_path / "liver.nii.gz"
    assert main(["segment", str(data_dir / "labeled" / "totalseg_sm_ct.nii.gz"), "-o", str(output),
                 "--reference", str(data_dir / "labeled" / "totalseg_sm_liver.nii.gz")]) == 0
    assert "Dice" in capsys.readouterr().out
    from polycl.io.volumes import read_mask

    written = read_mask(output, ct)
    assert dice(written.array, reference.array) >= card_floor("totalseg_sm")


def test_reoriented_real_ct_gives_the_same_liver_in_world_space(labeled_case, tmp_path):
    """A permuted + flipped LPS NRRD copy of a real CT segments to the same voxels in world space."""
    from polycl.geometry import CanonicalOrientation
    from polycl.io.volumes import read_volume, write_volume

    ct, _ = labeled_case("totalseg_sm")
    reindex = CanonicalOrientation((2, 0, 1), (True, False, True))
    write_volume(tmp_path / "copy.nrrd", reindex.to_canonical(ct.array),
                 reindex.canonical_matrix(ct.ijk_to_ras, ct.array.shape))
    copy = read_volume(tmp_path / "copy.nrrd")
    segmenter = Segmenter.from_checkpoint(None, device="cpu")
    original = segmenter.segment(ct.array, ct.ijk_to_ras).mask
    copied = segmenter.segment(copy.array, copy.ijk_to_ras).mask
    np.testing.assert_array_equal(reindex.from_canonical(copied), original)

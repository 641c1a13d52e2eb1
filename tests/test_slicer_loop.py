"""Slicer Logic, human in the loop (issue 10): paint 3 slices -> finetune on them -> suggest the next slice.

Real MRML nodes (slicer-core) and a real worker process; a 12-slice crop of a labelled CT keeps it fast.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PolyCLSlicer"))

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'slicer-core==5.11.0.*')")
from PolyCLSlicerLib import mrml  # noqa: E402

K0, K1 = 8, 20
PAINTED = (1, 5, 9)  # array slices of the crop painted by the "user"


@pytest.fixture()
def painted_scene(labeled_case):
    """Volume node (crop of totalseg_sm) and a segmentation whose 'Liver' segment is painted on 3 slices."""
    ct, liver = labeled_case("totalseg_sm")
    matrix = np.array(ct.ijk_to_ras, float)
    matrix[:3, 3] = matrix[:3, :3] @ np.array([0, 0, K0]) + matrix[:3, 3]
    reference = np.ascontiguousarray(liver.array[:, :, K0:K1])
    scene = mrml.new_scene()
    volume = mrml.add_volume_node(scene, np.ascontiguousarray(ct.array[:, :, K0:K1]), matrix, "crop")
    segmentation = mrml.new_segmentation_node(volume)
    painted = np.zeros_like(reference)
    painted[:, :, list(PAINTED)] = reference[:, :, list(PAINTED)]
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    mrml.write_segment_mask(segmentation, segment_id, painted, matrix)
    return volume, segmentation, segment_id, reference, matrix


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from polycl.nets.checkpoints import default_card, save_model
    from polycl.nets.registry import build_model

    torch.manual_seed(0)
    args = {"channels": [4, 8, 16, 32, 64], "dropout": 0.0}
    return save_model(path, build_model("polycl_unet", **args), default_card("polycl_unet", args, input_size=32))


def test_logic_finetunes_from_a_segment_painted_on_three_slices(painted_scene, logic, tmp_path):
    from polycl.nets.checkpoints import read_checkpoint

    volume, segmentation, segment_id, _, _ = painted_scene
    choice = logic.finetuneSliceChoice([volume], [segmentation], [segment_id])  # gaps: no model needed
    assert choice.mode == "annotated" and choice.trainingSlices == 3 and choice.slices == {"crop": list(PAINTED)}
    assert "Annotated slices: training on 3 slices" in choice.summary()
    init = tiny_checkpoint(tmp_path / "init.safetensors")
    before = hashlib.sha256(init.read_bytes()).hexdigest()
    messages = []
    result = logic.finetune([volume], [segmentation], tmp_path / "new.safetensors", init=str(init), epochs=1,
                            device="cpu", slices=choice.mode, progress=lambda f, m: messages.append(m))
    card = read_checkpoint(result.path)[1]
    used = card["data"]["slices_used"][0]
    assert sorted(used["painted"] + used["validation"]) == list(PAINTED) and len(used["validation"]) == 1
    assert hashlib.sha256(init.read_bytes()).hexdigest() == before and any("epoch 1/1" in m for m in messages)


def test_slice_choice_uses_the_models_liver_extent(painted_scene, logic):
    volume, segmentation, _, reference, matrix = painted_scene
    whole = segmentation.GetSegmentation().AddEmptySegment("", "Liver corrected")
    mrml.write_segment_mask(segmentation, whole, reference, matrix)
    assert logic.finetuneSliceChoice([volume], [segmentation], [whole]).mode == "all"
    few = segmentation.GetSegmentation().AddEmptySegment("", "Liver two slices")
    two = np.zeros_like(reference)
    two[:, :, 4:6] = reference[:, :, 4:6]
    mrml.write_segment_mask(segmentation, few, two, matrix)
    choice = logic.finetuneSliceChoice([volume], [segmentation], [few])
    assert choice.mode == "annotated" and "less than half" in choice.reason
    assert logic.finetuneSliceChoice([volume], [segmentation], [few], mode="all").trainingSlices == K1 - K0


def test_suggest_slice_skips_painted_slices_and_gives_positions(painted_scene, logic):
    volume, segmentation, _, _, _ = painted_scene
    report = logic.suggestSlice(volume, segmentation, count=3, device="cpu")
    assert report.annotated == list(PAINTED) and len(report.slices) == 3
    assert not set(report.slices) & set(PAINTED) and all(0 <= k < K1 - K0 for k in report.slices)
    assert report.scores == sorted(report.scores, reverse=True) and report.axis == 2
    assert report.positions[0] == pytest.approx(mrml.slice_center_ras(volume, 2, report.slices[0]))
    assert f"Paint slice {report.slices[0]} next" in report.summary()
    assert logic.paintSegment(segmentation) == logic.liverSegmentId(segmentation)

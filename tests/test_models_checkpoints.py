"""Model shapes and parameter counts, reference key import, checkpoint validation and safety."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from polycl.nets.checkpoints import (
    CheckpointError,
    default_card,
    import_reference_weights,
    load_checkpoint,
    load_pretrained_init,
    read_checkpoint,
    save_checkpoint,
    save_model,
)
from polycl.nets.registry import build_model
from polycl.nets.unet import ProjectionHead, convert_reference_state_dict, count_parameters


def test_polycl_unet_matches_method_description():
    model = build_model("polycl_unet")
    assert count_parameters(model.encoder) == 1_178_480
    assert count_parameters(model.encoder) + count_parameters(ProjectionHead()) == 1_244_272  # ≈1.24 M
    assert count_parameters(model) == 1_962_337  # ≈2.0 M
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 18 and all(m.negative_slope == 0.2 for m in model.modules()
                                    if isinstance(m, torch.nn.LeakyReLU))
    assert model.decoder.upsample.mode == "bilinear" and model.decoder.upsample.align_corners
    for size in (256, 128, 100):
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 1, size, size)
    features = model.encoder(torch.zeros(1, 1, 256, 256))
    assert [f.shape[1] for f in features] == [16, 32, 64, 128, 256]
    assert ProjectionHead()(features[-1]).shape == (1, 256)


def test_resunet_builds_and_has_resnet18_scale():
    model = build_model("resunet")
    assert 13e6 < count_parameters(model) < 15e6
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(KeyError, match="unknown architecture"):
        build_model("vnet")


def test_reference_state_dict_keys_are_accepted(tmp_path):
    source = build_model("polycl_unet", dropout=0.25)
    head = ProjectionHead()
    # Reference encoder checkpoint: bare dconv_down* keys + projHead, saved with torch.save.
    reference = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    reference.update({f"projHead.{k.removeprefix('linear.')}": v for k, v in head.state_dict().items()})
    torch.save(reference, tmp_path / "encoder.pt")
    converted = import_reference_weights(tmp_path / "encoder.pt")
    assert "encoder.dconv_down1.0.weight" in converted and "projection.linear.weight" in converted
    target = build_model("polycl_unet")
    target.load_state_dict({k: v for k, v in converted.items() if k.startswith("encoder.")}, strict=False)
    assert torch.equal(target.encoder.dconv_down5[3].weight, source.encoder.dconv_down5[3].weight)
    # Whole reference model with DataParallel prefix.
    whole = {f"module.{k}": v for k, v in source.state_dict().items()}
    assert set(convert_reference_state_dict(whole)) == set(source.state_dict())


def test_checkpoint_round_trip_keeps_weights_and_card(tmp_path):
    model = build_model("polycl_unet", dropout=0.0)
    card = default_card("polycl_unet", {"dropout": 0.0}, 128, metrics={"dice": 0.9}, data={"scans": ["a"]})
    path = save_model(tmp_path / "m.safetensors", model, card)
    loaded, loaded_card = load_checkpoint(path)
    assert loaded_card["metrics"] == {"dice": 0.9} and loaded_card["input_size"] == 128
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(FileExistsError):
        save_model(path, model, card, overwrite=False)


def test_checkpoint_validation_rejects_wrong_files(tmp_path):
    model = build_model("polycl_unet")
    good = save_model(tmp_path / "good.safetensors", model, default_card())
    # truncated
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    # foreign safetensors without our metadata
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="without PolyCL metadata"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    # right format, wrong shapes for the declared architecture
    wrong = build_model("polycl_unet", channels=(8, 16, 32, 64, 128))
    save_model(tmp_path / "wrong.safetensors", wrong, default_card())
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "wrong.safetensors")
    # unknown architecture / incomplete card
    save_checkpoint(tmp_path / "arch.safetensors", model.state_dict(), default_card("vnet"))
    with pytest.raises(CheckpointError, match="unbuildable"):
        load_checkpoint(tmp_path / "arch.safetensors")
    with pytest.raises(CheckpointError, match="lacks"):
        save_checkpoint(tmp_path / "x.safetensors", model.state_dict(), {"kind": "segmentation"})
    # an encoder checkpoint is not a segmentation model
    encoder_only = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    save_checkpoint(tmp_path / "enc.safetensors", encoder_only, default_card(kind="encoder"))
    with pytest.raises(CheckpointError, match="encoder checkpoint"):
        load_checkpoint(tmp_path / "enc.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "missing.safetensors")


class _Exploit:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_rejected_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pt"
    raw.write_bytes(pickle.dumps({"weight": _Exploit(str(marker))}))
    archive = tmp_path / "evil_zip.pt"
    torch.save({"weight": _Exploit(str(marker))}, archive)  # torch.save pickles the object, not its result
    assert not marker.exists()
    assert zipfile.is_zipfile(archive)
    for path in (raw, archive):
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="rejected"):
            import_reference_weights(path)
        assert not marker.exists(), "loading executed code from a checkpoint"
    # Same payload disguised with a .safetensors name.
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(io.BytesIO(raw.read_bytes()).getvalue())
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(disguised)
    assert not marker.exists()


def test_pretrained_encoder_init_changes_only_the_encoder(tmp_path):
    pretrained = build_model("polycl_unet")
    encoder_state = {k: v for k, v in pretrained.state_dict().items() if k.startswith("encoder.")}
    encoder_state["projection.linear.weight"] = torch.zeros(256, 256)
    encoder_state["projection.linear.bias"] = torch.zeros(256)
    path = save_checkpoint(tmp_path / "enc.safetensors", encoder_state, default_card(kind="encoder"))
    torch.manual_seed(123)
    model = build_model("polycl_unet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained_init(model, path)
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(value, pretrained.state_dict()[key])
        else:
            assert torch.equal(value, before[key])
    mismatched = build_model("polycl_unet", channels=(8, 16, 32, 64, 128))
    with pytest.raises(CheckpointError, match="does not match"):
        load_pretrained_init(mismatched, path)

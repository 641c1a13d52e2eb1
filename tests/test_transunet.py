"""TransUNet backbone: shapes, sizes, positional-embedding interpolation, checkpoints, finetune, pretrain."""

from __future__ import annotations

import pytest
import torch

from polycl.nets.checkpoints import CheckpointError, default_card, load_checkpoint, load_pretrained_init, save_model
from polycl.nets.registry import build_model
from polycl.nets.transunet import PRESETS, TransUNet, infer_config, transunet_config
from polycl.nets.unet import count_parameters

TINY = {"stem_width": 8, "stage_blocks": (1, 1, 1), "hidden": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
        "img_size": 64, "decoder_channels": (16, 8, 8, 4), "dropout": 0.0}
PUBLISHED_PAPER_PARAMETERS = 105.28e6  # TransUNet R50-ViT-B/16, 3 input channels, 9 classes (Synapse)


@pytest.mark.parametrize("size", [128, 224, 256])
def test_small_variant_output_shapes(size):
    model = build_model("transunet").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, size, size))
    assert out.shape == (1, 1, size, size) and torch.isfinite(out).all()
    features = model.encoder(torch.zeros(1, 1, size, size))
    assert [f.shape[-1] for f in features] == [size // 2, size // 4, size // 8, size // 16]
    assert features[-1].shape[1] == model.encoder.out_channels == 192


@pytest.mark.parametrize("size", [128, 224, 256])
def test_paper_variant_output_shapes(size):
    with torch.device("meta"):  # shapes only: the paper-sized network is too slow for a CPU test
        model = build_model("transunet", preset="paper")
        out = model(torch.empty(2, 1, size, size))
    assert out.shape == (2, 1, size, size)


def test_parameter_counts_small_and_paper():
    small = build_model("transunet")
    assert 2e6 < count_parameters(small) < 4e6
    assert count_parameters(small) == 2_555_289
    with torch.device("meta"):
        paper = build_model("transunet", preset="paper")
        rgb_synapse = TransUNet(transunet_config("paper", in_channels=3))
    assert count_parameters(paper) == 105_269_649  # 1 input channel, 1 output logit
    # the published count adds two input channels' stem filters and eight more output classes
    published_layout = count_parameters(rgb_synapse) + 8 * (16 * 9 + 1)
    assert abs(published_layout - PUBLISHED_PAPER_PARAMETERS) / PUBLISHED_PAPER_PARAMETERS < 1e-4
    config = PRESETS["paper"]
    assert (config.hidden, config.depth, config.heads, config.mlp_dim, config.stage_blocks) == (768, 12, 12, 3072,
                                                                                                (3, 4, 9))


def test_position_embeddings_interpolate_for_other_input_sizes():
    torch.manual_seed(0)
    model = build_model("transunet", **TINY).eval()  # learnt for 64 px: a 4x4 token grid
    encoder = model.encoder
    assert encoder.position_embedding(4, 4) is encoder.pos_embed
    with torch.no_grad():
        encoder.pos_embed.copy_(torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 32))
        resized = encoder.position_embedding(6, 6).reshape(6, 6, 32)
    assert resized.shape == (6, 6, 32) and torch.allclose(resized[..., 0], resized[..., 31])
    assert resized[0, 0, 0] < resized[0, 5, 0] < resized[5, 5, 0]  # row-major order survives the resize
    x = torch.rand(1, 1, 96, 96)
    model.train()
    model(x).sum().backward()  # 96 px: the interpolated table is used and learnt through
    assert encoder.pos_embed.grad is not None and encoder.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.rand(1, 1, 72, 72))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_model("transunet", **TINY).eval()
    card = default_card("transunet", TINY, 64)
    path = save_model(tmp_path / "t.safetensors", model, card)
    loaded, loaded_card = load_checkpoint(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        y = torch.rand(1, 1, 80, 80)  # another size: interpolated position embeddings, same result
        assert torch.equal(model(y), loaded(y))
    assert isinstance(loaded, TransUNet) and loaded.config == model.config
    assert loaded_card["architecture_args"]["stage_blocks"] == [1, 1, 1]


@pytest.mark.parametrize("change,named", [({"depth": 3}, "depth 2 in the file, 3 here"),
                                          ({"patch_size": 2}, "patch_size 1 in the file, 2 here"),
                                          ({"hidden": 48, "heads": 2}, "hidden 32 in the file, 48 here")])
def test_checkpoint_with_other_sizes_names_the_argument(tmp_path, change, named):
    model = build_model("transunet", **TINY)
    lying_card = default_card("transunet", {**TINY, **change}, 64)  # the weights are TINY's
    path = save_model(tmp_path / "t.safetensors", model, lying_card)
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(path)


def test_init_from_encoder_with_other_heads_names_the_argument(tmp_path):
    encoder_card = default_card("transunet", TINY, 64, kind="encoder")
    path = save_model(tmp_path / "enc.safetensors", build_model("transunet", **TINY), encoder_card)
    with pytest.raises(CheckpointError, match="heads 2 in the file, 4 here"):
        load_pretrained_init(build_model("transunet", **{**TINY, "heads": 4}), path)
    load_pretrained_init(build_model("transunet", **{**TINY, "dropout": 0.3}), path)  # dropout is no size


def test_infer_config_reads_sizes_from_weights():
    found = infer_config(build_model("transunet", **TINY).state_dict())
    expected = {k: v for k, v in transunet_config(**TINY).__dict__.items() if k in found}
    assert found == expected and set(found) >= {"depth", "hidden", "patch_size", "img_size", "stage_blocks"}


def test_polycl_m_pretrained_encoder_loads_and_changes_only_encoder_weights(tmp_path):
    from test_pretraining import synthetic_index

    from polycl.training.pretraining import PretrainConfig, pretrain

    index = synthetic_index(32)
    config = PretrainConfig(method="polycl-m", architecture="transunet", architecture_args=TINY, input_size=32,
                            epochs=1, batch_size=6, anchor_fraction=None, seed=3)
    result = pretrain(index, tmp_path / "polycl_m.ckpt", config)
    assert result.card["kind"] == "encoder" and result.card["architecture"] == "transunet"
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in result.history)
    torch.manual_seed(7)
    model = build_model("transunet", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    card = load_pretrained_init(model, result.path)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert card["recipe"]["method"] == "polycl-m"
    assert any(k.startswith("encoder.blocks.") for k in changed) and any(k.startswith("encoder.stages.")
                                                                         for k in changed)
    assert changed and all(k.startswith("encoder.") for k in changed)


def test_pix2rep_uses_the_transunet_decoder_features():
    from polycl.training.pretraining import PretrainConfig
    from polycl.training.pretraining.trainer import build_pretraining_net

    net = build_pretraining_net(PretrainConfig(method="pix2rep", architecture="transunet", architecture_args=TINY))
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 64, 32, 32)


def test_one_finetune_epoch_on_a_real_case_lowers_the_loss(labeled_case, tmp_path):
    from polycl.training.config import FinetuneConfig
    from polycl.training.finetuning import finetune, soft_dice_loss
    from polycl.training.loop import seed_everything
    from polycl.training.slices import slices_from_pairs

    pair = labeled_case("totalseg_sm")
    config = FinetuneConfig(architecture="transunet", input_size=64, epochs=1, batch_size=8, lr=1e-3,
                            val_fraction=0.0, augment=False, device="cpu", seed=0)
    data = slices_from_pairs([pair], 64)

    def loss_of(model):
        model.eval()
        with torch.no_grad():
            return float(soft_dice_loss(model(data.images), data.masks))

    seed_everything(config.seed)
    before = loss_of(build_model("transunet"))  # the same initial weights finetune() draws
    result = finetune([pair], tmp_path / "transunet.safetensors", config)
    model, card = load_checkpoint(result.path)
    assert card["architecture"] == "transunet" and card["input_size"] == 64
    assert loss_of(model) < before


def test_cli_pretrain_finetune_and_segment_with_transunet(tmp_path):
    """`polycl pretrain --architecture transunet`, `finetune --init` from its encoder, then `segment`."""
    from test_pretraining import write_case

    from polycl.cli.main import main
    from polycl.nets.checkpoints import read_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    write_case(data, "a", 6, (2, 4))
    write_case(data, "b", 5, (0, 1))
    encoder = tmp_path / "enc.safetensors"
    assert main(["pretrain", "--method", "polycl-m", "--architecture", "transunet", "--data", str(data), "-o",
                 str(encoder), "--size", "32", "--epochs", "1", "--batch-size", "4", "--anchor-fraction", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]) == 0
    assert read_checkpoint(encoder)[1]["architecture"] == "transunet"
    tuned = tmp_path / "tuned.safetensors"
    assert main(["finetune", "--images", str(data / "a_ct.nii.gz"), str(data / "b_ct.nii.gz"),
                 "--labels", str(data / "a_liver.nii.gz"), str(data / "b_liver.nii.gz"), "--init", str(encoder),
                 "-o", str(tuned), "--epochs", "1", "--device", "cpu"]) == 0
    tensors, card = read_checkpoint(tuned)
    assert card["architecture"] == "transunet" and card["input_size"] == 32
    assert card["recipe"]["init_method"] == "polycl-m"
    assert main(["segment", str(data / "a_ct.nii.gz"), "-o", str(tmp_path / "a_mask.nii.gz"), "--checkpoint",
                 str(tuned), "--device", "cpu"]) == 0
    assert (tmp_path / "a_mask.nii.gz").is_file()

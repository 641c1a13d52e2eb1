"""Self-supervised pretraining: samplers (eqs. 1-3), losses, Pix2Rep equivariance, trainer, torchrun, CLI.

Everything runs on CPU at 32-64 px with a handful of slices; the real-data test skips without data.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from polycl.nets.checkpoints import load_pretrained_init, read_checkpoint
from polycl.nets.registry import build_model
from polycl.training.pretraining import (
    PolyCLMSampler,
    PolyCLOSampler,
    PolyCLSSampler,
    PretrainConfig,
    SamplerError,
    SliceIndex,
    build_slice_index,
    load_flags,
    make_sampler,
    nt_xent,
    pixel_nt_xent,
    polycl_triplet_loss,
    pretrain,
)
from polycl.training.pretraining.augment import pix2rep_views, random_affine, simclr_views, valid_region, warp
from polycl.training.pretraining.trainer import PixelEmbeddingNet, build_pretraining_net

ROOT = Path(__file__).resolve().parents[1]
DRAWS = 40

# ---------------------------------------------------------------------------------------------
# Synthetic index: 4 scans; scan 2 has the organ on every slice, scan 3 on none (M fallbacks).
SCAN = [0] * 12 + [1] * 10 + [2] * 8 + [3] * 6
PRESENCE = [0] * 4 + [1] * 6 + [0] * 2 + [0] * 3 + [1] * 5 + [0] * 2 + [1] * 8 + [0] * 6


def synthetic_index(size: int = 0, presence=PRESENCE) -> SliceIndex:
    index = SliceIndex.from_arrays(SCAN, presence)
    if size:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:size, 0:size] / size
        images = []
        for scan, flag in zip(index.scan, index.presence, strict=True):
            freq = 2 + 3 * int(scan)  # each scan has its own texture, the organ a bright disc
            image = 0.4 + 0.25 * np.sin(2 * np.pi * freq * (xx + 0.3 * yy))
            if flag == 1:
                image = image + 0.5 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.06)
            images.append(np.clip(image + 0.03 * rng.standard_normal(image.shape), 0, 1))
        index.images = torch.tensor(np.stack(images)[:, None], dtype=torch.float16)
        index.input_size = size
    return index


def all_draws(sampler, draws: int = DRAWS) -> np.ndarray:
    return np.concatenate([sampler.draw(epoch).items for epoch in range(1, draws + 1)])


# ---------------------------------------------------------------------------------------------
# Samplers


def test_polycl_s_invariants_eq1():
    index = synthetic_index()
    rows = all_draws(PolyCLSSampler(index, anchor_fraction=None, seed=3))
    a, p, n = rows.T
    assert len(rows) == DRAWS * len(index)
    assert np.all(p != a) and np.all(index.scan[p] == index.scan[a])
    assert np.all(index.scan[n] != index.scan[a])
    # re-drawn: every slice of scan 0 (but the anchor) appears as a positive of anchor 0
    assert len(set(p[a == 0])) > 5


def test_polycl_o_invariants_eq2():
    index = synthetic_index()
    rows = all_draws(PolyCLOSampler(index, anchor_fraction=None, seed=3))
    a, p, n = rows.T
    assert np.all(p != a)
    assert np.all(index.presence[p] == index.presence[a])
    assert np.all(index.presence[n] != index.presence[a])
    assert len(np.unique(index.scan[p])) > 1  # positives come from any scan


@pytest.mark.parametrize("source", ["paper", "reference"])
def test_polycl_m_invariants_eq3(source):
    index = synthetic_index()
    sampler = PolyCLMSampler(index, anchor_fraction=None, seed=3, negative_source=source)
    draw = sampler.draw(1)
    rows = all_draws(sampler)
    a, p, n = rows.T
    assert np.all(p != a)
    assert np.all(index.scan[p] == index.scan[a]) and np.all(index.presence[p] == index.presence[a])
    assert np.all(index.presence[n] != index.presence[a])
    single_class = np.isin(index.scan[a], [2, 3])  # scans with one presence class only
    if source == "paper":
        assert np.all(index.scan[n][~single_class] == index.scan[a][~single_class])
        assert np.all(index.scan[n][single_class] != index.scan[a][single_class])  # documented fallback
        assert draw.fallbacks == int(np.isin(index.scan, [2, 3]).sum())
    else:
        assert np.all(index.scan[n] != index.scan[a])
        assert draw.fallbacks == 0
    if source == "paper":
        with pytest.raises(SamplerError, match="strict"):
            PolyCLMSampler(index, None, 3, source, strict=True).draw(1)


def test_samplers_are_deterministic_and_redraw_each_epoch():
    index = synthetic_index()
    for method in ("polycl-s", "polycl-o", "polycl-m"):
        first = make_sampler(method, index, None, seed=11)
        again = make_sampler(method, index, None, seed=11)
        assert np.array_equal(first.draw(5).items, again.draw(5).items)
        assert not np.array_equal(first.draw(5).items, first.draw(6).items)
        assert not np.array_equal(first.draw(5).items, make_sampler(method, index, None, seed=12).draw(5).items)


def test_sampler_degenerate_cases():
    with pytest.raises(SamplerError, match="two scans"):
        PolyCLSSampler(SliceIndex.from_arrays([0, 0, 0]), None)
    # a one-slice scan: its anchor has no positive and is dropped, never an endless loop
    draw = PolyCLSSampler(SliceIndex.from_arrays([0, 0, 0, 1]), None).draw(1)
    assert draw.dropped == 1 and 3 not in draw.items[:, 0]
    with pytest.raises(SamplerError, match="with and without"):
        PolyCLOSampler(SliceIndex.from_arrays([0, 0, 1, 1], [1, 1, 1, 1]), None)
    with pytest.raises(SamplerError, match="presence"):
        PolyCLMSampler(SliceIndex.from_arrays([0, 0, 1, 1]), None)
    # unknown presence (-1) is never an anchor or a candidate
    index = SliceIndex.from_arrays([0, 0, 0, 1, 1, 1], [1, 0, -1, 1, 0, -1])
    rows = all_draws(PolyCLOSampler(index, None), 10)
    assert not np.isin(rows, [2, 5]).any()
    # the anchor middle fraction follows preprocessing.middle_slices per scan
    assert list(SliceIndex.from_arrays([0] * 10 + [1] * 3).anchor_indices(0.3)) == [3, 4, 5, 11]


# ---------------------------------------------------------------------------------------------
# Losses


def test_polycl_triplet_loss_values():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    loss = polycl_triplet_loss(anchor, anchor.clone(), -anchor, tau=0.5)
    assert math.isclose(float(loss), math.log1p(math.exp(-4.0)), rel_tol=1e-5)  # cos+ = 1, cos- = -1
    swapped = polycl_triplet_loss(anchor, -anchor, anchor.clone(), tau=0.5)
    assert math.isclose(float(swapped), math.log1p(math.exp(4.0)), rel_tol=1e-5)
    # default tau = 1/M: equal similarities give log 2 whatever M; M = 2 -> tau 0.5 as above
    assert math.isclose(float(polycl_triplet_loss(anchor, anchor, -anchor)), float(loss), rel_tol=1e-6)
    z = torch.randn(20, 8)
    assert math.isclose(float(polycl_triplet_loss(z, z, z)), math.log(2), rel_tol=1e-6)


def test_nt_xent_values():
    z = torch.eye(4) * 3
    aligned = nt_xent(z, z.clone(), tau=0.1)
    shuffled = nt_xent(z, z[[1, 2, 3, 0]], tau=0.1)
    assert float(aligned) < 0.1 < 2.0 < float(shuffled)
    with pytest.raises(ValueError):
        nt_xent(z[:1], z[:1])


# ---------------------------------------------------------------------------------------------
# Pix2Rep equivariance plumbing


def toy_pointwise_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 1), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 1))


def test_pix2rep_warp_matches_features_of_warped_image():
    net = toy_pointwise_net()  # pointwise => exactly equivariant to pixel permutations
    image = torch.rand(3, 1, 16, 16)
    exact = torch.tensor([[[-1.0, 0, 0], [0, 1, 0]], [[0, -1, 0], [1, 0, 0]], [[0, 1, 0], [-1, 0, 0]]])  # flip, ±90°
    with torch.no_grad():
        assert torch.allclose(warp(net(image), exact), net(warp(image, exact)), atol=1e-5)
        # general affine warp: a linear pointwise net commutes with bilinear resampling inside the valid region
        linear = torch.nn.Conv2d(1, 8, 1, bias=False)
        theta = random_affine(3, torch.Generator().manual_seed(1))
        valid = valid_region(theta, (16, 16))
        difference = (warp(linear(image), theta) - linear(warp(image, theta))).abs().amax(1)
        assert valid.any() and float(difference[valid].max()) < 1e-4
        # the loss prefers correctly warped features over unwarped ones
        features_of_warped = net(warp(image, theta))
        good = pixel_nt_xent(warp(net(image), theta), features_of_warped, valid, 300, 0.1)
        bad = pixel_nt_xent(net(image), features_of_warped, valid, 300, 0.1)
    assert float(good) < float(bad)


def test_pix2rep_views_and_pixel_network():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 32, 32)
    first, second, theta = pix2rep_views(images, generator)
    a, b = simclr_views(images, generator)
    assert first.shape == second.shape == a.shape == b.shape == images.shape and theta.shape == (2, 2, 3)
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    net = PixelEmbeddingNet(*build_model("polycl_unet").children(), dim=16)
    assert net(first).shape == (2, 16, 32, 32)
    assert not net.decoder.conv_last.weight.requires_grad


# ---------------------------------------------------------------------------------------------
# Trainer


def mean_loss(net: torch.nn.Module, index: SliceIndex, rows: np.ndarray, tau: float) -> float:
    net.eval()
    with torch.no_grad():
        x = index.images[torch.from_numpy(rows.T.reshape(-1))].float()
        return float(polycl_triplet_loss(*net(x).chunk(3), tau=tau))


def test_one_epoch_lowers_the_loss(tmp_path):
    index = synthetic_index(32)  # 36 slices, 9 batches of 4; no dropout so the check is not noisy
    config = PretrainConfig(method="polycl-s", input_size=32, epochs=1, batch_size=4, lr=1e-3,
                            anchor_fraction=None, seed=0, architecture_args={"dropout": 0.0})
    sampler = make_sampler("polycl-s", index, None, seed=99)  # held-out draws, fixed before and after
    rows = np.concatenate([sampler.draw(epoch).items for epoch in (1, 2, 3)])
    torch.manual_seed(config.seed)
    before = mean_loss(build_pretraining_net(config), index, rows, 0.25)
    result = pretrain(index, tmp_path / "enc.ckpt", config)
    net = build_pretraining_net(config)
    net.load_state_dict(read_checkpoint(result.path)[0])
    after = mean_loss(net, index, rows, 0.25)
    assert after < 0.8 * before, (before, after)
    card = result.card
    assert card["kind"] == "encoder" and card["recipe"]["method"] == "polycl-s"
    assert card["training_state"] == {"epoch": 1, "epochs": 1, "complete": True}
    assert card["metrics"]["final_loss"] == round(result.history[-1].loss, 6)


@pytest.mark.parametrize("method", ["simclr", "pix2rep", "polycl-m"])
def test_other_methods_run(tmp_path, method):
    index = synthetic_index(32)
    config = PretrainConfig(method=method, input_size=32, epochs=1, batch_size=8, anchor_fraction=None,
                            pixel_pairs=200)
    result = pretrain(index, tmp_path / "x.ckpt", config)
    assert math.isfinite(result.history[0].loss)
    assert result.card["kind"] == ("pretraining" if method == "pix2rep" else "encoder")
    assert result.card["whole_network"] is (method == "pix2rep")


def test_resume_continues_from_saved_epoch(tmp_path):
    index = synthetic_index(32)
    config = PretrainConfig(method="polycl-o", input_size=32, epochs=3, batch_size=8, lr=1e-3,
                            anchor_fraction=None, save_every=1)
    pretrain(index, tmp_path / "straight.ckpt", config)
    partial = pretrain(index, tmp_path / "run.ckpt", PretrainConfig(**{**config.__dict__, "epochs": 2}))
    assert partial.card["training_state"]["epoch"] == 2
    seen = []
    resumed = pretrain(index, tmp_path / "run.ckpt", config, resume=tmp_path / "run.ckpt", progress=seen.append)
    assert resumed.start_epoch == 2 and [r.epoch for r in seen] == [3]
    assert resumed.card["training_state"] == {"epoch": 3, "epochs": 3, "complete": True}
    assert len(resumed.card["metrics"]["loss_history"]) == 3
    a, b = read_checkpoint(tmp_path / "straight.ckpt")[0], read_checkpoint(tmp_path / "run.ckpt")[0]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "resume must reproduce the uninterrupted run"
    done = pretrain(index, tmp_path / "copy.ckpt", config, resume=tmp_path / "run.ckpt")  # nothing left to do
    assert done.history == [] and read_checkpoint(tmp_path / "copy.ckpt")[1]["training_state"]["epoch"] == 3
    with pytest.raises(ValueError, match="pretrained with"):
        pretrain(index, tmp_path / "other.ckpt", PretrainConfig(**{**config.__dict__, "method": "polycl-s"}),
                 resume=tmp_path / "run.ckpt")


def test_cancel_keeps_last_checkpoint(tmp_path):
    from polycl.progress import Cancelled, new_cancel_flag

    index = synthetic_index(32)
    cancel = new_cancel_flag()
    config = PretrainConfig(method="polycl-s", input_size=32, epochs=5, batch_size=8, anchor_fraction=None,
                            save_every=1)

    def stop_after_two(report):
        if report.epoch == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        pretrain(index, tmp_path / "c.ckpt", config, progress=stop_after_two, cancel=cancel)
    assert read_checkpoint(tmp_path / "c.ckpt")[1]["training_state"]["epoch"] == 2


def test_pretrained_encoder_changes_only_encoder_weights(tmp_path):
    index = synthetic_index(32)
    for method, decoder_changes in (("polycl-s", False), ("pix2rep", True)):
        config = PretrainConfig(method=method, input_size=32, epochs=1, batch_size=8, anchor_fraction=None,
                                pixel_pairs=100, seed=5)
        path = pretrain(index, tmp_path / f"{method}.ckpt", config).path
        torch.manual_seed(123)
        model = build_model("polycl_unet")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        load_pretrained_init(model, path)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("encoder.") for k in changed)
        assert any(k.startswith("decoder.") for k in changed) is decoder_changes
        if not decoder_changes:
            assert all(k.startswith("encoder.") for k in changed)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_stay_in_sync(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT / "PolyCLSlicer")!r}); sys.path.insert(0, {str(ROOT / "tests")!r})
        import torch
        torch.set_num_threads(1)
        import polycl.training.pretraining.trainer as trainer
        from test_pretraining import synthetic_index
        calls = []
        original = trainer.save_checkpoint
        trainer.save_checkpoint = lambda *a, **k: (calls.append(str(a[0])), original(*a, **k))[1]
        config = trainer.PretrainConfig(method="polycl-s", input_size=32, epochs=2, batch_size=8,
                                        anchor_fraction=None, save_every=1, device="cpu")
        result = trainer.pretrain(synthetic_index(32), {str(tmp_path / "out" / "enc.ckpt")!r}, config)
        rank = int(os.environ["RANK"])
        json.dump({{"rank": rank, "world": result.world_size, "checksum": result.checksum,
                   "in_sync": result.in_sync, "saves": calls, "batches": len(result.history)}},
                  open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "PolyCLSlicer")}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(script)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["checksum"] == reports[1]["checksum"] and all(r["in_sync"] for r in reports)
    assert len(reports[0]["saves"]) == 2 and reports[1]["saves"] == []  # rank 0 alone writes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["enc.ckpt", "enc.ckpt.optim"]
    card = read_checkpoint(tmp_path / "out" / "enc.ckpt")[1]
    assert card["recipe"]["world_size"] == 2 and card["training_state"]["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# Slice index and CLI on small synthetic NIfTI files


def write_case(folder: Path, name: str, slices: int, liver: tuple[int, int] | None, flip: bool = False) -> None:
    from polycl.io.volumes import write_mask, write_volume

    matrix = np.diag([2.0, 2.0, 3.0, 1.0])
    if flip:  # stored superior -> inferior: the canonical order must still be inferior first
        matrix[2, 2], matrix[2, 3] = -3.0, 3.0 * (slices - 1)
    rng = np.random.default_rng(len(name))
    ct = (rng.normal(0, 30, (24, 24, slices)) + np.linspace(-100, 100, 24)[:, None, None]).astype(np.int16)
    ct[:3] = -1000  # air, so the volume looks like CT
    write_volume(folder / f"{name}_ct.nii.gz", ct, matrix)
    if liver is not None:
        mask = np.zeros(ct.shape, np.uint8)
        k = np.arange(slices) if not flip else np.arange(slices)[::-1]
        for index, canonical in enumerate(k):
            if liver[0] <= canonical <= liver[1]:
                mask[8:16, 8:16, index] = 1
        write_mask(folder / f"{name}_liver.nii.gz", mask, matrix)


def test_slice_index_labels_flags_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_case(data, "a", 6, (2, 4))
    write_case(data, "b", 5, (0, 1), flip=True)
    write_case(data, "c", 4, None)
    (tmp_path / "flags.json").write_text(json.dumps({"c": {"num_slices": 4, "present": [[3, 3]], "absent": [[0, 1]]}}))
    assert load_flags(tmp_path / "flags.json") == {"c": [0, 0, -1, 1]}
    cache = tmp_path / "cache"
    index = build_slice_index([data], flags=tmp_path / "flags.json", size=16, cache_dir=cache)
    assert [s.name for s in index.scans] == ["a", "b", "c"]
    assert [s.presence_from for s in index.scans] == ["label", "label", "flags"]
    assert index.presence.tolist() == [0, 0, 1, 1, 1, 0] + [1, 1, 0, 0, 0] + [0, 0, -1, 1]
    assert index.images.shape == (15, 1, 16, 16)

    import polycl.training.pretraining.slice_index as module

    monkeypatch.setattr(module, "read_volume", lambda *_: (_ for _ in ()).throw(AssertionError("re-read")))
    cached = build_slice_index([data], flags=tmp_path / "flags.json", size=16, cache_dir=cache)
    assert torch.equal(cached.images, index.images) and cached.presence.tolist() == index.presence.tolist()
    os.utime(data / "c_ct.nii.gz", ns=(1, 1))  # changed file -> re-read
    with pytest.raises(AssertionError, match="re-read"):
        build_slice_index([data], size=16, cache_dir=cache)


def test_cli_pretrain_and_resume(tmp_path, capsys):
    from polycl.cli.pretrain import main

    data = tmp_path / "data"
    data.mkdir()
    write_case(data, "a", 6, (2, 4))
    write_case(data, "b", 5, (0, 1))
    output = tmp_path / "enc.ckpt"
    common = ["pretrain", "--method", "polycl-m", "--data", str(data), "-o", str(output), "--size", "32",
              "--batch-size", "4", "--anchor-fraction", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(common + ["--epochs", "1"]) == 0
    assert main(common + ["--epochs", "1"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(common + ["--epochs", "2", "--resume", str(output)]) == 0
    card = read_checkpoint(output)[1]
    assert card["training_state"]["epoch"] == 2 and card["recipe"]["negative_source"] == "paper"
    assert main(["pretrain", "--method", "polycl-o", "--data", str(data / "a_ct.nii.gz"), "-o",
                 str(tmp_path / "x.ckpt"), "--size", "32", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert main(["pretrain", "--method", "polycl-s", "--data", str(data / "a_ct.nii.gz"), "-o",
                 str(tmp_path / "y.ckpt"), "--size", "32", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "two scans" in capsys.readouterr().err


def test_finetune_from_pretrained_encoder_records_method(tmp_path):
    from polycl.io.volumes import read_mask, read_volume
    from polycl.training.config import FinetuneConfig
    from polycl.training.finetuning import finetune

    write_case(tmp_path, "a", 6, (2, 4))
    encoder = pretrain(synthetic_index(32), tmp_path / "enc.ckpt",
                       PretrainConfig(method="polycl-s", input_size=32, epochs=1, batch_size=8, anchor_fraction=None))
    ct = read_volume(tmp_path / "a_ct.nii.gz")
    result = finetune([(ct, read_mask(tmp_path / "a_liver.nii.gz", ct))], tmp_path / "seg.safetensors",
                      FinetuneConfig(input_size=32, epochs=1, val_fraction=0, device="cpu"), init=encoder.path)
    assert result.card["recipe"]["init_method"] == "polycl-s"


def test_real_data_index_and_one_epoch(data_dir, tmp_path):
    index = build_slice_index([data_dir / "labeled", data_dir / "dicom" / "totalseg_series"], size=32,
                              cache_dir=tmp_path / "cache")
    assert len(index.scans) == 4 and int((index.presence == 1).sum()) == 53
    assert index.scans[-1].name == "totalseg_series" and index.scans[-1].num_slices == 20  # DICOM folder
    result = pretrain(index, tmp_path / "real.ckpt",
                      PretrainConfig(method="polycl-s", input_size=32, epochs=1, batch_size=10))
    assert math.isfinite(result.card["metrics"]["final_loss"])

"""The paper's recipe, exactly (weight-decay groups, presets, two views, VAE selection, rFID/noise protocol)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from flatdino_cli.config import ExtractConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import EncoderTransform, Store, epoch_views, load_rgb
from flatdino_cli.errors import UserError
from flatdino_cli.models import build_model
from flatdino_cli.runs import load_run
from flatdino_cli.stages.dit import train_dit
from flatdino_cli.stages.vae import train_vae
from flatdino_cli.train import param_groups
from test_train import CPU, one_thread  # noqa: F401  (one_thread: autouse, tiny models on one thread)


def _decayed(model, cfg) -> set[str]:
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.decay_2d_only)
    ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_skips_query_tokens_and_position_tables():
    cfg = load_preset("tiny-vae", ["model.enc_depth=1", "model.dec_depth=1"])
    vae = build_model(cfg)
    decayed = _decayed(vae, cfg)
    # the authors decay 2-D weight matrices only: the (1, T, W) tables are not weight matrices
    for table in ("encoder.queries", "decoder.queries", "decoder.pos"):
        assert table not in decayed
    assert "encoder.out_proj.weight" in decayed and "decoder.in_proj.weight" in decayed
    assert not any(n.endswith(".bias") for n in decayed)
    # a DiT with a learned table under the 2-D rule: the table is not decayed either
    dit_cfg = load_preset("tiny-dit", ["model.pos_embed=learned", "train.decay_2d_only=true",
                                       "train.weight_decay=1e-4"])
    dit = build_model(dit_cfg)
    assert "pos_embed" not in _decayed(dit, dit_cfg) and "x_embedder.weight" in _decayed(dit, dit_cfg)


def test_dh_xl_uses_a_learned_position_table_and_xl_stays_sincos():
    dh, xl = load_preset("dh-xl-32x128"), load_preset("xl-32x128")
    assert dh.model.pos_embed == "learned" and dh.model.rope and dh.model.head_depth == 2
    assert xl.model.pos_embed == "sincos" and xl.model.rope
    small = ["model.depth=1", "model.width=64", "model.heads=4", "model.mlp_hidden=128", "model.head_width=64",
             "model.head_heads=4", "model.head_mlp_hidden=128", "model.num_classes=4"]
    net = build_model(load_preset("dh-xl-32x128", small))
    assert net.pos_embed.requires_grad and tuple(net.pos_embed.shape) == (1, 32, 64)
    assert 0.0 < float(net.pos_embed.detach().std()) < 0.05  # trunc-normal(0.02), not a fixed table


@pytest.mark.parametrize("T", [16, 32, 64])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_vae_presets_follow_the_papers_epochs(T, d):
    cfg = load_preset(f"vae-{T}x{d}")
    assert (cfg.model.tokens, cfg.model.latent_dim) == (T, d)
    long = (T, d) in ((32, 64), (32, 128))  # Table 2: 150 epochs; Figure 4's grid: 50 with 5 decaying
    assert (cfg.train.epochs, cfg.train.decay_epochs) == ((150, 22) if long else (50, 5))
    assert cfg.train.schedule == "wsd" and cfg.train.warmup_epochs == 5


def test_vae_32x768_preset_keeps_the_full_feature_dimension():
    cfg = load_preset("vae-32x768")
    assert (cfg.model.tokens, cfg.model.latent_dim) == (32, 768) and cfg.train.epochs == 150
    assert cfg.beta() == pytest.approx(1e-6 * 512 / (32 * 768))


# ----------------------------------------------------------------------------- VAE selection (point 2)
def _feature_store(path, n: int, seed: int, scale: float = 1.0, shape=(8, 16)):
    s = Store.create(path, "features", shape, n, "float32", {"encoder": "synthetic"}, {},
                     [f"img{i}.png" for i in range(n)], [i % 4 for i in range(n)])
    s.write_rows(np.arange(n), scale * np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32))
    s.mark_done(np.arange(n))
    s.finalize()
    s.close()
    return path


def test_vae_best_checkpoint_follows_val_huber_on_val_features(tmp_path):
    train_store = _feature_store(tmp_path / "train", 64, seed=0)
    val_store = _feature_store(tmp_path / "val", 24, seed=1, scale=2.0)  # another set: other numbers
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32",
                                   "model.enc_depth=1", "model.enc_heads=2", "model.dec_width=32",
                                   "model.dec_depth=1", "model.dec_heads=2", "train.epochs=4",
                                   "train.batch_size=8", "train.val_every_epochs=1", "train.warmup_epochs=0",
                                   "train.decay_epochs=1", "loss.beta=0.05"])  # a KL term big enough to matter
    run = tmp_path / "run"
    summary = train_vae(cfg, run, CPU, features=train_store, val_features=val_store)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert len(val) == 4 and summary["best_val"] == pytest.approx(min(r["val/loss"] for r in val))
    assert all(r["val/loss_with_kl"] > r["val/loss"] for r in val)
    # the best checkpoint's Huber on ALL of the --val-features store is the number it was picked by
    _, vae, _ = load_run(run, "vae")
    feats = torch.from_numpy(np.array(Store.open(val_store).data, dtype=np.float32))
    with torch.no_grad():
        recon = vae.decode(vae.encode(feats)[0])
    assert F.huber_loss(recon, feats).item() == pytest.approx(summary["best_val"], rel=1e-4)
    assert json.loads((run / "inputs.json").read_text())["val_features"]["path"] == str(val_store.resolve())
    with pytest.raises(UserError, match="--val-features"):
        train_vae(cfg, tmp_path / "bad", CPU, features=train_store,
                  val_features=_feature_store(tmp_path / "other", 8, seed=2, shape=(4, 16)))


# ----------------------------------------------------------------------------- two views (point 1)
def _images(root, n: int, size=(56, 44), classes: int = 2):
    """n random RGB images in `classes` ImageNet-style synset folders (asymmetric, so mirrors differ)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        a[:, : size[0] // 3] //= 3  # a dark left band: the mirror image is another picture
        Image.fromarray(a).save(d / f"img{i}.JPEG", quality=95)
    return root


def _tiny_vae_run(features, out):
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32",
                                   "model.enc_depth=1", "model.enc_heads=2", "model.dec_width=32",
                                   "model.dec_depth=1", "model.dec_heads=2", "train.max_steps=1",
                                   "train.batch_size=4", "val_count=2"])
    train_vae(cfg, out, CPU, features=features)
    return out


def _tiny_dit(epochs: int, **over):
    sets = ["model.tokens=4", "model.in_dim=8", "model.width=32", "model.depth=1", "model.heads=2",
            "model.mlp_hidden=64", "model.num_classes=2", f"train.epochs={epochs}", "train.batch_size=4",
            "train.warmup_epochs=0", "train.decay_epochs=1", "train.ckpt_every_steps=1000"]
    return load_preset("tiny-dit", sets + [f"{k}={v}" for k, v in over.items()])


def test_two_views_from_extract_to_train_dit_with_bitwise_resume(tmp_path, monkeypatch):
    from flatdino_cli.encoders import load_encoder
    from flatdino_cli.extract import extract_features, extract_latents
    import flatdino_cli.stages.dit as dit_stage

    src = _images(tmp_path / "train", 12)
    cfg = ExtractConfig(encoder="tiny", dtype="float32", batch_size=5, mirror=True)
    extract_features(src, tmp_path / "feats", cfg, CPU)
    feats = Store.open(tmp_path / "feats")
    assert feats.views == 2 and feats.all_views.shape == (12, 2, 36, 64) and feats.data.shape == (12, 36, 64)
    # view 1 is the feature of the mirrored crop, which is NOT the mirrored feature grid
    enc = load_encoder("tiny")
    t = EncoderTransform(48, 48, "bicubic")
    crop = t.pixels(load_rgb(feats.paths[3]))[None]
    with torch.no_grad():
        want = enc(t.finish(crop.flip(-1)))[0].numpy()
    np.testing.assert_allclose(feats.all_views[3, 1], want, rtol=1e-4, atol=1e-4)
    grid = feats.all_views[3, 0].reshape(6, 6, 64)[:, ::-1].reshape(36, 64)
    assert np.abs(grid - feats.all_views[3, 1]).mean() > 0.1

    extract_latents(tmp_path / "feats", _tiny_vae_run(tmp_path / "feats", tmp_path / "vae"), tmp_path / "lat", CPU)
    lat = Store.open(tmp_path / "lat", expect_kind="latents")
    assert lat.views == 2 and lat.all_views.shape == (12, 2, 4, 8)
    _, vae, _ = load_run(tmp_path / "vae", "vae")
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(np.array(feats.all_views[5], dtype=np.float32)))[0]
    np.testing.assert_allclose(lat.all_views[5], mu.numpy(), rtol=1e-4, atol=1e-5)

    # train-dit: each epoch shows each image as crop or mirror, drawn from (seed, epoch, row)
    seen: list[np.ndarray] = []
    real_loss = dit_stage.flow_loss

    def recording(net, z, y, flow):
        seen.append(z.detach().numpy().copy())
        return real_loss(net, z, y, flow)

    monkeypatch.setattr(dit_stage, "flow_loss", recording)
    full = tmp_path / "dit-full"
    train_dit(_tiny_dit(4), full, CPU, tmp_path / "lat")
    rows = np.concatenate(seen).reshape(4, 12, 4, 8)  # (epoch, row in epoch order, T, d)
    both = np.asarray(lat.all_views, dtype=np.float32)  # (12, 2, 4, 8)
    views = np.full((4, 12), -1)
    for e in range(4):
        for z in rows[e]:
            hit = np.argwhere(np.abs(both - z).reshape(12, 2, -1).max(-1) == 0)
            assert len(hit) == 1
            r, v = hit[0]
            views[e, r] = v
            assert v == epoch_views(0, e, 12, 2)[r]
    assert (views >= 0).all() and (views == 1).any() and (views == 0).any()
    assert (views != views[0]).any()  # the draw changes with the epoch

    # killed mid-run and resumed: bitwise the same weights as the uninterrupted run
    class Killed(BaseException):
        pass

    def kill(step, model, ema):
        if step == 5:  # mid epoch 1 (3 steps per epoch)
            raise Killed

    part = tmp_path / "dit-part"
    with pytest.raises(Killed):
        train_dit(_tiny_dit(4, **{"train.ckpt_every_steps": 1}), part, CPU, tmp_path / "lat", on_step=kill)
    train_dit(_tiny_dit(4, **{"train.ckpt_every_steps": 1}), part, CPU, tmp_path / "lat")
    a = load_file(str(full / "checkpoints/latest/model.safetensors"))
    b = load_file(str(part / "checkpoints/latest/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_view_store_still_trains_without_flips_and_says_so(tmp_path, capsys):
    n = 8
    s = Store.create(tmp_path / "lat", "latents", (4, 8), n, "float32", {"vae": "x"}, {},
                     [f"i{i}" for i in range(n)], [i % 2 for i in range(n)])
    s.write_rows(np.arange(n), np.random.default_rng(0).standard_normal((n, 4, 8)).astype(np.float32))
    s.mark_done(np.arange(n))
    s.finalize().close()
    m = json.loads((tmp_path / "lat/manifest.json").read_text())
    del m["views"]  # as written before the view axis existed
    (tmp_path / "lat/manifest.json").write_text(json.dumps(m))
    assert Store.open(tmp_path / "lat").views == 1
    train_dit(_tiny_dit(1), tmp_path / "dit", CPU, tmp_path / "lat")
    out = capsys.readouterr().out
    assert "one view per image" in out and out.count("--mirror") == 1


# ----------------------------------------------------------------------------- rFID protocol (point 5)
def write_inception(path):
    """A random-weight Inception-v3 in clean-fid's torchscript layout (inception-2015-12-05.pt): the real
    code path runs, the numbers it gives mean nothing."""
    import warnings

    from test_fid import random_inception

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; it is the file's format
        torch.jit.script(random_inception()).save(str(path))
    return path


def tiny_decoder_run(out):
    """A train-decoder run dir (random weights) for the tiny encoder's 6 x 6 x 64 features, 48 px out."""
    from flatdino_cli.config import DecoderModelConfig, DecoderStageConfig
    from flatdino_cli.config_yaml import save_config
    from flatdino_cli.checkpoint import save_checkpoint

    cfg = DecoderStageConfig(model=DecoderModelConfig(in_dim=64, num_patches=36, patch_size=8, width=16, depth=1,
                                                      heads=2, mlp_hidden=32))
    torch.manual_seed(0)
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    save_checkpoint(out, "latest", build_model(cfg), None, {"step": 0})
    return out


def mixed_val_folder(root):
    """ImageNet val as it comes: mixed sizes, JPEG, a CMYK JPEG, greyscale JPEG and PNG."""
    rng = np.random.default_rng(3)
    d = root / "n00000000"
    d.mkdir(parents=True)
    pix = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(pix(60, 50)).save(d / "ILSVRC2012_val_00000001.JPEG")
    Image.fromarray(pix(40, 70)).convert("CMYK").save(d / "ILSVRC2012_val_00000002.JPEG")
    Image.fromarray(pix(64, 52)[..., 0]).save(d / "ILSVRC2012_val_00000003.JPEG")  # mode L
    Image.fromarray(pix(100, 90)).save(d / "ILSVRC2012_val_00000004.JPEG")
    Image.fromarray(pix(48, 48)[..., 1], mode="L").save(d / "ILSVRC2012_val_00000005.png")
    return root


def test_rfid_on_a_mixed_size_jpeg_cmyk_greyscale_val_folder(tmp_path):
    from flatdino_cli.analysis.fid import run_fid
    from flatdino_cli.data import adm_center_crop, list_images
    from flatdino_cli.extract import extract_features
    from flatdino_cli.reconstruct import ReconstructConfig, run_reconstruct
    from flatdino_cli.viz import load_png

    val = mixed_val_folder(tmp_path / "val")
    extract_features(val, tmp_path / "feats", ExtractConfig(encoder="tiny", dtype="float32", batch_size=8), CPU)
    vae = _tiny_vae_run(tmp_path / "feats", tmp_path / "vae")
    out = tmp_path / "recon"
    res = run_reconstruct(ReconstructConfig(val, vae, tiny_decoder_run(tmp_path / "dec"), out), progress=False)
    assert res["count"] == 5 and not res["skipped"]
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(p.name for p in (out / "originals").iterdir()) and len(names) == 5
    for i, path in enumerate(list_images(val).paths):  # the originals are the ADM crops PSNR compared with
        assert np.array_equal(load_png(out / "originals" / f"{i:06d}.png"),
                              np.asarray(adm_center_crop(load_rgb(path), 48)))
    inception = write_inception(tmp_path / "inception-2015-12-05.pt")
    rfid = run_fid(out / "images", out / "originals", inception_weights=inception, progress=False)
    assert np.isfinite(rfid["fid"]) and rfid["num_samples"] == rfid["num_ref"] == 5
    with pytest.raises(UserError, match="OUT/originals"):  # the raw folder is refused, pointing at the protocol
        run_fid(out / "images", val, inception_weights=inception, progress=False)


# ----------------------------------------------------------------------------- noise: rFID + PSNR (point 6)
def test_noise_reports_rfid_and_psnr_against_the_original_images(tmp_path):
    from flatdino_cli.fid_metrics import Gaussian, frechet_distance
    from flatdino_cli.analysis.noise import NoiseConfig, run_noise
    from flatdino_cli.data import adm_center_crop
    from flatdino_cli.extract import extract_features
    from flatdino_cli.metrics import psnr
    from flatdino_cli.viz import to_uint8

    val = mixed_val_folder(tmp_path / "val")
    feats = tmp_path / "feats"
    extract_features(val, feats, ExtractConfig(encoder="tiny", dtype="float32", batch_size=8), CPU)
    vae, dec = _tiny_vae_run(feats, tmp_path / "vae"), tiny_decoder_run(tmp_path / "dec")

    class Pool:  # a cheap stand-in for Inception with the extractor interface: 3 pixel statistics
        name = "pool3"

        def __call__(self, images):
            x = images.reshape(len(images), -1, 3).astype(np.float32)
            return {"pool": np.concatenate([x.mean(1), x.std(1), np.median(x, 1)], 1)}

    r = run_noise(NoiseConfig(vae, feats, tmp_path / "out", sigmas=(0.0, 1.0), n=None, batch_size=2, decoder=dec),
                  progress=False, extractor=Pool())
    assert r["n_images"] == 5 and r["rfid_images"] == 5 and len(r["latent"]["rfid"]) == 2
    # sigma 0 on the latent path is the plain reconstruction: recompute its rFID and PSNR by hand
    from flatdino_cli.models.pixel_decoder import load_decoder

    store = Store.open(feats)
    _, model, _ = load_run(vae, "vae")
    pix = load_decoder(dec)
    x = torch.from_numpy(np.array(store.data, dtype=np.float32))
    with torch.no_grad():
        img = pix(model.decode(model.encode(x)[0])).clamp(0, 1)
    real = np.stack([np.asarray(adm_center_crop(load_rgb(p), 48)) for p in store.paths])
    g = lambda a: Gaussian.from_features(Pool()(a)["pool"].astype(np.float64))  # noqa: E731
    assert r["latent"]["rfid"][0] == pytest.approx(frechet_distance(g(to_uint8(img)), g(real)), rel=1e-6)
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).double() / 255
    assert r["latent"]["psnr_vs_image"][0] == pytest.approx(psnr(img, real_t).mean().item(), rel=1e-5)
    assert r["latent"]["rfid"][1] != r["latent"]["rfid"][0]  # the noise reaches the images
    assert "cosine_vs_clean" in r["latent"] and "rfid" in r["features_noise"]  # feature columns kept
    # without Inception weights anywhere: no rFID, and a note saying why
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "nowhere")  # the only place Inception is looked up
    try:
        r = run_noise(NoiseConfig(vae, feats, tmp_path / "out2", sigmas=(0.0,), n=2, decoder=dec), progress=False)
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old
    assert "rfid" not in r["latent"] and "rfid omitted" in r["notes"][0]


def test_rae_stats_and_store_mode_vae_use_both_views(tmp_path):
    from flatdino_cli.stages.dit import compute_stats
    from flatdino_cli.stages.vae import feature_splits

    n = 10
    s = Store.create(tmp_path / "f", "features", (4, 3), n, "float32", {"encoder": "x"}, {},
                     [f"i{i}" for i in range(n)], [0] * n, views=2)
    rows = np.random.default_rng(0).standard_normal((n, 2, 4, 3)).astype(np.float32)
    rows[:, 1] += 5.0  # the "mirror" view sits elsewhere: a crop-only statistic would miss it
    s.write_rows(np.arange(n), rows)
    s.mark_done(np.arange(n))
    s.finalize().close()
    mean, var = compute_stats(Store.open(tmp_path / "f"))  # RAE mode normalises what it trains on
    np.testing.assert_allclose(mean.numpy(), rows.reshape(-1, 4, 3).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var.numpy(), rows.reshape(-1, 4, 3).var(0), rtol=1e-4, atol=1e-5)
    train, val, _ = feature_splits(tmp_path / "f", val_count=2, seed=0)
    train.set_epoch(3)
    views = epoch_views(0, 3, n, 2)
    for i in range(len(train)):
        r = train.indices[i]
        assert np.array_equal(train[i][0].numpy(), rows[r, views[r]])
    assert all(np.array_equal(val[i][0].numpy(), rows[val.indices[i], 0]) for i in range(len(val)))


def test_an_empty_validation_set_picks_no_best_checkpoint(tmp_path):
    # 8 rows hold out 8 // 10 = 0: an empty validation set must not score 0 and freeze `best` at epoch 1
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32",
                                   "model.enc_depth=1", "model.enc_heads=2", "model.dec_width=32",
                                   "model.dec_depth=1", "model.dec_heads=2", "train.epochs=2",
                                   "train.batch_size=4", "train.val_every_epochs=1"])
    summary = train_vae(cfg, tmp_path / "run", CPU, features=_feature_store(tmp_path / "f", 8, seed=0))
    assert summary["best_val"] == float("inf") and not (tmp_path / "run/checkpoints/best").exists()


def test_vae_image_mode_crops_by_the_one_crop_size_rule(tmp_path, monkeypatch):
    """train-vae on images takes its crop size from encoders.default_crop_size (the rule extract uses)."""
    from flatdino_cli import encoders
    from flatdino_cli.stages import vae as vae_stage
    from flatdino_cli.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "imgs", per_class=1, size=56, progress=False)
    assert vae_stage.default_crop_size is encoders.default_crop_size  # the one rule, not a copy
    monkeypatch.setattr(vae_stage, "default_crop_size", lambda enc: enc.spec.image_size + 4)  # ...and it is used
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32", "model.enc_depth=1",
                                   "model.enc_heads=2", "model.dec_width=32", "model.dec_depth=1",
                                   "model.dec_heads=2", "train.max_steps=1", "train.batch_size=4"])
    train_vae(cfg, tmp_path / "run", CPU, images=tmp_path / "imgs", encoder_name="tiny")
    aug = json.loads((tmp_path / "run/inputs.json").read_text())["images"]["augmentation"]
    assert aug["crop_size"] == 48 + 4 and aug["input_size"] == 48

"""`flatdino extract` end to end: toy data -> tiny-encoder store, SIGKILL + rerun is byte-identical,
awkward image folders are handled, and a feature store becomes a latent store through a VAE run; a
full disk names the file, a folder of unreadable images is an error; --mirror's second view from
extract through extract-latents to train-dit (a view drawn per epoch, bitwise resume) and the RAE
statistics and store-mode VAE that read both views."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, run_cli
from flatdino_cli.config import ExtractConfig
from flatdino_cli.data import EncoderTransform, Store, epoch_views, load_rgb
from flatdino_cli.errors import UserError
from flatdino_cli.extract import extract_features, extract_latents
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import CPU
from flatdino_cli.stages.dit import train_dit
from test_dit import tiny_dit
from test_train_vae import tiny_vae_run


def _store_bytes(path):
    return {name: (path / name).read_bytes() for name in ("data.npy", "labels.npy", "paths.txt", "done.npy",
                                                          "manifest.json")}


def test_extract_sigkill_resume_is_byte_identical(tmp_path):
    run_cli("toy-data", tmp_path / "toy", "--per-class", "40", "--size", "48")
    args = ["extract", tmp_path / "toy", None, "--encoder", "tiny", "--batch-size", "16"]
    ref = tmp_path / "ref"
    run_cli(*[a if a is not None else ref for a in args])
    store = Store.open(ref, expect_kind="features")
    assert store.item_shape == (36, 64) and store.count == 480 and store.manifest["identity"]["encoder"] == "tiny"
    assert store.labels.max() == 11
    assert json.loads((ref / "manifest.json").read_text())["complete"] is True

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flatdino_cli.cli", *[str(a if a is not None else out) for a in args]]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some, but not all, rows are done
        done = out / "done.npy"
        if done.exists():
            status = np.load(done, mmap_mode="r")
            if 0 < int((status != 0).sum()) < len(status):
                break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    status = np.load(out / "done.npy")
    assert 0 < int((status != 0).sum()) < len(status), "the kill did not land mid-way"
    run_cli(*[a if a is not None else out for a in args])
    assert _store_bytes(out) == _store_bytes(ref)


def test_extract_awkward_folder(tmp_path):
    d = tmp_path / "messy"
    d.mkdir()
    Image.new("RGB", (60, 50), (10, 200, 30)).save(d / "good.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "notes.txt").write_text("not an image")
    Image.new("CMYK", (40, 40), (0, 120, 0, 0)).save(d / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28)).save(d / "deep16.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one.png")
    p = run_cli("extract", d, tmp_path / "store", "--encoder", "tiny", "--batch-size", "2")
    assert "trunc.jpg" in p.stderr + p.stdout  # the skipped file is named
    store = Store.open(tmp_path / "store")
    names = [os.path.basename(x) for x in store.paths]
    assert sorted(names) == ["cmyk.jpg", "deep16.png", "good.jpg", "one.png", "trunc.jpg"]  # .txt ignored
    assert store.manifest["skipped_count"] == 1
    assert store.manifest["skipped"][0]["path"].endswith("trunc.jpg")
    good = store.valid_indices()
    assert len(good) == 4 and np.isfinite(np.asarray(store.data[good], np.float32)).all()
    assert np.abs(np.asarray(store.data[good], np.float32)).sum() > 0
    p = run_cli("extract", d, tmp_path / "strict", "--encoder", "tiny", "--strict", check=False)
    assert p.returncode == 1 and "trunc.jpg" in p.stderr and "Traceback" not in p.stderr


def test_extract_refuses_a_different_store_and_overwrites(tmp_path):
    run_cli("toy-data", tmp_path / "toy", "--per-class", "2")
    run_cli("extract", tmp_path / "toy", tmp_path / "s", "--encoder", "tiny")
    p = run_cli("extract", tmp_path / "toy", tmp_path / "s", "--encoder", "tiny", "--dtype", "float32", check=False)
    assert p.returncode == 1 and "--overwrite" in p.stderr
    run_cli("extract", tmp_path / "toy", tmp_path / "s", "--encoder", "tiny", "--dtype", "float32", "--overwrite")
    assert Store.open(tmp_path / "s").dtype == np.float32


def test_latent_store_from_a_vae_run(tmp_path, toy_features):
    from flatdino_cli.config import VAEModelConfig, VAEStageConfig
    from flatdino_cli.config_yaml import save_config
    from flatdino_cli.models import build_model
    from flatdino_cli.checkpoint import save_checkpoint

    cfg = VAEStageConfig(model=VAEModelConfig(tokens=4, latent_dim=8, feature_dim=64, num_patches=36, enc_width=32,
                                              enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2))
    vae = build_model(cfg)
    save_config(cfg, tmp_path / "vae" / "config.yaml")
    save_checkpoint(tmp_path / "vae", "latest", vae, None, {"step": 1})
    run_cli("extract", toy_features, tmp_path / "lat", "--vae", tmp_path / "vae")
    lat, feats = Store.open(tmp_path / "lat", expect_kind="latents"), Store.open(toy_features)
    assert lat.item_shape == (4, 8) and lat.count == feats.count == 60
    assert Store.open(tmp_path / "lat" / "val").count == 12
    assert lat.manifest["identity"]["features_manifest_sha256"] == feats.manifest_hash()
    with torch.no_grad():
        mu, _ = vae.eval().encode(torch.from_numpy(np.asarray(feats.data[:5], np.float32)))
    assert torch.allclose(torch.from_numpy(np.array(lat.data[:5])), mu, atol=1e-5)


def _smooth_noise(rng, h, w):
    """Random pixels with edges and gradients: every resampling tap matters."""
    a = rng.integers(0, 256, (h, w, 3)).astype(int) - 127
    return np.clip(np.cumsum(a, axis=1) // 4 + 128, 0, 255).astype(np.uint8)


def test_tensor_adm_crop_is_pillows_pixel_for_pixel():
    """adm_center_crop_tensor (the crop of JPEGs decoded on the device) replays Pillow's BOX halving and
    BICUBIC resize in integers: equal crops for sizes that halve, odd sizes, upscales, exact fits."""
    from flatdino_cli.data import adm_center_crop, adm_center_crop_tensor

    rng = np.random.default_rng(0)
    for h, w in [(375, 500), (333, 517), (1031, 600), (257, 256), (256, 300), (200, 150), (256, 256), (97, 64)]:
        for a in (_smooth_noise(rng, h, w), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)):
            want = np.asarray(adm_center_crop(Image.fromarray(a), 256))
            got = adm_center_crop_tensor(torch.from_numpy(a).permute(2, 0, 1), 256).permute(1, 2, 0).numpy()
            assert got.shape == want.shape and np.array_equal(got, want), (h, w)


def test_extract_with_jpegs_decoded_on_the_device_writes_the_same_store(tmp_path):
    """The GPU path (JPEG bytes through the loader, one batched decode_jpeg on the device, the tensor
    ADM crop) run on the CPU through the same functions gives the CPU path's store byte for byte; EXIF,
    CMYK, PNG and broken files take the CPU path or are skipped the same way."""
    import dataclasses

    from flatdino_cli.data import jpeg as D
    from flatdino_cli.config import ExtractConfig
    from flatdino_cli.extract import extract_features
    from flatdino_cli.runtime import setup_runtime

    rng = np.random.default_rng(1)
    for c, sizes in enumerate([[(75, 100), (48, 48), (120, 61)], [(64, 90), (100, 100), (50, 49)]]):
        d = tmp_path / "imgs" / f"c{c}"
        d.mkdir(parents=True)
        for k, (h, w) in enumerate(sizes):
            Image.fromarray(_smooth_noise(rng, h, w)).save(d / f"{k}.jpg", quality=90, subsampling=k % 3)
    d = tmp_path / "imgs" / "c1"
    Image.fromarray(_smooth_noise(rng, 60, 80)).convert("L").save(d / "grey.jpg")
    Image.fromarray(_smooth_noise(rng, 60, 80)).convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow's path turns it upright
    Image.fromarray(_smooth_noise(rng, 60, 80)).save(d / "exif.jpg", exif=exif)
    Image.fromarray(_smooth_noise(rng, 60, 80)).save(d / "png.png")
    (d / "broken.jpg").write_bytes((d / "0.jpg").read_bytes()[:200])

    decoded = []
    real = D.adm_center_crop_tensor
    D.adm_center_crop_tensor = lambda x, size: (decoded.append(tuple(x.shape)), real(x, size))[1]
    try:
        cfg = ExtractConfig(encoder="tiny", batch_size=4, dtype="float32")
        cpu = setup_runtime("cpu", "fp32", False)
        extract_features(tmp_path / "imgs", tmp_path / "cpu", cfg, cpu)
        assert not decoded
        extract_features(tmp_path / "imgs", tmp_path / "dev", cfg, dataclasses.replace(cpu, jpeg_on_device=True))
    finally:
        D.adm_center_crop_tensor = real
    assert len(decoded) == 7  # the six colour JPEGs and the grey one; not EXIF, CMYK, PNG or the broken file
    assert _store_bytes(tmp_path / "dev") == _store_bytes(tmp_path / "cpu")
    assert Store.open(tmp_path / "cpu").manifest["skipped_count"] == 1


# ----------------------------------------------------------------------------- a full disk, an unreadable folder
def test_disk_full_during_extract_names_the_file(tmp_path, monkeypatch):
    from flatdino_cli.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", per_class=1, size=48, seed=0)

    def full(self, indices, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "write_rows", full)
    with pytest.raises(UserError, match=r"store/data.npy: disk full while writing \(needs about [\d.]+ MB"):
        extract_features(tmp_path / "toy", tmp_path / "store", ExtractConfig(encoder="tiny", batch_size=4), CPU)


def _garbage_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"not an image at all")


def test_all_unreadable_folder_is_an_error_naming_folder_and_files(tmp_path):
    _garbage_images(tmp_path / "bad", ["a.png", "b.jpg", "c.png", "d.png"])
    with pytest.raises(UserError, match=r"bad: none of its 4 images could be read \(e\.g\. .*a\.png.*b\.jpg.*"
                                        r"nothing was written"):
        extract_features(tmp_path / "bad", tmp_path / "store", ExtractConfig(encoder="tiny", val_split=1), CPU)
    assert not (tmp_path / "store").exists()  # no finished store of zeros left to be mistaken for data


# ----------------------------------------------------------------------------- --mirror: two views per image
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


@pytest.mark.usefixtures("one_thread")
def test_two_views_from_extract_to_train_dit_with_bitwise_resume(tmp_path, monkeypatch):
    from flatdino_cli.encoders import load_encoder
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

    extract_latents(tmp_path / "feats", tiny_vae_run(tmp_path / "feats", tmp_path / "vae"), tmp_path / "lat", CPU)
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
    train_dit(tiny_dit(4), full, CPU, tmp_path / "lat")
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
        train_dit(tiny_dit(4, **{"train.ckpt_every_steps": 1}), part, CPU, tmp_path / "lat", on_step=kill)
    train_dit(tiny_dit(4, **{"train.ckpt_every_steps": 1}), part, CPU, tmp_path / "lat")
    a = load_file(str(full / "checkpoints/latest/model.safetensors"))
    b = load_file(str(part / "checkpoints/latest/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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

"""`flatdino extract` end to end: toy data -> tiny-encoder store, SIGKILL + rerun is byte-identical,
awkward image folders are handled, and a feature store becomes a latent store through a VAE run."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from conftest import ROOT, run_cli
from flatdino_cli.data import Store


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

"""Table 10's k-NN as the authors compute it: `extract --preprocess knn` (the whole image resized, no crop,
encoded at that side), the FlatDINO encoder on the larger patch grid, `knn` refusing train/val stores made
differently, and docs/REPRODUCE.md row 7 run on toy data."""

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from flatdino_cli.analysis.knn import KNNConfig, run_knn
from flatdino_cli.config import VAEModelConfig
from flatdino_cli.data import EncoderTransform, Store, adm_center_crop, check_feature_shape, load_rgb, normalize
from flatdino_cli.encoders import load_encoder
from flatdino_cli.encoders.specs import get_spec
from flatdino_cli.errors import UserError
from flatdino_cli.runs import load_run
from flatdino_cli.toydata import write_toy_dataset

ROOT = Path(__file__).resolve().parent.parent
PRE = {"crop": "adm_center_crop", "crop_size": 48, "input_size": 48, "interp": "bicubic"}


def make_store(path: Path, data: np.ndarray, labels, preprocessing: dict, kind: str = "features",
               identity: dict | None = None) -> Path:
    st = Store.create(path, kind, data.shape[1:], len(data), "float32", identity=identity or {"encoder": "test"},
                      preprocessing=preprocessing, paths=[f"/nonexistent/{i}.png" for i in range(len(data))],
                      labels=list(labels))
    st.write_rows(np.arange(len(data)), data)
    st.mark_done(np.arange(len(data)))
    st.finalize()
    st.close()
    return path


@pytest.fixture(scope="module")
def knn_run(toy_features, tmp_path_factory):
    """A tiny VAE trained on the toy ADM features (6 x 6 = 36 patches) and a k-NN store of the same images
    made the authors' way at 64 px (8 x 8 = 64 patches), with a 12-image val split."""
    root = tmp_path_factory.mktemp("knn")
    run_cli("train-vae", "--preset", "tiny-vae", "--features", toy_features, "--epochs", "1", "--out", root / "vae")
    run_cli("extract", toy_features.parent / "toy", root / "k", "--encoder", "tiny", "--preprocess", "knn",
            "--crop-size", "64", "--val-split", "12", "--dtype", "float32")
    return root


def test_whole_image_resize_averages_areas_and_crops_nothing():
    from flatdino_cli.data import whole_image_resize

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (96, 144, 3), dtype=np.uint8)  # H 96 -> 48, W 144 -> 48: 2 x 3 blocks
    want = np.floor(a.reshape(48, 2, 48, 3, 3).astype(np.float64).mean((1, 3)) + 0.5)
    assert (np.asarray(whole_image_resize(Image.fromarray(a), 48)) == want).all()
    # enlarging 3 -> 4 (cv2's INTER_AREA): each output pixel averages what its footprint covers
    cols = np.repeat(np.repeat(np.array([0, 90, 180], np.uint8)[None, :, None], 3, 0), 3, 2)
    assert np.asarray(whole_image_resize(Image.fromarray(cols), 4))[:, :, 0].tolist() == [[0, 60, 120, 180]] * 4
    # INTER_LINEAR, pixel centres aligned and edges clamped: [0, 100] -> 0, 25, 75, 100
    two = np.repeat(np.repeat(np.array([0, 100], np.uint8)[None, :, None], 2, 0), 3, 2)
    assert np.asarray(whole_image_resize(Image.fromarray(two), 4, "bilinear"))[0, :, 0].tolist() == [0, 25, 75, 100]
    # a red band at the left edge of a wide image survives the k-NN transform, not the ADM centre crop
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)
    t = EncoderTransform(40, 40, "area", whole_image=True)
    assert t.pixels(Image.fromarray(wide))[0, :, 0].min() == 255
    assert np.asarray(adm_center_crop(Image.fromarray(wide), 40))[:, 0, 0].max() == 0
    assert t.spec()["crop"] == "whole_image_resize" and t.spec()["input_size"] == 40


def test_encoder_at_256_px_gives_324_patches_from_a_37x37_position_table(tmp_path):
    from flatdino_cli.encoders import _build_vit

    spec = dataclasses.replace(get_spec("tiny"), patch_size=14, image_size=224)  # DINOv2's patch, tiny width
    release = _build_vit(dataclasses.replace(spec, image_size=518))  # the released checkpoints' 37 x 37 grid
    torch.save(release.state_dict(), tmp_path / "w.pt")
    enc = load_encoder(spec, tmp_path / "w.pt", input_size=256)
    assert enc.num_patches == 324 and enc.model.pos_embed.shape == (1, 324, spec.dim)
    assert enc(torch.zeros(1, 3, 256, 256)).shape == (1, 324, spec.dim)


def test_extract_knn_records_the_transform_and_encodes_at_its_side(knn_run, cli):
    st = Store.open(knn_run / "k")
    assert st.item_shape == (64, 64)  # 64 px / patch 8: 8 x 8 patches, not the tiny encoder's 6 x 6
    pre = st.manifest["preprocessing"]
    assert (pre["crop"], pre["crop_size"], pre["input_size"], pre["interp"]) == ("whole_image_resize", 64, 64, "area")
    assert st.manifest["extra"]["grid"] == [8, 8] and Store.open(knn_run / "k" / "val").manifest["preprocessing"] == pre
    enc, t = load_encoder("tiny", input_size=64), EncoderTransform(64, 64, "area", whole_image=True)
    x = torch.stack([t(load_rgb(st.paths[i])) for i in (0, 7)])
    np.testing.assert_allclose(st.data[[0, 7]], enc(x).numpy(), atol=1e-5)
    bad = cli("extract", knn_run / "k", knn_run / "never", "--encoder", "tiny", "--preprocess", "knn",
              "--interp", "bicubic", check=False)
    assert bad.returncode == 1 and "interp" in bad.stderr and bad.stderr.strip().count("\n") == 0, bad.stderr


def test_flat_vae_encodes_a_whole_image_store_of_another_patch_count(knn_run, tmp_path, cli):
    cli("extract", knn_run / "k", tmp_path / "lat", "--vae", knn_run / "vae")
    cfg, vae, _ = load_run(knn_run / "vae", "vae")
    lat = Store.open(tmp_path / "lat")
    assert cfg.model.num_patches == 36 and lat.item_shape == (cfg.model.tokens, cfg.model.latent_dim)
    assert lat.manifest["preprocessing"]["crop"] == "whole_image_resize"
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(np.array(Store.open(knn_run / "k").data[:4], np.float32)))[0]
    np.testing.assert_allclose(lat.data[:4], mu.numpy(), atol=1e-5)
    # decoding needs the VAE's own patch count: --decoded still refuses the store
    bad = cli("extract", knn_run / "k", tmp_path / "dec", "--vae", knn_run / "vae", "--decoded", check=False)
    assert bad.returncode == 1 and "(64, 64)" in bad.stderr, bad.stderr


def test_check_feature_shape_lets_only_the_flat_encoder_take_a_whole_image_grid(tmp_path):
    cfg = VAEModelConfig(feature_dim=8, num_patches=36)
    rows, y = np.zeros((2, 64, 8), np.float32), [0, 1]
    whole = Store.open(make_store(tmp_path / "w", rows, y, {"crop": "whole_image_resize"}))
    check_feature_shape(whole, cfg, "w", encode_only=True)
    adm = Store.open(make_store(tmp_path / "a", rows, y, PRE))
    wide = Store.open(make_store(tmp_path / "c", np.zeros((2, 64, 16), np.float32), y, {"crop": "whole_image_resize"}))
    fae = dataclasses.replace(cfg, kind="fae")  # per-patch latents: its grid is its shape
    for store, c, encode_only in ((adm, cfg, True), (whole, cfg, False), (whole, fae, True), (wide, cfg, True)):
        with pytest.raises(UserError, match="features of shape"):
            check_feature_shape(store, c, store.path, encode_only=encode_only)


def test_knn_refuses_train_and_val_made_differently(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    data = rng.standard_normal((30, 4, 8)).astype(np.float32)
    bicubic, bilinear = PRE, {**PRE, "interp": "bilinear"}
    train = make_store(tmp_path / "train", data, y, bicubic)
    with pytest.raises(UserError, match="interp 'bilinear' vs 'bicubic'") as e:
        run_knn(KNNConfig(train, tmp_path / "no", val=make_store(tmp_path / "v2", data[:9], y[:9], bilinear)),
                progress=False)
    assert "\n" not in str(e.value)
    r = run_knn(KNNConfig(train, tmp_path / "ok", val=make_store(tmp_path / "val", data[:9], y[:9], bicubic), ks=(5,)),
                progress=False)
    assert r["preprocessing"] == bicubic and r["n_val"] == 9
    lat_a, lat_b = (make_store(tmp_path / f"lat{h}", data, y, bicubic, "latents", {"vae_checkpoint_sha256": h})
                    for h in "ab")
    with pytest.raises(UserError, match="another VAE checkpoint"):
        run_knn(KNNConfig(lat_a, tmp_path / "no2", val=lat_b), progress=False)


def test_reproduce_row7_runs_on_toy_data(knn_run, tmp_path, cli):
    # row 7's own commands, on a toy ImageNet layout: the tiny encoder at 64 px (64 patches) stands in for
    # DINOv2 at 256 px (324), and the tiny VAE trained on 36 patches for runs/vae-32x768
    row = next(ln for ln in (ROOT / "docs/REPRODUCE.md").read_text().splitlines() if ln.startswith("| 7 |"))
    commands = [shlex.split(c) for c in re.findall(r"`flatdino ((?:extract|knn) [^`]+)`", row)]
    assert [c[0] for c in commands] == ["extract", "extract", "knn", "extract", "extract", "knn"]
    imagenet = tmp_path / "imagenet"
    write_toy_dataset(imagenet, per_class=4, split="train", progress=False)
    write_toy_dataset(imagenet, per_class=2, split="val", progress=False)
    for words in commands:
        args = [str(knn_run / "vae") if w == "runs/vae-32x768" else w.replace("$IMAGENET", str(imagenet))
                for w in words]
        if args[0] == "extract" and "--vae" not in args:  # from images: the paper's transform, on both sides
            assert args[args.index("--preprocess") + 1] == "knn"
            args += ["--encoder", "tiny", "--crop-size", "64"]
        cli(*args, "--device", "cpu", cwd=tmp_path)
    for out in ("analysis/knn-dino", "analysis/knn-32x768"):
        r = json.loads((tmp_path / out / "knn.json").read_text())
        assert r["preprocessing"]["crop"] == "whole_image_resize" and (r["n_train"], r["n_val"]) == (48, 24)
    assert json.loads((tmp_path / "analysis/knn-dino/knn.json").read_text())["item_shape"] == [64, 64]


def test_analyses_read_a_whole_image_store_s_pixels_the_way_it_was_made(knn_run, tmp_path):
    from flatdino_cli.analysis.common import store_image
    from flatdino_cli.analysis.pca import PCAConfig, run_pca
    from flatdino_cli.data import to_tensor, whole_image_resize

    st = Store.open(knn_run / "k" / "val")
    want = to_tensor(whole_image_resize(load_rgb(st.paths[3]), 64, "area")).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(store_image(st, 3, 64), want, atol=1e-6)  # the overlay figures' pixels
    r = run_pca(PCAConfig(knn_run / "k" / "val", tmp_path / "pca", n=6), progress=False)  # pixel patches of 8 x 8 x 3
    assert r["sources"]["pixels"]["dim"] == 192 and r["sources"]["dino"]["dim"] == 64



def test_extract_whole_resizes_the_whole_image_then_feeds_the_encoder_its_own_size(toy_features, tmp_path, cli):
    # the authors' other analyses (token ablation and noise from 256 px, PCA and redundancy from 224 px) resize
    # the whole image, then bilinear to DINOv2's 224: the ADM stores' patch count, without their crop
    from flatdino_cli.data import resize, whole_image_resize

    cli("extract", toy_features.parent / "toy", tmp_path / "w", "--encoder", "tiny", "--preprocess", "whole",
        "--crop-size", "64", "--dtype", "float32")
    st = Store.open(tmp_path / "w")
    pre = st.manifest["preprocessing"]
    assert st.item_shape == (36, 64)
    assert (pre["crop"], pre["crop_size"], pre["input_size"]) == ("whole_image_resize", 64, 48)
    x = resize(torch.stack([torch.from_numpy(np.array(whole_image_resize(load_rgb(st.paths[i]), 64))).permute(2, 0, 1)
                            for i in (1, 9)]).float() / 255, 48, "bilinear")
    np.testing.assert_allclose(st.data[[1, 9]], load_encoder("tiny")(normalize(x)).numpy(), atol=1e-5)


def test_reproduce_commands_name_real_commands_and_options():
    # every `flatdino ...` / `run ...` command of REPRODUCE.md's FlatDINO part parses: no renamed command or
    # option goes unnoticed (fragments such as `flatdino knn` alone are fine)
    import typer

    from flatdino_cli.cli import app

    group = typer.main.get_command(app)
    text = (ROOT / "docs/REPRODUCE.md").read_text().split("## Baselines")[0]
    found = re.findall(r"`(?:flatdino|run) ([a-z][a-z-]*)((?: [^`]*)?)`", text)
    assert len(found) > 25
    for name, rest in found:
        assert name in group.commands, name
        try:
            group.commands[name].make_context(name, shlex.split(rest))
        except Exception as e:  # noqa: BLE001 - only an unknown option is drift; a missing value is a fragment
            assert type(e).__name__ != "NoSuchOption", f"flatdino {name}{rest}: {e}"

"""`flatdino reconstruct` (reconstruct.py): images -> encoder -> VAE -> pixel decoder, by hand equal to
what it writes (grid, PNGs, per-image PSNR/SSIM/feature cosine), token prefixes kept, mismatched runs
refused; and the rFID protocol on an ImageNet-like val folder (mixed sizes, CMYK, greyscale)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flatdino_cli import reconstruct as R
from flatdino_cli import viz
from flatdino_cli.config import ExtractConfig
from flatdino_cli.data import EncoderTransform, adm_center_crop, load_rgb
from flatdino_cli.encoders import load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.models import build_model
from flatdino_cli.runtime import CPU
from test_sample import T, cli, one_line_error, one_thread, w  # noqa: F401 (fixtures: tiny runs, one thread)
from test_train_vae import tiny_vae_run


# ----------------------------------------------------------------------------- the command on tiny random runs
def test_reconstruct_writes_grid_json_and_truncates_tokens(w, tmp_path):
    from flatdino_cli.models.pixel_decoder import load_decoder
    from flatdino_cli.runs import load_run

    out = tmp_path / "r"
    cli("reconstruct", w["imgs"], "--vae", w["vae"], "--decoder", w["dec"], "--out", out, "--tokens", "2",
        "--batch-size", "2", "--device", "cpu")
    res = json.loads((out / "reconstruct.json").read_text())
    assert res["count"] == 3 and res["tokens_kept"] == 2 and res["tokens"] == T and res["grids"] == ["grid_000.png"]
    grid = viz.load_png(out / "grid_000.png")
    assert grid.shape == (2 + 50, 2 + 6 * 50, 3)  # one row: 3 original | reconstruction pairs (4 fit a row)

    _, vae, _ = load_run(w["vae"], "vae")
    enc, dec = load_encoder("tiny"), load_decoder(w["dec"])
    tf = EncoderTransform(48, 48, "bicubic")
    imgs = [load_rgb(w["imgs"] / f"im{i}.png") for i in range(3)]
    with torch.no_grad():
        feats = enc(torch.stack([tf(im) for im in imgs]))
        mu = vae.encode(feats)[0]
        cut = mu.clone()
        cut[:, 2:] = 0
        rec_feats = vae.decode(cut)
        want = viz.to_uint8(dec(rec_feats))
        full = viz.to_uint8(dec(vae.decode(mu)))
    assert torch.equal(R.keep_prefix(mu, 2), cut)
    for i, row in enumerate(res["per_image"]):
        got = viz.load_png(out / "images" / f"{i:06d}.png")
        assert np.array_equal(got, want[i])
        orig = torch.from_numpy(np.array(adm_center_crop(imgs[i], 48))).permute(2, 0, 1)[None].double() / 255
        rec = torch.from_numpy(got).permute(2, 0, 1)[None].double() / 255
        assert row["psnr"] == pytest.approx(R.psnr(orig, rec).item(), abs=1e-9)
        assert row["ssim"] == pytest.approx(R.ssim(orig, rec).item(), abs=1e-9)
        cos = torch.nn.functional.cosine_similarity(rec_feats[i], feats[i], dim=-1).mean().item()
        assert row["feature_cosine"] == pytest.approx(cos, abs=1e-5)
    assert not np.array_equal(want, full)  # the dropped tokens mattered
    assert res["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in res["per_image"]]))


def test_reconstruct_refuses_another_encoder_and_bad_tokens(w, tmp_path):
    line = one_line_error(cli("reconstruct", w["imgs"], "--vae", w["vae"], "--decoder", w["dec"], "--out", tmp_path,
                              "--encoder", "dinov2-b-reg4", "--device", "cpu", ok=False))
    assert "trained on tiny features" in line
    line = one_line_error(cli("reconstruct", w["imgs"], "--vae", w["vae"], "--decoder", w["dec"], "--out", tmp_path,
                              "--tokens", "5", "--device", "cpu", ok=False))
    assert "0..4" in line


# ----------------------------------------------------------------------------- rFID protocol
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
    vae = tiny_vae_run(tmp_path / "feats", tmp_path / "vae")
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

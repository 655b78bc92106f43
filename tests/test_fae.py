"""FAE mode (seed 004): shapes, parameter counts against the paper's architecture, FLOPs rows,
per-patch ablation, and the train-vae -> extract -> train-dit path on a 2-D latent grid."""

import numpy as np
import pytest
import torch

from conftest import run_cli
from flatdino_cli.analysis import flops as F
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.errors import UserError
from flatdino_cli.models import build_model, count_parameters

PAPER = ["model.feature_dim=1536", "model.enc_width=6144", "model.enc_heads=24", "model.dec_width=1536",
         "model.dec_heads=24", "model.latent_dim=32"]  # seed 004, appendix D (DINOv2-g, 1536-d)


def test_fae_shapes_and_latent_grid():
    cfg = load_preset("tiny-fae", ["model.feature_dim=64", "model.num_patches=36"])
    assert cfg.model.latent_shape == (36, 8)
    m = build_model(cfg).eval()
    x = torch.randn(3, 36, 64)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (3, 36, 8)
    recon, mu2, _ = m(x)
    assert recon.shape == x.shape and torch.equal(mu, mu2)
    # patches interact only through the one attention layer: the encoder is not per-patch linear
    y = x.clone()
    y[:, 0] += 1.0
    assert not torch.allclose(m.encode(y)[0][:, 5], mu[:, 5])


def test_fae_parameter_counts_follow_the_architecture():
    C, I, W, d, depth = 1536, 6144, 1536, 32, 6
    parts = count_parameters(load_preset("fae-16x16x32", PAPER))
    encoder = C + (C * 3 * I + 3 * I) + (I * C + C) + (C * 2 * d + 2 * d)  # norm, qkv, proj, latent head
    hidden = int(2 / 3 * 4 * W)  # 4096
    block = 2 * W + (W * 3 * W + 3 * W) + (W * W + W) + (W * 2 * hidden + 2 * hidden) + (hidden * W + W)
    decoder = (d * W + W) + depth * block + W
    assert parts["enc_norm"] + parts["enc_attn"] + parts["enc_out"] == encoder
    assert parts["dec_in"] + parts["dec_blocks"] + parts["dec_norm"] == decoder
    # the paper's appendix D: 38.17M / 170.43M; its decoder differs by exactly one learned 256 x 1536 table
    assert abs(encoder / 1e6 - 38.17) / 38.17 < 0.01
    assert abs((decoder + 256 * W) / 1e6 - 170.43) < 0.01


def test_fae_flops_rows():
    vae = load_preset("fae-16x16x32").model  # DINOv2-B: C = 768, attention width 3072
    assert F.vae_encoder_flops(vae) == 2 * 256 * 3072 * (2 * 768 + 256)
    table = F.flops_table(load_preset("fae-xl-16x16x32"), load_preset("rae-xl-256x768"), vae)
    assert table["a"]["forward"] == 28 * F.layer_flops(256, 1152) == table["b"]["forward"]
    assert table["a"]["encoding"] > table["b"]["encoding"]  # DINOv2 + the FAE attention layer
    assert round(table["ratio"]["forward"], 6) == 1.0  # same token count: FAE saves channels, not tokens


def test_fae_ablation_is_per_patch(tmp_path):
    from flatdino_cli.analysis.ablate import ablation_heatmaps

    cfg = load_preset("tiny-fae", ["model.feature_dim=16", "model.num_patches=16", "model.dec_depth=1"])
    m = build_model(cfg).eval()
    with torch.no_grad():
        mu, _ = m.encode(torch.randn(4, 16, 16))
        maps = ablation_heatmaps(m.decode, [mu], unit_batch=4)
    assert maps.shape == (16, 16)
    assert (np.argmax(maps, axis=1) == np.arange(16)).mean() >= 0.75  # each latent matters most at its own patch


def test_fae_trains_extracts_and_feeds_a_grid_dit(tmp_path, toy_features):
    """train-vae (FAE) -> extract --vae -> train-dit on the 6x6 latent grid, each stage checked on what
    it produced: the latent store holds the trained FAE's posterior means, per patch, and the DiT
    trained on them takes and returns that grid."""
    import json

    from flatdino_cli.data import Store
    from flatdino_cli.runs import load_run

    run_cli("train-vae", "--preset", "tiny-fae", "--features", toy_features, "--out", tmp_path / "fae",
            "--set", "train.max_steps=3", "--batch-size", "16")
    run_cli("extract", toy_features, tmp_path / "lat", "--vae", tmp_path / "fae")
    lat, feats = Store.open(tmp_path / "lat", expect_kind="latents"), Store.open(toy_features)
    assert lat.item_shape == (36, 8) and lat.count == feats.count
    _, fae, _ = load_run(tmp_path / "fae", "vae")
    with torch.no_grad():
        mu, _ = fae.encode(torch.from_numpy(np.asarray(feats.data[:4], np.float32)))
    assert torch.allclose(torch.from_numpy(np.array(lat.data[:4])), mu, atol=1e-5)

    # a flat-token preset: tokens, width and the 6x6 grid come from the store's manifest, not the preset
    run_cli("train-dit", "--preset", "tiny-dit", "--latents", tmp_path / "lat", "--out", tmp_path / "dit",
            "--set", "train.max_steps=2", "--set", "train.log_every=1", "--batch-size", "8")
    log = [json.loads(ln) for ln in (tmp_path / "dit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    cfg, dit, _ = load_run(tmp_path / "dit", "dit")
    assert (cfg.model.tokens, cfg.model.in_dim, tuple(cfg.model.grid)) == (36, 8, (6, 6))
    assert dit.pos_embed.shape[1] == 36  # one token per grid cell (the preset's patch 1)
    with torch.no_grad():
        v = dit(mu, torch.rand(4), torch.arange(4))
    assert v.shape == mu.shape and torch.isfinite(v).all()


def test_patched_grid_dit_groups_2x2_cells_per_token():
    from flatdino_cli.models.dit import DiT

    cfg = load_preset("tiny-fae-dit", ["model.patch=2", "model.depth=1"]).model
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    assert dit.pos_embed.shape == (1, 9, cfg.width) and dit.x_embedder.in_features == 4 * cfg.in_dim
    x = torch.randn(2, 36, cfg.in_dim)  # (B, 6*6, d), row-major grid
    tokens = dit._patchify(x)  # (B, 9, 4d)
    assert tokens.shape == (2, 9, 4 * cfg.in_dim) and torch.equal(dit._unpatchify(tokens), x)
    # token 0 = cells (0,0), (0,1), (1,0), (1,1) of the 6-wide grid; token 4 (centre) starts at cell (2,2)
    assert torch.equal(tokens[:, 0].reshape(2, 4, -1), x[:, [0, 1, 6, 7]])
    assert torch.equal(tokens[:, 4, : cfg.in_dim], x[:, 14])
    torch.nn.init.normal_(dit.final_layer.linear.weight)  # not zero-initialised: a real output
    v = dit(x, torch.rand(2), torch.tensor([0, 1]))
    assert v.shape == x.shape and v.abs().sum() > 0
    with pytest.raises(UserError, match="model.patch"):
        load_preset("tiny-fae-dit", ["model.patch=4"])  # 6 is not divisible by 4


def test_vae_validation_uses_the_presets_reconstruction_loss():
    """FAE trains on MSE: its validation "loss" (which picks checkpoints/best) is MSE too, not Huber."""
    from flatdino_cli.models.vae import vae_loss
    from flatdino_cli.stages.vae import _val_fn

    cfg = load_preset("tiny-fae", ["model.feature_dim=16", "model.num_patches=16", "model.dec_depth=1"])
    assert cfg.loss.loss == "mse"
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    x = 3 * torch.randn(4, 16, 16)  # errors well above Huber's delta 1, where the two losses differ
    with torch.no_grad():
        out = _val_fn(cfg)(m, [(x, None)], None)
        recon, mu, logvar = m(x)
        mse = vae_loss(recon, x, mu, logvar, cfg.beta(), "mse")[0].item()
        huber = vae_loss(recon, x, mu, logvar, cfg.beta(), "huber")[0].item()
    assert out["loss"] == pytest.approx(mse, rel=1e-5) and abs(mse - huber) > 0.1 * mse
    assert "mse" in out and "huber" not in out

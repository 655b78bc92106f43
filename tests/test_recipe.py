"""The paper's recipe, exactly (weight-decay groups, presets, two views, VAE selection, rFID/noise protocol)."""

from __future__ import annotations

import pytest
import torch

from flatdino_cli.config import load_preset
from flatdino_cli.models import build_model
from flatdino_cli.train import param_groups


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

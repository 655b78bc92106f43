"""Pixel decoder: numerical match with an independent RAE-style reference, RAE key map, loading and
refusals, and RAE's latent-statistics format and layout."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatdino_cli.checkpoint import save_checkpoint
from flatdino_cli.config import DecoderModelConfig, DecoderStageConfig
from flatdino_cli.config_yaml import save_config
from flatdino_cli.errors import UserError
from flatdino_cli.models.pixel_decoder import (PixelDecoder, check_features, load_decoder, ours_to_rae_state_dict,
                                               rae_state_dict_to_ours)
from flatdino_cli.models.stats import load_rae_stats, load_stats, save_rae_stats

# tiny but asymmetric: 3x3 grid, 2x2 patches, 2 heads, input dim != width != mlp hidden
IN, W, HEADS, DEPTH, HID, GRID, PATCH = 12, 16, 2, 2, 24, 3, 2
P = GRID * GRID
TINY = DecoderModelConfig(in_dim=IN, num_patches=P, patch_size=PATCH, width=W, depth=DEPTH, heads=HEADS,
                          mlp_hidden=HID)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- independent reference
def mae_table(dim: int, g: int) -> np.ndarray:
    """MAE's 2-D sin-cos table written from its description: meshgrid(w, h), first half from grid[0]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def rae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in RAE's exact GeneralDecoder key layout (LN affines perturbed, CLS non-zero)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    sd = {"decoder_embed.weight": r(W, IN), "decoder_embed.bias": r(W),
          "decoder_pos_embed": torch.from_numpy(mae_table(W, GRID)).float()[None],
          "trainable_cls_token": r(1, 1, W)}
    for i in range(DEPTH):
        pre = f"decoder_layers.{i}."
        for n in ("query", "key", "value"):
            sd[pre + f"attention.attention.{n}.weight"], sd[pre + f"attention.attention.{n}.bias"] = r(W, W), r(W)
        sd[pre + "attention.output.dense.weight"], sd[pre + "attention.output.dense.bias"] = r(W, W), r(W)
        sd[pre + "intermediate.dense.weight"], sd[pre + "intermediate.dense.bias"] = r(HID, W), r(HID)
        sd[pre + "output.dense.weight"], sd[pre + "output.dense.bias"] = r(W, HID), r(W)
        for ln in ("layernorm_before", "layernorm_after"):
            sd[pre + f"{ln}.weight"], sd[pre + f"{ln}.bias"] = r(W, scale=0.1, base=1.0), r(W, scale=0.1)
    sd["decoder_norm.weight"], sd["decoder_norm.bias"] = r(W, scale=0.1, base=1.0), r(W, scale=0.1)
    sd["decoder_pred.weight"], sd["decoder_pred.bias"] = r(PATCH * PATCH * 3, W), r(PATCH * PATCH * 3)
    return sd


def reference_decode(sd: dict, feats: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RAE.decode as described: separate q/k/v, eager softmax, exact GELU, CLS, einsum unpatchify, *std+mean."""
    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(x, name):
        return F.layer_norm(x, (W,), sd[name + ".weight"], sd[name + ".bias"], eps)

    B, hd = feats.shape[0], W // HEADS
    x = lin(feats, "decoder_embed")
    x = torch.cat([sd["trainable_cls_token"].expand(B, -1, -1), x], dim=1) + sd["decoder_pos_embed"]
    for i in range(DEPTH):
        pre = f"decoder_layers.{i}."
        h = ln(x, pre + "layernorm_before")
        q, k, v = (lin(h, pre + f"attention.attention.{n}").view(B, -1, HEADS, hd).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, -1, W), pre + "attention.output.dense")
        u = lin(ln(x, pre + "layernorm_after"), pre + "intermediate.dense")
        x = x + lin(0.5 * u * (1 + torch.erf(u / math.sqrt(2))), pre + "output.dense")
    logits = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]
    img = torch.einsum("nhwpqc->nchpwq", logits.reshape(B, GRID, GRID, PATCH, PATCH, 3))
    return img.reshape(B, 3, GRID * PATCH, GRID * PATCH) * STD + MEAN


# ----------------------------------------------------------------------------- model
def test_rae_file_matches_reference(tmp_path):
    sd = rae_state_dict()
    torch.save(sd, tmp_path / "model.pt")
    dec = load_decoder(tmp_path / "model.pt", heads=HEADS)
    assert dec.cfg == TINY and not dec.training
    feats = torch.randn(2, P, IN)
    with torch.no_grad():
        out, ref = dec(feats), reference_decode(sd, feats)
    assert out.shape == (2, 3, GRID * PATCH, GRID * PATCH)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the release directory itself works too, and cfg supplies the heads when the width matches
    torch.testing.assert_close(load_decoder(tmp_path, cfg=TINY)(feats), out, atol=1e-6, rtol=1e-6)


def test_wrapped_prefixed_half_precision_file_loads(tmp_path):
    sd = rae_state_dict(1)
    wrapped = {"ema": {f"module._orig_mod.{k}": v.half() for k, v in sd.items()}, "model": {}, "step": 3}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    dec = load_decoder(tmp_path / "ckpt.pt", heads=HEADS)
    assert dec.pos_embed.dtype == torch.float32
    feats = torch.randn(1, P, IN)
    ref = reference_decode({k: v.half().float() for k, v in sd.items()}, feats)
    torch.testing.assert_close(dec(feats), ref, atol=1e-5, rtol=1e-5)


def test_unpatchify_order_is_row_col_channel():
    dec = PixelDecoder(TINY)
    # code every logit by (patch n, row-in-patch a, col-in-patch b, channel c), channel fastest
    n, a, b, c = torch.meshgrid(*(torch.arange(k) for k in (P, PATCH, PATCH, 3)), indexing="ij")
    logits = (1000 * n + 100 * a + 10 * b + c).float().reshape(1, P, -1)
    img = dec.unpatchify(logits)
    for (ch, y, x) in [(0, 0, 0), (2, 1, 0), (1, 0, 5), (2, 5, 3), (0, 3, 4)]:
        patch = (y // PATCH) * GRID + x // PATCH
        assert img[0, ch, y, x] == 1000 * patch + 100 * (y % PATCH) + 10 * (x % PATCH) + ch


def test_fresh_model_tables_and_state_dict():
    dec = PixelDecoder(TINY)
    torch.testing.assert_close(dec.pos_embed[0], torch.from_numpy(mae_table(W, GRID)).float())
    assert not dec.pos_embed.requires_grad and dec.cls_token.requires_grad
    sd = dec.state_dict()
    assert "pos_embed" in sd and "mean" not in sd and "std" not in sd
    assert dec.blocks[0].norm1.eps == 1e-12 and dec.norm.eps == 1e-12
    with pytest.raises(ValueError, match="expects"):
        dec(torch.randn(1, P + 1, IN))


def test_key_maps_round_trip():
    ours = PixelDecoder(TINY).state_dict()
    rae = ours_to_rae_state_dict(ours)
    assert set(rae) == set(rae_state_dict())
    back = rae_state_dict_to_ours(rae)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    sd = rae_state_dict()
    again = ours_to_rae_state_dict(rae_state_dict_to_ours(sd))
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    fused = rae_state_dict_to_ours(sd)["blocks.1.attn.qkv.weight"]
    assert torch.equal(fused[W:2 * W], sd["decoder_layers.1.attention.attention.key.weight"])


# ----------------------------------------------------------------------------- refusals
def test_pickled_object_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"decoder_embed.weight": Evil()}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="model.pt"):
        load_decoder(tmp_path / "model.pt", heads=HEADS)
    assert not marker.exists()


def test_unknown_and_foreign_keys_name_the_file(tmp_path):
    sd = rae_state_dict()
    sd["decoder_layers.0.attention.rotary.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(UserError, match=r"extra\.pt.*rotary"):
        load_decoder(tmp_path / "extra.pt", heads=HEADS)
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"other\.pt.*not a pixel-decoder"):
        load_decoder(tmp_path / "other.pt")
    with pytest.raises(UserError, match="not found"):
        load_decoder(tmp_path / "missing.pt")
    torch.save(rae_state_dict(), tmp_path / "model.pt")
    with pytest.raises(UserError, match="heads"):  # width 16 is no RAE width: heads must be given
        load_decoder(tmp_path / "model.pt")


def test_run_directory_loads_latest_ema(tmp_path):
    model, ema = PixelDecoder(TINY), PixelDecoder(TINY)
    with torch.no_grad():
        ema.pred.bias.add_(1.0)
    save_config(DecoderStageConfig(model=TINY), tmp_path / "config.yaml")
    save_checkpoint(tmp_path, "latest", model, ema, {"step": 1})
    dec = load_decoder(tmp_path)
    assert torch.equal(dec.pred.bias, ema.pred.bias) and dec.cfg == TINY


def test_check_features():
    dec = PixelDecoder(TINY)
    check_features(dec, P, IN)
    with pytest.raises(UserError, match=f"{P} x {IN}.*256 x 768"):
        check_features(dec, 256, 768)


# ----------------------------------------------------------------------------- RAE statistics
def test_stats_file_format_and_layout(tmp_path):
    C, H = 6, 3
    mean, var = torch.randn(C, H, H), torch.rand(C, H, H) + 0.5
    save_rae_stats(tmp_path / "stat.pt", mean, var)
    raw = torch.load(tmp_path / "stat.pt", weights_only=True)
    assert set(raw) == {"mean", "var"} and raw["mean"].shape == (C, H, H)
    m, v = load_rae_stats(tmp_path / "stat.pt")
    assert torch.equal(m, mean) and torch.equal(v, var)

    x = torch.randn(2, H * H, C)  # our token layout
    z = x.transpose(1, 2).reshape(2, C, H, H)  # RAE's 2-D latent
    zn = (z - mean) / torch.sqrt(var + 1e-5)
    expected = zn.reshape(2, C, H * H).transpose(1, 2)
    stats = load_stats(tmp_path / "stat.pt", (H, H))  # the reader sampling and training use
    torch.testing.assert_close(stats.normalize(x), expected)
    torch.testing.assert_close(stats.denormalize(stats.normalize(x)), x)

    # token-layout (P, C) stats are written in RAE's (C, H, W) layout
    tok_mean = mean.reshape(C, H * H).T
    save_rae_stats(tmp_path / "tok.pt", tok_mean, var.reshape(C, H * H).T)
    assert torch.equal(load_rae_stats(tmp_path / "tok.pt")[0], mean)


def test_stats_missing_key_and_foreign_file(tmp_path):
    mean = torch.randn(4, 2, 2)
    torch.save({"mean": mean}, tmp_path / "stat.pt")
    m, v = load_rae_stats(tmp_path / "stat.pt")
    assert torch.equal(m, mean) and v.item() == 1.0  # RAE: a missing var is 1
    x = torch.randn(1, 4, 4)
    torch.testing.assert_close(load_stats(tmp_path / "stat.pt", (2, 2)).normalize(x),
                               (x - mean.flatten(1).T) / math.sqrt(1 + 1e-5))
    torch.save({"running_mean": mean}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad\.pt"):
        load_rae_stats(tmp_path / "bad.pt")


def test_stats_file_written_atomically(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous stat.pt intact and no stray file; the new file
    gets a plain open()'s mode (0644 under the usual umask), not a temp file's 0600."""
    path = tmp_path / "stat.pt"
    save_rae_stats(path, torch.zeros(2, 1, 1), torch.ones(2, 1, 1))
    before = path.read_bytes()

    def torn_save(obj, f, *a, **k):
        f.write(b"half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_rae_stats(path, torch.ones(2, 1, 1), torch.ones(2, 1, 1))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["stat.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

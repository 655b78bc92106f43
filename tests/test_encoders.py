"""Encoder feature path, weight layouts (timm / HF / Meta), and fast failure without weights."""

import os
import pickle
import socket
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from flatdino_cli.encoders import RANDOM_INIT_POSITION_SCALE, FrozenEncoder, _build_vit, _give_position, load_encoder
from flatdino_cli.encoders.keys import read_state_dict
from flatdino_cli.encoders.specs import ENCODERS, NUM_PREFIX_TOKENS, EncoderSpec
from flatdino_cli.errors import UserError
from flatdino_cli.utils import sha256_file
from flatdino_cli.nn.embed import sincos_2d

# a second small spec, so layouts are checked at a size other than `tiny`'s
SMALL = EncoderSpec("small-test", image_size=48, patch_size=8, dim=32, depth=2, heads=4, description="test", seed=7)


def reference_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Built independently of FrozenEncoder: timm blocks, then F.layer_norm without affine, then slice."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.blocks(model.norm_pre(h))  # (B, P + N, C)
    h = F.layer_norm(h, (h.shape[-1],), eps=1e-6)
    return h[:, model.num_prefix_tokens:]


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter moved off its init (LayerScale 1e-5 would hide most block bugs; norm affine 1/0
    would hide a forgotten final-norm affine)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def images(spec: EncoderSpec, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))


def test_tiny_parity_with_timm_blocks_and_output_stats():
    enc = load_encoder("tiny")
    spec = ENCODERS["tiny"]
    assert (enc.num_patches, enc.dim, enc.grid) == (36, 64, (6, 6)) == (spec.num_patches, spec.dim, spec.grid)
    assert enc.num_prefix_tokens == NUM_PREFIX_TOKENS == 5
    assert "for testing only" in spec.description
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # stays frozen in eval
    x = images(spec, 3)
    y = enc(x)
    assert y.dtype == torch.float32 and y.shape == (3, 36, 64)
    vit = _build_vit(spec).eval()
    _give_position(vit, spec)
    ref = reference_features(vit, x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    # the random-init encoder's features carry position (as trained DINOv2's do): the table is the
    # scaled 2-D sin-cos one, and the per-position mean over images holds a real share of the variance
    torch.testing.assert_close(enc.model.pos_embed[0], RANDOM_INIT_POSITION_SCALE * sincos_2d(6, 6, 64))
    noise = enc(images(spec, 64))  # (64, 36, 64) features of white-noise images
    share = noise.mean(0).var(0).sum() / noise.var((0, 1)).sum()
    assert share > 0.04  # 0.062 measured; timm's 0.02-std random table gives 0.016
    # per-token LayerNorm without affine: mean 0, variance 1 (eps 1e-6)
    assert y.mean(-1).abs().max() < 1e-5
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 36), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="expects"):
        enc(torch.randn(1, 3, 56, 56))


def test_tiny_weights_are_fixed_whatever_the_global_rng():
    torch.manual_seed(123)
    a = load_encoder("tiny").state_dict()
    torch.manual_seed(456)
    state = torch.random.get_rng_state()
    b = load_encoder("tiny").state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # building does not consume the caller's RNG
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_timm_pth_roundtrip_ignores_final_affine_and_strips_wrappers(tmp_path):
    src = perturbed(_build_vit(SMALL), seed=3).eval()
    sd = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd, "step": 5}, tmp_path / "enc.pth")
    enc = load_encoder(SMALL, tmp_path / "enc.pth")
    x = images(SMALL)
    ref = reference_features(src, x)
    torch.testing.assert_close(enc(x), ref, atol=1e-6, rtol=0)
    # the perturbed final-norm affine must not leak into the features
    assert (src.forward_features(x)[:, 5:] - ref).abs().max() > 0.05
    assert enc.weights_id == f"sha256:{sha256_file(tmp_path / 'enc.pth')}"


def test_timm_layout_pos_embed_is_resampled_to_the_spec_grid(tmp_path):
    big = EncoderSpec("big-grid", image_size=64, patch_size=8, dim=32, depth=2, heads=4, description="test")
    src = perturbed(_build_vit(big), seed=4)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "grid8.safetensors")
    enc = load_encoder(SMALL, tmp_path / "grid8.safetensors")
    want = F.interpolate(src.pos_embed.detach().reshape(1, 8, 8, 32).permute(0, 3, 1, 2), size=(6, 6),
                         mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1).reshape(1, 36, 32)
    torch.testing.assert_close(enc.model.pos_embed, want, atol=1e-6, rtol=0)


def _legacy_hf_names(sd: dict) -> dict:
    """transformers >= 5 module names -> the names in the hub's facebook/dinov2-with-registers-base file."""
    out = {}
    for k, v in sd.items():
        for new, old in [(".attention.q_proj.", ".attention.attention.query."),
                         (".attention.k_proj.", ".attention.attention.key."),
                         (".attention.v_proj.", ".attention.attention.value."),
                         (".attention.o_proj.", ".attention.output.dense.")]:
            k = k.replace(new, old)
        out[k] = v
    return out


@pytest.mark.parametrize("legacy_names", [False, True])
def test_hf_layout_matches_transformers_model(tmp_path, legacy_names):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    # stored grid 8x8 (64 px), used at 48 px: HF interpolates its pos-embed at run time, we at load time
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                                    image_size=64, num_register_tokens=4, layerscale_value=1.0)
    torch.manual_seed(0)
    hf = perturbed(Dinov2WithRegistersModel(cfg), seed=5).eval()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(_legacy_hf_names(sd) if legacy_names else sd, tmp_path / "hf.safetensors")
    enc = load_encoder(SMALL, tmp_path / "hf.safetensors")
    # RAE's Dinov2withNorm: the final layernorm loses its affine; then drop CLS + 4 registers
    hf.layernorm = nn.LayerNorm(32, eps=1e-6, elementwise_affine=False)
    x = images(SMALL)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 5:]
    assert ref.shape == (2, 36, 32)
    torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=0)


def test_meta_layout_folds_cls_pos(tmp_path):
    src = perturbed(_build_vit(SMALL), seed=6).eval()
    sd = src.state_dict()
    pos_cls = torch.randn(1, 1, 32)
    meta = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    meta.update(cls_token=sd["cls_token"] - pos_cls, register_tokens=sd["reg_token"], mask_token=torch.zeros(1, 32),
                pos_embed=torch.cat([pos_cls, sd["pos_embed"]], 1))
    torch.save(meta, tmp_path / "meta.pt")
    x = images(SMALL)
    torch.testing.assert_close(load_encoder(SMALL, tmp_path / "meta.pt")(x), reference_features(src, x),
                               atol=1e-5, rtol=0)


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_encoder("tiny", tmp_path / "nope.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="matches neither"):
        load_encoder("tiny", tmp_path / "other.safetensors")
    sd = _build_vit(ENCODERS["tiny"]).state_dict()
    del sd["blocks.3.attn.qkv.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing.*blocks\.3\.attn\.qkv\.weight"):
        load_encoder("tiny", tmp_path / "partial.pth")
    narrow = EncoderSpec("narrow", image_size=48, patch_size=8, dim=32, depth=4, heads=4, description="test")
    torch.save(_build_vit(narrow).state_dict(), tmp_path / "small.pth")
    with pytest.raises(UserError, match="shapes do not fit encoder tiny"):
        load_encoder("tiny", tmp_path / "small.pth")
    with pytest.raises(UserError, match="valid names: dinov2-b-reg4, dinov2-s-reg4, dinov2-g-reg4, tiny"):
        load_encoder("dinov2-b-giant")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch boom_marker",))


def test_pickled_object_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": _Boom()}, f, protocol=2)
    with pytest.raises(UserError, match="evil.pth: not a readable tensor state dict"):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "boom_marker").exists()


@pytest.fixture
def silent_server():
    """A local port that accepts connections and never answers: the probe must time out, not hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


@pytest.mark.parametrize("offline,endpoint", [("1", None),  # HF_HUB_OFFLINE=1
                                              (None, "http://127.0.0.1:9"),  # closed port: refused at once
                                              (None, "silent")])  # accepted, never answered
def test_missing_pretrained_weights_fail_fast(tmp_path, monkeypatch, silent_server, offline, endpoint):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    if endpoint:
        monkeypatch.setenv("HF_ENDPOINT", silent_server if endpoint == "silent" else endpoint)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_encoder("dinov2-b-reg4")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "--encoder-weights" in msg and str(tmp_path / "hub") in msg and "\n" not in msg


def test_pretrained_weights_come_from_the_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = EncoderSpec("cached-test", image_size=48, patch_size=8, dim=32, depth=2, heads=4, description="test",
                       hub_repos=("someone/small-reg4",))
    snap = tmp_path / "hub" / "models--someone--small-reg4" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("ab" * 20)
    src = perturbed(_build_vit(spec), seed=8).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snap / "model.safetensors")
    enc = load_encoder(spec)
    assert isinstance(enc, FrozenEncoder) and enc.weights_id == f"hf:someone/small-reg4@{'ab' * 20}"
    x = images(spec)
    torch.testing.assert_close(enc(x), reference_features(src, x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- baseline encoders (RAE's S, FAE's g)
# ViT-g's family at a test size: SwiGLU MLP; width 48 gives HF's (int(4 * 48 * 2/3) + 7) // 8 * 8 = 128
# hidden units and timm's int(48 * 5.33334) / 2 = 128 alike
GIANT_SMALL = EncoderSpec("g-test", image_size=48, patch_size=8, dim=48, depth=2, heads=4, description="test",
                          seed=3, arch="vit_giant_patch14_reg4_dinov2")


def test_baseline_encoder_specs():
    s, g = ENCODERS["dinov2-s-reg4"], ENCODERS["dinov2-g-reg4"]
    assert (s.dim, s.depth, s.heads, s.num_patches) == (384, 12, 6, 256)
    assert (g.dim, g.depth, g.heads, g.num_patches, g.patch_size) == (1536, 40, 24, 256, 14)
    assert g.hub_repos[1] == "facebook/dinov2-with-registers-giant" and s.arch == "vit_small_patch14_reg4_dinov2"
    with torch.device("meta"):  # the full ViT-g is built as the spec says (no memory on meta)
        vit = _build_vit(g)
    assert sum(p.numel() for p in vit.parameters()) / 1e6 == pytest.approx(1136, abs=2)  # DINOv2-g: 1.1B
    assert vit.blocks[0].mlp.fc1.out_features == 2 * 4096


@pytest.mark.parametrize("legacy_names", [False, True])
def test_hf_swiglu_layout_matches_transformers_giant_model(tmp_path, legacy_names):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                                    image_size=48, num_register_tokens=4, layerscale_value=1.0, use_swiglu_ffn=True)
    torch.manual_seed(0)
    hf = perturbed(Dinov2WithRegistersModel(cfg), seed=8).eval()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if legacy_names:  # the hub file's names: attention.attention.*, packed mlp.weights_in / weights_out
        sd = _legacy_hf_names(sd)
        for i in range(2):
            p = f"encoder.layer.{i}.mlp."
            for kind in ("weight", "bias"):
                sd[p + f"weights_in.{kind}"] = torch.cat([sd.pop(p + f"gate_proj.{kind}"),
                                                          sd.pop(p + f"up_proj.{kind}")], 0)
                sd[p + f"weights_out.{kind}"] = sd.pop(p + f"down_proj.{kind}")
    save_file(sd, tmp_path / "hf.safetensors")
    enc = load_encoder(GIANT_SMALL, tmp_path / "hf.safetensors")
    hf.layernorm = nn.LayerNorm(48, eps=1e-6, elementwise_affine=False)
    x = images(GIANT_SMALL)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 5:]
    torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=0)


def test_meta_layout_of_vit_g_renames_swiglu(tmp_path):
    src = perturbed(_build_vit(GIANT_SMALL), seed=9).eval()
    sd = src.state_dict()
    meta = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()
            if k not in ("cls_token", "reg_token", "pos_embed")}
    meta.update(cls_token=sd["cls_token"], register_tokens=sd["reg_token"],
                pos_embed=torch.cat([torch.zeros(1, 1, 48), sd["pos_embed"]], 1))
    torch.save(meta, tmp_path / "meta.pt")
    x = images(GIANT_SMALL)
    torch.testing.assert_close(load_encoder(GIANT_SMALL, tmp_path / "meta.pt")(x), reference_features(src, x),
                               atol=1e-5, rtol=0)


def test_one_hf_cache_lookup_serves_encoders_and_the_discriminator(tmp_path, monkeypatch):
    """cached_hub_weights: repos in order, model.safetensors before pytorch_model.bin, None on a miss; the
    dino-s8 discriminator resolves its weights through the same lookup."""
    from flatdino_cli.encoders.hf_cache import cached_hub_weights
    from flatdino_cli.losses.discriminator import DINO_S8_REPO, resolve_dino_s8_weights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def cache(repo, *files):
        snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("cd" * 20)
        snap.mkdir(parents=True)
        (snap.parent.parent / "refs").mkdir()
        (snap.parent.parent / "refs" / "main").write_text("cd" * 20)
        for f in files:
            (snap / f).write_bytes(b"weights")
        return snap

    a = cache("org/a", "pytorch_model.bin")
    b = cache("org/b", "pytorch_model.bin", "model.safetensors")
    assert cached_hub_weights("org/a", "org/b") == a / "pytorch_model.bin"
    assert cached_hub_weights("org/missing", "org/b") == b / "model.safetensors"
    assert cached_hub_weights("org/missing") is None
    d = cache(DINO_S8_REPO, "model.safetensors")
    assert resolve_dino_s8_weights() == d / "model.safetensors"

"""RAE's released DiTs in and out (interop/rae.py, `flatdino export-rae`): loaded, exported, refused.

RAE-layout stage-2 state dicts (LightningDiT and DiT-DH) are built here from RAE's key layout, and a
minimal reference forward written here from that layout (RAE's model code read for facts:
src/stage2/models/{lightningDiT,DDT,model_utils}.py) computes RAE's u(x, t_R). The checkpoint goes
through `flatdino sample`'s loader, and the velocity our sampler sees must be -u(x, 1 - t). The same
checkpoints drive the guidance tests of test_sample_guidance.py.
"""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from flatdino_cli.checkpoint import save_checkpoint
from flatdino_cli.cli import app
from flatdino_cli.config import DecoderModelConfig, DecoderStageConfig, DiTModelConfig, DiTStageConfig
from flatdino_cli.config_yaml import save_config
from flatdino_cli.flow import FlowConfig, make_velocity_fn
from flatdino_cli.flow import sample as flow_sample
from flatdino_cli.models import build_model
from flatdino_cli.models.stats import save_rae_stats
from flatdino_cli.pipeline.load import load_dit

C, SIDE, K = 8, 4, 5  # feature dim, grid side (16 tokens), classes
LIGHTNING = dict(dh=False, width=32, depth=2, heads=2)  # mlp_ratio 4 -> SwiGLU int(2/3 * 128) = 85
DDT = dict(dh=True, width=32, depth=2, heads=2, head_width=48, head_depth=2, head_heads=2)


# ----------------------------------------------------------------------------- RAE's layout, written here
def rae_rope(side: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=side): freqs_cos, freqs_sin (side^2, head_dim)."""
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    f = torch.einsum("i,f->if", torch.arange(side).float(), freqs).repeat_interleave(2, dim=-1)  # (side, dim)
    f = torch.cat([f[:, None, :].expand(side, side, dim), f[None, :, :].expand(side, side, dim)], dim=-1)
    f = f.reshape(side * side, head_dim)
    return f.cos(), f.sin()


def rae_state_dict(dh: bool, width: int, depth: int, heads: int, head_width: int = 0, head_depth: int = 0,
                   head_heads: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in RAE's key layout (LightningDiT, or DiTwDDTHead when dh), mlp_ratio 4; a head as
    wide as the trunk has no s_projector (RAE's nn.Identity)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=g)

    def block(p: str, w: int):
        hid = int(2 / 3 * int(w * 4.0))
        return {f"{p}.norm1.weight": 1 + r(w), f"{p}.norm2.weight": 1 + r(w),
                f"{p}.attn.qkv.weight": r(3 * w, w), f"{p}.attn.qkv.bias": r(3 * w),
                f"{p}.attn.proj.weight": r(w, w), f"{p}.attn.proj.bias": r(w),
                f"{p}.mlp.w12.weight": r(2 * hid, w), f"{p}.mlp.w12.bias": r(2 * hid),
                f"{p}.mlp.w3.weight": r(w, hid), f"{p}.mlp.w3.bias": r(w),
                f"{p}.adaLN_modulation.1.weight": r(6 * w, w), f"{p}.adaLN_modulation.1.bias": r(6 * w)}

    W, N = width, SIDE * SIDE
    out_w = head_width if dh else width
    sd = {"pos_embed": r(1, N, W), "t_embedder.W": torch.randn(256, generator=g),
          "t_embedder.mlp.0.weight": r(W, 512), "t_embedder.mlp.0.bias": r(W),
          "t_embedder.mlp.2.weight": r(W, W), "t_embedder.mlp.2.bias": r(W),
          "y_embedder.embedding_table.weight": r(K + 1, W),
          "final_layer.norm_final.weight": 1 + r(out_w), "final_layer.linear.weight": r(C, out_w),
          "final_layer.linear.bias": r(C), "final_layer.adaLN_modulation.1.weight": r(2 * out_w, out_w),
          "final_layer.adaLN_modulation.1.bias": r(2 * out_w)}
    for i in range(depth):
        sd.update(block(f"blocks.{i}", W))
    if dh:
        sd.update({"s_embedder.proj.weight": r(W, C, 1, 1), "s_embedder.proj.bias": r(W),
                   "x_embedder.proj.weight": r(head_width, C, 1, 1), "x_embedder.proj.bias": r(head_width)})
        if head_width != W:
            sd.update({"s_projector.weight": r(head_width, W), "s_projector.bias": r(head_width)})
        for j in range(head_depth):
            sd.update(block(f"blocks.{depth + j}", head_width))
        for name, w, h in (("enc_feat_rope", W, heads), ("dec_feat_rope", head_width, head_heads)):
            sd[f"{name}.freqs_cos"], sd[f"{name}.freqs_sin"] = rae_rope(SIDE, w // h)
    else:
        sd.update({"x_embedder.proj.weight": r(W, C, 1, 1), "x_embedder.proj.bias": r(W)})
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = rae_rope(SIDE, W // heads)
    return sd


def rae_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, dh: bool, depth: int, heads: int,
                head_heads: int = 0) -> torch.Tensor:
    """RAE's u(x, t_R): x (B, C, H, W) -> (B, C, H, W), from the state dict alone."""
    B = x.shape[0]

    def lin(h, p):
        return h @ sd[p + ".weight"].T + sd[p + ".bias"]

    def rms(h, p):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[p + ".weight"]

    def rot(h):  # rotate_half on interleaved pairs
        return torch.stack((-h[..., 1::2], h[..., 0::2]), dim=-1).flatten(-2)

    def block(h, c, p, nh, rope):
        c = c if c.dim() == 3 else c[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), p + ".adaLN_modulation.1").chunk(6, -1)
        a = rms(h, p + ".norm1") * (1 + sc1) + sh1
        n, w = a.shape[1], a.shape[2]
        q, k, v = lin(a, p + ".attn.qkv").reshape(B, n, 3, nh, w // nh).permute(2, 0, 3, 1, 4)
        cos, sin = sd[rope + ".freqs_cos"], sd[rope + ".freqs_sin"]
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // nh), -1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(B, n, w), p + ".attn.proj")
        m = rms(h, p + ".norm2") * (1 + sc2) + sh2
        u1, u2 = lin(m, p + ".mlp.w12").chunk(2, -1)
        return h + g2 * lin(F.silu(u1) * u2, p + ".mlp.w3")

    def embed(p):  # timm PatchEmbed: conv, flatten, (B, N, W)
        return F.conv2d(x, sd[p + ".proj.weight"], sd[p + ".proj.bias"]).flatten(2).transpose(1, 2)

    def final(h, c):
        c = c if c.dim() == 3 else c[:, None]
        shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
        return lin(rms(h, "final_layer.norm_final") * (1 + scale) + shift, "final_layer.linear")

    e = t[:, None] * sd["t_embedder.W"][None] * 2 * torch.pi
    temb = lin(F.silu(lin(torch.cat([e.sin(), e.cos()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    if not dh:
        h = embed("x_embedder") + sd["pos_embed"]
        for i in range(depth):
            h = block(h, c, f"blocks.{i}", heads, "feat_rope")
        out = final(h, c)
    else:
        c = F.silu(c)
        s = embed("s_embedder") + sd["pos_embed"]
        for i in range(depth):
            s = block(s, c, f"blocks.{i}", heads, "enc_feat_rope")
        s = F.silu(temb[:, None] + s)
        s = lin(s, "s_projector") if "s_projector.weight" in sd else s
        h = embed("x_embedder")
        n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        for i in range(depth, n_blocks):
            h = block(h, s, f"blocks.{i}", head_heads, "dec_feat_rope")
        out = final(h, s)
    return out.transpose(1, 2).reshape(B, C, SIDE, SIDE)  # unpatchify, p = 1


def chw(x_tokens):  # (B, N, C) tokens, row-major -> RAE's (B, C, H, W), as RAE.encode's reshape
    return x_tokens.transpose(1, 2).reshape(x_tokens.shape[0], C, SIDE, SIDE)


def tokens(x_chw):
    return x_chw.flatten(2).transpose(1, 2)


def write_stats(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    save_rae_stats(path, torch.randn(C, SIDE, SIDE, generator=g), 0.5 + torch.rand(C, SIDE, SIDE, generator=g))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("rae")
    out = {"root": root}
    for name, arch in (("lightning", LIGHTNING), ("ddt", DDT)):
        sd = rae_state_dict(**arch, seed=1 if name == "ddt" else 0)
        d = root / name
        d.mkdir()
        torch.save(sd, d / "stage2_model.pt")  # raw, as RAE's sample.py loads it
        write_stats(d / "stat.pt")
        torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}, "step": 7,
                    "epoch": 1}, root / f"{name}_train_ckpt.pt")  # RAE's training checkpoint
        out[name] = sd
    weak = rae_state_dict(**{**DDT, "width": 16, "depth": 1}, seed=2)  # a smaller DiT-DH as the guide
    (root / "weak").mkdir()
    torch.save(weak, root / "weak" / "stage2_model.pt")
    out["weak"] = weak
    dec_cfg = DecoderStageConfig(model=DecoderModelConfig(in_dim=C, num_patches=SIDE * SIDE, patch_size=4,
                                                          width=16, depth=1, heads=2, mlp_hidden=32))
    dec = build_model(dec_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out["decoder"] = root / "decoder"  # a train-decoder run dir
    out["decoder"].mkdir()
    save_config(dec_cfg, out["decoder"] / "config.yaml")
    save_checkpoint(out["decoder"], "latest", dec, None, {"step": 1})
    return out


def cli(*args, ok=True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, r.output
    return r


def one_line_error(r) -> str:
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


# ----------------------------------------------------------------------------- loading and exporting RAE's checkpoints
@pytest.mark.parametrize("name,arch", [("lightning", LIGHTNING), ("ddt", DDT)])
@pytest.mark.parametrize("wrapped", [False, True])
def test_rae_checkpoint_velocity_is_minus_u_at_mirrored_time(w, name, arch, wrapped):
    path = w["root"] / (f"{name}_train_ckpt.pt" if wrapped else name)  # the file, or the folder holding it
    stats = w["root"] / name / "stat.pt" if wrapped else None  # the wrapped file has no stat.pt beside it
    dit = load_dit(path, stats=stats)
    m = dit.cfg.model
    assert (m.tokens, m.in_dim, m.grid, m.width, m.depth, m.heads, m.num_classes) == (
        SIDE * SIDE, C, (SIDE, SIDE), arch["width"], arch["depth"], arch["heads"], K)
    assert m.head_depth == arch.get("head_depth", 0) and dit.identity["ema"] == wrapped
    assert dit.cfg.normalize and dit.cfg.flow.grid == "rae" and dit.stats is not None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, SIDE * SIDE, C, generator=g)
    t = torch.tensor([0.0, 0.3, 0.77, 0.99311])
    y = torch.tensor([0, 4, K, 2])  # K: the null class
    heads = dict(dh=arch["dh"], depth=arch["depth"], heads=arch["heads"], head_heads=arch.get("head_heads", 0))
    sd64 = {k: v.double() for k, v in w[name].items()}  # the exact value: the reference in float64
    ref = -tokens(rae_forward(sd64, chw(x.double()), 1 - t.double(), y, **heads))
    got = dit.model(x, t, y).double()  # fp32, as sampling runs it
    rae32 = -tokens(rae_forward(w[name], chw(x), 1 - t, y, **heads)).double()  # RAE's own fp32 rounding
    assert ref.abs().mean() > 0.3  # a real signal
    err, rae_err = (got - ref).abs().max(), (rae32 - ref).abs().max()
    assert err <= 2 * rae_err + 1e-6 and err / ref.abs().max() < 1e-4, (err, rae_err)


def test_rae_grid_sampling_equals_raes_euler_in_its_own_frame(w):
    """Our sampler on the converted DiT, grid rae, = RAE's odeint Euler on u over its own 50-point grid."""
    dit = load_dit(w["root"] / "ddt")
    sd64 = {k: v.double() for k, v in w["ddt"].items()}
    flow = FlowConfig(steps=6, shift=math.sqrt(48), grid="rae")
    noise = torch.randn(2, SIDE * SIDE, C, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 3])
    ours = flow_sample(make_velocity_fn(dit.model, y, flow, K), noise, flow.steps, flow.shift, "euler", flow.grid)
    s = math.sqrt(48)

    def rae_euler(weights, dtype):  # RAE's odeint Euler: x += (t_{i+1} - t_i) u(x, t_i), t falling from 1
        t_r = 1 - torch.linspace(0, 0.999, 6, dtype=dtype)
        t_r = s * t_r / (1 + (s - 1) * t_r)
        x = chw(noise.to(dtype))
        for i in range(5):
            u = rae_forward(weights, x, t_r[i].expand(2), y, True, DDT["depth"], DDT["heads"], DDT["head_heads"])
            x = x + (t_r[i + 1] - t_r[i]) * u
        return tokens(x).double()

    exact, rae32 = rae_euler(sd64, torch.float64), rae_euler(w["ddt"], torch.float32)
    assert (exact - noise).abs().mean() > 0.3  # the integration moved
    err, rae_err = (ours.double() - exact).abs().max(), (rae32 - exact).abs().max()
    assert err <= 2 * rae_err + 1e-6, (err, rae_err)  # as close to exact as RAE's own fp32 run


def test_exported_file_round_trips(w, tmp_path):
    """export-rae of a run made from an RAE checkpoint writes RAE's key set, shapes and values back."""
    for name in ("lightning", "ddt"):
        dit = load_dit(w["root"] / name)
        run = tmp_path / f"run-{name}"
        run.mkdir()
        save_config(dit.cfg, run / "config.yaml")
        save_checkpoint(run, "latest", dit.model, None, {"step": 1})
        out = tmp_path / f"{name}.pt"
        r = cli("export-rae", run, out)
        assert ("DiTwDDTHead" if name == "ddt" else "LightningDiT") in r.output and '"mlp_ratio": 4.0' in r.output
        back = torch.load(out, weights_only=True)
        orig = w[name]
        assert set(back) == set(orig)  # RAE loads with strict=True: exactly its keys
        for k in orig:
            assert back[k].shape == orig[k].shape, k
            torch.testing.assert_close(back[k], orig[k], rtol=0, atol=2e-6)
        # and the exported file loads back as the same network
        again = load_dit(out, stats=w["root"] / name / "stat.pt")
        x, t, y = torch.randn(2, SIDE * SIDE, C), torch.tensor([0.2, 0.9]), torch.tensor([0, 1])
        torch.testing.assert_close(again.model(x, t, y), dit.model(x, t, y), rtol=1e-4, atol=1e-4)


def test_ddt_head_as_wide_as_its_trunk_loads_and_exports(tmp_path):
    """RAE's DiT-DH builds s_projector as nn.Identity when both widths are equal: no keys. The blocks then
    look alike, so the loader takes RAE's 2-block head and says so; velocity and export stay exact."""
    arch = dict(dh=True, width=32, depth=2, heads=2, head_width=32, head_depth=2, head_heads=4)
    sd = rae_state_dict(**arch, seed=4)
    assert not any(k.startswith("s_projector") for k in sd)
    d = tmp_path / "same"
    d.mkdir()
    torch.save(sd, d / "stage2_model.pt")
    write_stats(d / "stat.pt")
    with pytest.warns(UserWarning, match="last 2 are taken as the head"):
        dit = load_dit(d)
    m = dit.cfg.model
    assert (m.depth, m.head_depth, m.head_width, m.head_heads, m.head_projector) == (2, 2, 32, 4, False)
    x = torch.randn(3, SIDE * SIDE, C, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0.1, 0.5, 0.95]), torch.tensor([1, K, 3])
    ref = -tokens(rae_forward({k: v.double() for k, v in sd.items()}, chw(x.double()), 1 - t.double(), y,
                              True, 2, 2, 4))
    assert ref.abs().mean() > 0.3
    err = (dit.model(x, t, y).double() - ref).abs().max()
    assert err / ref.abs().max() < 1e-4, err  # fp32 rounding (about 1e-5 here); a wrong wiring is O(1)
    run = tmp_path / "run"
    run.mkdir()
    save_config(dit.cfg, run / "config.yaml")
    save_checkpoint(run, "latest", dit.model, None, {"step": 1})
    cli("export-rae", run, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(back) == set(sd)  # still no s_projector: RAE's strict load of an Identity
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=2e-6)
    # a run of ours with an equal-width head AND a projector has no RAE counterpart: refused in one line
    ours = dataclasses.replace(dit.cfg, model=dataclasses.replace(m, head_projector=True))
    mine = tmp_path / "mine"
    mine.mkdir()
    save_config(ours, mine / "config.yaml")
    save_checkpoint(mine, "latest", build_model(ours), None, {"step": 1})
    assert "s_projector" in one_line_error(cli("export-rae", mine, tmp_path / "x.pt", ok=False))


def test_ddt_head_split_read_from_the_mlp_widths_when_the_widths_agree(tmp_path):
    sd = rae_state_dict(dh=True, width=32, depth=3, heads=2, head_width=32, head_depth=1, head_heads=2, seed=5)
    hid = 40  # a head block with its own SwiGLU width tells the split without any assumption
    sd.update({"blocks.3.mlp.w12.weight": torch.randn(2 * hid, 32) * 0.2, "blocks.3.mlp.w12.bias": torch.zeros(2 * hid),
               "blocks.3.mlp.w3.weight": torch.randn(32, hid) * 0.2})
    torch.save(sd, tmp_path / "split.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess, so no warning
        dit = load_dit(tmp_path / "split.pt", stats=write_stats(tmp_path / "stat.pt") or tmp_path / "stat.pt")
    assert (dit.cfg.model.depth, dit.cfg.model.head_depth, dit.cfg.model.head_mlp_hidden) == (3, 1, hid)


def test_export_refuses_a_1d_flatdino_dit(tmp_path):
    cfg = DiTStageConfig(model=DiTModelConfig(tokens=4, in_dim=8, width=16, depth=1, heads=2, mlp_hidden=32,
                                              num_classes=3))
    run = tmp_path / "flat"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(run, "latest", build_model(cfg), None, {"step": 1})
    assert "square 2-D token grid" in one_line_error(cli("export-rae", run, tmp_path / "x.pt", ok=False))


def test_bad_rae_inputs_are_one_line_errors(w, tmp_path):
    base = ("sample", "--decoder", w["decoder"], "-c", "0", "-n", "1", "--steps", "2", "--out", tmp_path / "o")
    (tmp_path / "nostats").mkdir()
    torch.save(w["lightning"], tmp_path / "nostats" / "stage2_model.pt")
    assert "--stats" in one_line_error(cli(*base, "--dit", tmp_path / "nostats", ok=False))
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "junk.pt")
    assert "not an RAE stage-2 checkpoint" in one_line_error(cli(*base, "--dit", tmp_path / "junk.pt", ok=False))
    torch.save({"model": w["lightning"]}, tmp_path / "model_only.pt")
    assert "'ema'" in one_line_error(cli(*base, "--dit", tmp_path / "model_only.pt", ok=False))
    torch.save({k: v for k, v in w["ddt"].items() if k != "t_embedder.W"}, tmp_path / "partial.pt")
    assert "t_embedder.W" in one_line_error(cli(*base, "--dit", tmp_path / "partial.pt", "--stats",
                                                w["root"] / "ddt" / "stat.pt", ok=False))
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pt")  # not weights_only-loadable
    assert "refused to load" in one_line_error(cli(*base, "--dit", tmp_path / "pickle.pt", ok=False))

"""Analytic FLOPs (Appendix H of seed 000) and the throughput sweep."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flatdino_cli.analysis import flops as F
from flatdino_cli.config_yaml import load_preset


def g(x: float) -> str:
    return f"{x / 1e9:.1f}"


def dit(tokens, width, depth, head_width=0, head_depth=0, grid=None, in_dim=128):
    return SimpleNamespace(tokens=tokens, width=width, depth=depth, head_width=head_width,
                           head_depth=head_depth, grid=grid, in_dim=in_dim)


RAE = dict(tokens=256, grid=(16, 16), in_dim=768)
LAT = dict(tokens=32, in_dim=128)
DH = dict(head_width=2048, head_depth=2)
# (name, RAE config, FlatDINO config, paper forward a/b/ratio, paper train step a/b/ratio)
PAPER = [
    ("DiT-L", dit(width=1024, depth=24, **RAE), dit(width=1024, depth=24, **LAT),
     ("80.5", "9.7", "8.3x"), ("265.0", "78.5", "3.4x")),
    ("DiT-XL", dit(width=1152, depth=28, **RAE), dit(width=1152, depth=28, **LAT),
     ("118.4", "14.3", "8.3x"), ("378.5", "92.4", "4.1x")),
    ("DiT-DH-XL", dit(width=1152, depth=28, **RAE, **DH), dit(width=1152, depth=28, **LAT, **DH),
     ("144.7", "17.6", "8.2x"), ("457.5", "102.1", "4.5x")),
]


def test_layer_formula():
    S, D = 256, 1152
    assert F.layer_flops(S, D) == 2 * S * D * (6 * D + S) == 12 * S * D**2 + 2 * S**2 * D
    # attention alone: 4SD^2 + 2S^2D (QKV + out, QK^T + AV)
    assert F.attention_flops(S, D) == 4 * S * D**2 + 2 * S**2 * D


def test_encoding_costs_paper_eq_12_13():
    assert g(F.dinov2_flops()) == "23.4"  # 12 x 2 x 261 x 768 x (6 x 768 + 261)
    assert F.dinov2_flops() == 12 * 2 * 261 * 768 * (6 * 768 + 261)
    vae = load_preset("vae-32x128")
    assert F.vae_encoder_flops(vae) == 12 * 2 * 288 * 768 * (6 * 768 + 288)
    assert g(F.vae_encoder_flops(vae)) == "26.0"
    assert g(F.encoder_flops(vae)) == "49.4"
    assert F.encoder_flops(None) == F.dinov2_flops()


@pytest.mark.parametrize("name,a,b,fwd,step", PAPER, ids=[p[0] for p in PAPER])
def test_appendix_h_table_stand_ins(name, a, b, fwd, step):
    t = F.flops_table(a, b)  # default VAE: vae-32x128 architecture
    assert t["a"]["model"] == t["b"]["model"] == name
    assert t["a"]["label"] == "RAE, 256 tokens" and t["b"]["label"] == "FlatDINO, 32 tokens"
    assert (g(t["a"]["forward"]), g(t["b"]["forward"]), f"{t['ratio']['forward']:.1f}x") == fwd
    assert (g(t["a"]["encoding"]), g(t["b"]["encoding"])) == ("23.4", "49.4")
    assert (g(t["a"]["train_step"]), g(t["b"]["train_step"]), f"{t['ratio']['train_step']:.1f}x") == step


def test_appendix_h_from_presets_and_printed():
    tables = F.appendix_h_tables()
    text = F.format_table(tables)
    lines = text.splitlines()
    for (name, _, _, fwd, step), t in zip(PAPER, tables):
        assert t["a"]["model"] == name
        assert [l.split() for l in lines if l.startswith(f"{name} forward")] == [[name, "forward", *fwd]]
        assert [l.split()[-3:] for l in lines if l.startswith(f"{name} training step")] == [list(step)]
    assert [l.split() for l in lines if l.startswith("encoding per image")] == [
        ["encoding", "per", "image", "23.4", "49.4"]]
    assert "RAE, 256 tokens" in lines[0] and "FlatDINO, 32 tokens" in lines[0]
    json.dumps(tables)  # the CLI's --json output


def test_exact_encoder_costs_differ_by_one_digit():
    """Without quoting the encoders at 0.1 GFLOPs (as the paper does), two cells move by 0.1."""
    L, XL, DH = F.appendix_h_tables(paper_rounding=False)
    assert g(XL["a"]["train_step"]) == "378.6" and g(L["b"]["train_step"]) == "78.6"
    assert g(DH["a"]["train_step"]) == "457.5" and g(DH["b"]["train_step"]) == "102.1"
    assert XL["a"]["forward"] == F.appendix_h_tables()[1]["a"]["forward"]  # forwards are exact either way


def test_binary_giga_would_not_match():
    assert f"{F.dit_forward_flops(PAPER[0][1]) / 2**30:.1f}" != "80.5"
    assert F.GIGA == 1e9


def test_other_pair_follows_formula():
    s, b = load_preset("s-32x128"), load_preset("b-32x128")
    t = F.flops_table(s, b)
    # hand-checked: DiT-S = 12 x 2 x 32 x 384 x (6 x 384 + 32) = 688,914,432 FLOPs
    assert t["a"]["forward"] == 688_914_432
    assert t["b"]["forward"] == 12 * 2 * 32 * 768 * (6 * 768 + 32) == 2_736_783_360
    assert g(t["a"]["train_step"]) == "51.5"  # 3 x 0.689 + 23.4 + 26.0
    assert t["ratio"]["forward"] == pytest.approx(688_914_432 / 2_736_783_360)
    text = F.format_table(t)
    assert "DiT-S, FlatDINO, 32 tokens" in text and "0.3x" in text


def test_raw_vs_latent_and_vae_choice():
    rae, xl = load_preset("rae-xl-256x768"), load_preset("xl-32x128")
    assert F.is_raw_feature_dit(rae) and not F.is_raw_feature_dit(xl)
    assert list(F.flops_table(rae, xl)["a"]["encoding_parts"]) == ["dinov2"]
    # a bigger VAE encoder (64 tokens) costs more and is counted only on the latent side
    vae64 = load_preset("vae-64x128")
    t64 = F.flops_table(rae, xl, vae64, paper_rounding=False)
    assert t64["b"]["encoding_parts"]["vae_encoder"] == 12 * F.layer_flops(256 + 64, 768)
    assert t64["a"]["encoding"] == F.dinov2_flops()


def test_fae_encoder_is_one_attention_layer():
    fae = replace(load_preset("vae-32x128").model, kind="fae")
    assert F.vae_encoder_flops(fae) == 2 * 256 * 768 * (2 * 768 + 256)
    assert F.vae_encoder_flops(fae) < F.layer_flops(256, 768)


def test_patched_grid_runs_over_fewer_tokens():
    m = load_preset("tiny-fae-dit", ["model.patch=2"]).model  # 6x6 grid -> 3x3 tokens
    assert m.seq_len == 9 and m.seq_grid == (3, 3)
    assert F.dit_forward_flops(m) == m.depth * F.layer_flops(9, m.width)
    assert F.dit_forward_flops(load_preset("tiny-fae-dit", ["model.patch=1"]).model) == m.depth * F.layer_flops(36, m.width)


def test_grouped_flat_vae_runs_over_a_quarter_of_the_patches():
    m = load_preset("tiny-vae", ["model.num_patches=144", "model.patch_group=2"]).model  # 12x12 -> 6x6 + 16
    assert F.flat_vae_sequence(m) == 36 + 16
    assert F.vae_encoder_flops(m) == m.enc_depth * F.layer_flops(52, m.enc_width)
    assert F.vae_decoder_flops(m) == m.dec_depth * F.layer_flops(52, m.dec_width)
    assert F.vae_encoder_flops(replace(m, patch_group=1)) == m.enc_depth * F.layer_flops(160, m.enc_width)


class TinyDiT(nn.Module):
    def __init__(self, d: int = 8, width: int = 16):
        super().__init__()
        self.inp, self.out = nn.Linear(d, width), nn.Linear(width, d)
        self.temb, self.yemb = nn.Linear(1, width), nn.Embedding(10, width)

    def forward(self, x, t, y):  # (B, N, d), (B,), (B,)
        h = self.inp(x) + (self.temb(t[:, None]) + self.yemb(y))[:, None]
        return self.out(torch.relu(h))


def test_measure_throughput_and_plot(tmp_path):
    batches = [1, 4, 16]
    a = F.measure_throughput(TinyDiT, batches, tokens=32, in_dim=8, device="cpu", seconds=0.02)
    b = F.measure_throughput(TinyDiT, batches, tokens=256, in_dim=8, device="cpu", seconds=0.02)
    for res in (a, b):
        assert [r["batch"] for r in res] == batches
        for r in res:
            assert r["forward_per_s"] > 0 and r["iters"] >= 1
            assert r["samples_per_s"] == pytest.approx(r["batch"] * r["forward_per_s"])
    path = F.plot_throughput(a, b, ["32 tokens", "256 tokens"], tmp_path / "sub" / "tp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_measure_throughput_bf16_autocast_runs():
    res = F.measure_throughput(TinyDiT, [2], tokens=4, in_dim=8, dtype=torch.bfloat16, seconds=0.0)
    assert res[0]["iters"] == 1 and res[0]["forward_per_s"] > 0


def test_sampling_pipeline_flops_count_the_forwards_the_sampler_runs():
    """dit_forwards_per_image equals the rows a counting model sees per image in flow.sample (guided
    steps feed [x, x]), for Euler and Heun, a shifted grid and no guidance; sample_flops adds the
    decoders (the VAE decoder only for FlatDINO): at XL with CFG on (0.225, 1), 50 steps, each model's
    own shift, the RAE pipeline costs ~6x FlatDINO's."""
    from flatdino_cli.flow import FlowConfig, make_velocity_fn, sample

    rows = []

    def model(x, t, y):
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    for flow in [FlowConfig(steps=7, shift=3.0, cfg_scale=4.5, cfg_interval=(0.225, 1.0)),
                 FlowConfig(steps=5, shift=1.0, cfg_scale=2.0, cfg_interval=(0.2, 0.8), sampler="heun"),
                 FlowConfig(steps=6, shift=6.9, cfg_scale=1.0)]:
        rows.clear()
        sample(make_velocity_fn(model, torch.zeros(2, dtype=torch.long), flow, 10), torch.zeros(2, 3), flow.steps,
               flow.shift, flow.sampler)
        assert F.dit_forwards_per_image(flow) == sum(rows) / 2
    vae, dec = load_preset("vae-32x128"), load_preset("decoder-xl")
    flat, rae = load_preset("xl-32x128"), load_preset("rae-xl-256x768")
    guided = dict(cfg_scale=4.5, cfg_interval=(0.225, 1.0), cfg_interval_inclusive=False, steps=50)
    a = F.sample_flops(flat, replace(flat.flow, **guided), dec, vae)
    b = F.sample_flops(rae, replace(rae.flow, **guided), dec)
    assert b["vae_decoder"] == 0 and a["pixel_decoder"] == b["pixel_decoder"] == 28 * F.layer_flops(257, 1152)
    assert a["vae_decoder"] == 24 * F.layer_flops(288, 1024)
    assert a["total"] == a["dit"] + a["vae_decoder"] + a["pixel_decoder"]
    assert 5.5 < b["total"] / a["total"] < 6.5


def test_flops_measure_compares_two_presets_and_writes_the_result(tmp_path, cli):
    """`flops --measure` (analysis/flops.run_flops): both presets timed over the batch sweep, the plot and
    flops.json written, one speedup line per batch size; a bad --batches is a one-line error."""
    p = cli("flops", "--preset", "tiny-fae-dit", "--vs", "tiny-dit", "--measure", "--batches", "1, 2", "--seconds",
            "0", "--out", tmp_path / "m", "--device", "cpu")
    saved = json.loads((tmp_path / "m/flops.json").read_text())
    m = saved["measured"]
    assert [r["batch"] for r in m["tiny-fae-dit"]] == [1, 2] == [r["batch"] for r in m["tiny-dit"]]
    assert len(m["speedup"]) == 2 and m["dtype"] == "torch.float32" and m["device"] == "cpu"
    assert saved["tables"][0]["ratio"]["forward"] > 0 and (tmp_path / "m/throughput.png").is_file()
    assert p.stdout.count("measured forward speedup") == 2
    bad = cli("flops", "--measure", "--batches", "1,x", "--out", tmp_path / "b", check=False)
    assert bad.returncode == 1 and "--batches '1,x'" in bad.stderr and "Traceback" not in bad.stderr

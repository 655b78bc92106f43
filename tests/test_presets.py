"""The presets follow their sources: the paper's (VAE epochs and schedules, DiT-DH-XL's learned
position table), the DiTs' parameter counts against the architecture written out as a formula and
their init, RAE's time distribution, and the baselines' (RAE, FAE) sizes and recipes. That every
preset resolves, and the --set machinery: test_config.py."""

import dataclasses
import math

import pytest
import torch

from flatdino_cli.config_yaml import load_preset
from flatdino_cli.models import build_model


# ----------------------------------------------------------------------------- the paper's presets
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


# ----------------------------------------------------------------------------- DiT presets: size, init, time
def adaln_block_params(W: int, h: int, cond: int) -> int:
    """One LightningDiT block of width W, SwiGLU hidden h, conditioning width cond."""
    attn = (W * 3 * W + 3 * W) + (W * W + W)  # qkv + proj, with biases: 4W^2 + 4W
    mlp = (W * 2 * h + 2 * h) + (h * W + W)  # SwiGLU w12 (fused gate + up) and w3, with biases
    norms = 2 * W  # two RMSNorm scales
    ada = cond * 6 * W + 6 * W  # adaLN: 6 modulation vectors
    return attn + mlp + norms + ada


def final_layer_params(W: int, out: int, cond: int) -> int:
    return W + (cond * 2 * W + 2 * W) + (W * out + out)  # RMSNorm, adaLN (shift, scale), Linear


def dit_param_formula(m) -> tuple[int, int]:
    """(trainable, frozen) parameters of a DiT model config, from first principles.

    Frozen but stored (counted in `frozen`): the Gaussian-Fourier frequencies (256) and the fixed
    sin-cos position table (tokens x width; a learned table would be trainable). RoPE tables are
    non-persistent buffers, not parameters.
    """
    W = m.width
    fourier = 256
    embed = (m.in_dim * W + W)  # x_embedder
    embed += (2 * fourier * W + W) + (W * W + W)  # time MLP: Linear(512, W), SiLU, Linear(W, W)
    embed += (m.num_classes + 1) * W  # label table with the null class
    trainable = embed + m.depth * adaln_block_params(W, m.mlp_hidden, W)
    if m.head_depth:
        H = m.head_width
        trainable += (W * H + H) + (m.in_dim * H + H)  # s_projector, head_embedder
        trainable += m.head_depth * adaln_block_params(H, m.head_mlp_hidden, H)
        trainable += final_layer_params(H, m.in_dim, H)
    else:
        trainable += final_layer_params(W, m.in_dim, W)
    pos = m.tokens * W
    return (trainable + pos, fourier) if m.pos_embed == "learned" else (trainable, fourier + pos)


@pytest.mark.parametrize("preset, trainable, frozen", [
    ("xl-32x128", 675_478_016, 37_120),
    ("dh-xl-32x128", 835_058_132, 256),  # learned positions (32 x 1152 trainable), as the authors' DiT-DH
    ("rae-xl-256x768", 676_953_216, 295_168),
    ("rae-dh-xl-256x768", 838_380_628, 295_168),  # RAE's paper: DiT-DH-XL 839M
])
def test_parameter_counts_match_the_architecture_formula(preset, trainable, frozen):
    cfg = load_preset(preset)
    with torch.device("meta"):
        model = build_model(cfg)
    got_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert dit_param_formula(cfg.model) == (got_train, got_frozen) == (trainable, frozen)
    learned = load_preset(preset, ["model.pos_embed=learned"])
    with torch.device("meta"):
        model = build_model(learned)
    assert dit_param_formula(learned.model) == (sum(p.numel() for p in model.parameters() if p.requires_grad), 256)


def test_rae_preset_trains_with_raes_time_distribution_mirrored():
    """RAE: logit-normal(0, 1) t_R truncated at 0.999, shifted by sqrt(16*16*768/4096); ours t = 1 - t_R
    (the distribution itself is checked against RAE's transcription in test_flow.py)."""
    flow = load_preset("rae-xl-256x768").flow
    assert (flow.time_dist, flow.logit_mean, flow.logit_std) == ("rae", 0.0, 1.0)
    assert flow.shift == pytest.approx(math.sqrt(16 * 16 * 768 / 4096), rel=1e-12)
    assert flow.cfg_interval == (0.0, 1.0) and flow.cfg_interval_inclusive
    assert load_preset("rae-xl-256x768").normalize and not load_preset("xl-32x128").normalize


@pytest.mark.parametrize("preset,init", [("xl-32x128", "trunc_normal"), ("rae-xl-256x768", "xavier")])
def test_init_follows_each_presets_source(preset, init):
    # the authors' flat DiT: block Linears trunc-normal(0.02), Xavier only for the embedders; RAE's: Xavier
    # everywhere. Statistics per parameter group, at a small width so the test is cheap.
    from flatdino_cli.models.dit import DiT

    cfg = load_preset(preset, ["model.width=256", "model.depth=2", "model.heads=4", "model.mlp_hidden=512"])
    assert cfg.model.init == init
    torch.manual_seed(0)
    dit = DiT(cfg.model)
    block_linears = [(n, m) for n, m in dit.blocks.named_modules()
                     if isinstance(m, torch.nn.Linear) and "adaLN" not in n]
    assert len(block_linears) >= 2 * 4
    for n, m in block_linears:
        std, xavier_std = m.weight.std().item(), math.sqrt(2.0 / (m.in_features + m.out_features))
        want = 0.02 if init == "trunc_normal" else xavier_std
        assert abs(std - want) < 0.1 * want, (n, std, want)
        assert (m.bias is None) or not m.bias.any()
    x = dit.x_embedder  # the token embedder stays Xavier under both inits
    xs = math.sqrt(2.0 / (x.in_features + x.out_features))
    assert abs(x.weight.std().item() - xs) < 0.15 * xs
    for blk in dit.blocks:  # adaLN-Zero: the block starts as the identity under both
        assert not any(p.any() for p in blk.adaLN_modulation.parameters())


# ----------------------------------------------------------------------------- the baselines' presets (RAE, FAE)
@pytest.mark.parametrize("name,paper_millions", [
    ("rae-xl-256x768", 676), ("rae-dh-xl-256x768", 839),  # RAE Table 7: DiT-XL 676M, DiT-DH-XL 839M
    ("fae-g-16x16x32", 38.17 + 170.43),  # FAE appendix D: encoder + feature decoder
    ("fae-g-xl-16x16x32", 675.26), ("decoder-fae-l", 305.36)])
def test_baseline_presets_build_and_show_their_parameter_count(name, paper_millions, cli):
    out = cli("presets", "show", name).stdout
    total = int(next(ln for ln in out.splitlines() if ln.startswith("# parameters, total:")).split()[3].replace(",", ""))
    assert total / 1e6 == pytest.approx(paper_millions, rel=0.01)


def test_baseline_recipes():
    from flatdino_cli.steps import lr_at

    xl, dh = load_preset("rae-xl-256x768").train, load_preset("rae-dh-xl-256x768").train
    assert (xl.schedule, xl.lr, xl.ema, xl.batch_size) == ("constant", 2e-4, 0.9999, 1024)  # LightningDiT's recipe
    assert (dh.schedule, dh.lr, dh.final_lr, dh.decay_epochs, dh.ema) == ("wsd", 2e-4, 2e-5, 760, 0.9995)
    # RAE's DiT-DH decays on an 800-epoch clock: an 80-epoch run (Table 7's 2.16 row) ends at 1.905e-4
    spe = 10
    short = dataclasses.replace(dh, epochs=80)
    assert lr_at(0, 80 * spe, spe, short) == lr_at(40 * spe - 1, 80 * spe, spe, short) == 2e-4
    assert lr_at(80 * spe - 1, 80 * spe, spe, short) == pytest.approx(2e-4 - 1.8e-4 * 40 / 760)
    assert lr_at(800 * spe - 1, 800 * spe, spe, dh) == pytest.approx(2e-5)
    assert lr_at(80 * spe - 1, 80 * spe, spe, dataclasses.replace(short, decay_until_epoch=None)) == pytest.approx(2e-5)
    fae_vae, fae = load_preset("fae-g-16x16x32"), load_preset("fae-g-xl-16x16x32")
    assert (fae_vae.model.feature_dim, fae_vae.model.enc_width, fae_vae.model.dec_width) == (1536, 6144, 1536)
    assert (fae.train.batch_size, fae.train.lr, fae.train.betas, fae.flow.shift) == (512, 1e-4, (0.9, 0.999), 0.4)
    assert (fae.model.tokens, fae.model.in_dim, fae.flow.cfg_scale, fae.flow.cfg_interval) == (256, 32, 2.5, (0.3, 1.0))
    assert fae.flow.cfg_schedule == ((0.0, 0.1, 0.9), (0.1, 0.3, 1.5), (0.3, 1.0, 2.5))  # the main results' CFG


# ----------------------------------------------------------------------------- sampler: measured default, paper's one flag away
RAE_DEFAULT = ("ab2", 15)
FAMILIES = {  # preset -> (default sampler, steps): README "Sampler defaults, measured per family"
    **{p: ("euler", 20) for p in ("xl-32x128", "b-32x128", "s-32x128", "l-32x128", "dh-xl-32x128", "tiny-dit")},
    **{p: RAE_DEFAULT for p in ("rae-xl-256x768", "rae-dh-xl-256x768", "tiny-rae-dit")},
    **{p: ("ab2", 10) for p in ("fae-xl-16x16x32", "fae-g-xl-16x16x32", "tiny-fae-dit")},
}
PAPER = {"fae": ("euler", 250)}  # FAE's paper sampled with 250 Euler steps; FlatDINO's and RAE's with 50


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_each_family_samples_with_its_measured_default_and_the_paper_setting_one_flag_away(preset):
    from flatdino_cli.errors import UserError
    from flatdino_cli.pipeline.options import sampling_flow

    flow = load_preset(preset).flow
    assert (flow.sampler, flow.steps) == FAMILIES[preset]
    assert (sampling_flow(flow).sampler, sampling_flow(flow).steps) == FAMILIES[preset]
    paper = sampling_flow(flow, paper=True)
    assert (paper.sampler, paper.steps) == PAPER.get(preset.removeprefix("tiny-").split("-")[0], ("euler", 50))
    assert dataclasses.replace(paper, sampler=flow.sampler, steps=flow.steps) == flow  # nothing else changes
    with pytest.raises(UserError, match="--paper-sampler sets the sampler and its steps"):
        sampling_flow(flow, steps=7, paper=True)

"""diffusers' AutoencoderRAE folders read by flatdino: a tiny random AutoencoderRAE saved with
save_pretrained gives, through flatdino's encoder / statistics / pixel decoder, what diffusers' own
encode and decode give on the same inputs (within 1e-4); `flatdino info` describes such a folder; and
`export --format diffusers` writes decoder runs as folders diffusers loads and decodes alike."""

import diffusers  # the test extra pins a version with AutoencoderRAE
import pytest
import torch

from flatdino_cli.encoders import load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.interop.diffusers import STD_EPS, is_rae_folder
from flatdino_cli.models.pixel_decoder import load_decoder
from flatdino_cli.models.stats import load_stats

SIDE, ENC_PATCH = 56, 14  # 4 x 4 = 16 encoder patches
GRID = SIDE // ENC_PATCH


def make_rae(path, stats=True, seed=0):
    """A random AutoencoderRAE of small size (1 encoder head of 64, 2 decoder heads), saved by diffusers."""
    torch.manual_seed(seed)
    kw = {}
    if stats:  # per-position statistics on the (C, H, W) grid, as in NYU's releases
        kw = dict(latents_mean=(0.3 * torch.randn(64, GRID, GRID)).tolist(),
                  latents_std=(0.5 + torch.rand(64, GRID, GRID)).tolist())
    m = diffusers.AutoencoderRAE(encoder_hidden_size=64, encoder_patch_size=ENC_PATCH, encoder_num_hidden_layers=2,
                                 decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                                 decoder_intermediate_size=64, patch_size=4, encoder_input_size=SIDE, **kw)
    with torch.no_grad():  # random layer scales and decoder weights of a visible size, so a wrong map shows
        for name, p in m.named_parameters():
            if "lambda1" in name or "trainable_cls_token" in name or name.endswith("register_tokens"):
                p.copy_(torch.randn_like(p) * 0.5)
    m.eval().save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def rae_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("rae") / "AutoencoderRAE"
    return path, make_rae(path)


def test_encoder_latents_and_pixels_match_diffusers(rae_folder):
    path, ref = rae_folder
    assert is_rae_folder(path)
    images = torch.rand(3, 3, SIDE, SIDE)  # [0, 1], already at the encoder's input size: no resize
    with torch.no_grad():
        ref_latents = ref.encode(images).latent  # (B, C, h, w), normalised
        ref_tokens = ref._encoder_forward_fn(ref.encoder, ref._resize_and_normalize(images))  # before normalising
        ref_pixels = ref.decode(ref_latents).sample

    enc = load_encoder("dinov2-b-reg4", path)  # sizes from the folder's config, not the name's
    assert (enc.spec.dim, enc.spec.depth, enc.spec.image_size, enc.spec.patch_size) == (64, 2, SIDE, ENC_PATCH)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = enc((images - mean) / std)  # (B, 16, 64)
    assert feats.shape == ref_tokens.shape
    torch.testing.assert_close(feats, ref_tokens, atol=1e-4, rtol=0)

    stats = load_stats(path)
    tokens_ref = ref_latents.flatten(2).transpose(1, 2)  # (B, h*w, C), our token layout
    torch.testing.assert_close(stats.normalize(feats), tokens_ref, atol=1e-4, rtol=0)

    dec = load_decoder(path)
    torch.testing.assert_close(dec(stats.denormalize(tokens_ref)), ref_pixels, atol=1e-4, rtol=0)


def test_statistics_keep_diffusers_epsilon(rae_folder):
    """diffusers divides by std + 1e-5 (RAE's stat.pt: sqrt(var + 1e-5)); the divisor is kept exactly."""
    path, ref = rae_folder
    stats = load_stats(path)
    want = (ref._latents_std + STD_EPS).flatten(1).T
    torch.testing.assert_close(stats.std, want, atol=0, rtol=0)
    assert not torch.allclose(stats.std, (ref._latents_std ** 2 + STD_EPS).sqrt().flatten(1).T, atol=1e-7, rtol=0)


def test_folder_without_statistics_is_one_line_error(tmp_path):
    make_rae(tmp_path / "nostats", stats=False)
    with pytest.raises(UserError, match="no latent statistics"):
        load_stats(tmp_path / "nostats")


def test_extract_reads_the_folder_as_encoder_weights(tmp_path, rae_folder):
    """`extract --encoder-weights DIR`: the store has the folder's encoder shape, no conversion step."""
    import numpy as np
    from conftest import run_cli

    path, _ = rae_folder
    run_cli("toy-data", tmp_path / "toy", "--per-class", "1", "--size", str(SIDE))
    run_cli("extract", tmp_path / "toy", tmp_path / "store", "--encoder", "dinov2-b-reg4", "--encoder-weights", path)
    data = np.load(tmp_path / "store" / "data.npy", mmap_mode="r")
    assert data.shape[1:] == (GRID * GRID, 64)


def test_info_describes_the_folder(tmp_path, rae_folder):
    """`flatdino info DIR`: encoder and decoder sizes, patch, image size and whether statistics are there."""
    import json

    from conftest import run_cli

    path, ref = rae_folder
    facts = json.loads(run_cli("info", path, "--json").stdout)
    assert "AutoencoderRAE" in facts["what"] and "--decoder DIR" in facts["what"]
    enc_params = sum(p.numel() for p in ref.encoder.parameters()) / 1e6
    assert facts["encoder"] == (f"DINOv2 with registers, width 64, depth 2, 1 heads, patch {ENC_PATCH} at {SIDE} px -> "
                                f"{GRID} x {GRID} = {GRID * GRID} patches ({enc_params:.2f}M parameters)")
    dec_params = sum(p.numel() for p in ref.decoder.parameters()) / 1e6
    assert facts["decoder"] == (f"ViT width 32, depth 2, 2 heads, mlp 64, patch 4: {GRID * GRID} x 64 features -> "
                                f"{4 * GRID} px images ({dec_params:.2f}M parameters)")
    assert facts["statistics"].startswith(f"latents_mean / latents_std (64, {GRID}, {GRID})")
    make_rae(tmp_path / "nostats", stats=False)
    assert json.loads(run_cli("info", tmp_path / "nostats", "--json").stdout)["statistics"].startswith("none")


# ----------------------------------------------------------------------------- writing AutoencoderRAE folders
def _decoder_run(path, encoder: dict, num_patches: int, patch: int, seed: int = 7, in_dim: int = 64):
    """A train-decoder run dir of random (perturbed) weights, trained (says inputs.json) on `encoder`."""
    from test_sample import make_run

    from flatdino_cli.config import DecoderModelConfig, DecoderStageConfig

    cfg = DecoderStageConfig(model=DecoderModelConfig(in_dim=in_dim, num_patches=num_patches, patch_size=patch, width=32,
                                                      depth=2, heads=2, mlp_hidden=64))
    return make_run(path, cfg, seed, ema=True, inputs={"encoder": encoder}, scale=0.3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A decoder run on the encoder of a 224-px AutoencoderRAE folder (16 x 16 patches, as the releases),
    exported with that folder's statistics."""
    from conftest import run_cli

    from flatdino_cli.utils import sha256_file

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    src = root / "source"
    diffusers.AutoencoderRAE(encoder_hidden_size=64, encoder_patch_size=14, encoder_num_hidden_layers=2,
                             decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                             decoder_intermediate_size=64, patch_size=2, encoder_input_size=224,
                             latents_mean=(0.3 * torch.randn(64, 16, 16)).tolist(),
                             latents_std=(0.5 + torch.rand(64, 16, 16)).tolist()).eval().save_pretrained(src)
    ident = {"encoder": "dinov2-b-reg4", "weights": f"sha256:{sha256_file(src / 'diffusion_pytorch_model.safetensors')}"}
    run = _decoder_run(root / "decoder", ident, 256, 2)
    out = root / "out"
    run_cli("export", run, out, "--format", "diffusers", "--encoder-weights", src, "--stats", src)
    return {"root": root, "src": src, "run": run, "out": out}


def test_export_loads_in_diffusers_and_decodes_like_flatdino(exported):
    out, run, src = exported["out"], exported["run"], exported["src"]
    model, info = diffusers.AutoencoderRAE.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    source = diffusers.AutoencoderRAE.from_pretrained(src).eval()
    torch.testing.assert_close(model._latents_std, source._latents_std, atol=1e-6, rtol=0)  # the statistics kept

    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        latents = model.encode(images).latent  # (B, 64, 16, 16), normalised
        pixels = model.decode(latents).sample
        assert torch.equal(latents, source.encode(images).latent)  # the encoder is the source folder's
    dec, stats = load_decoder(run), load_stats(out)
    tokens = latents.flatten(2).transpose(1, 2)
    ours = dec(stats.denormalize(tokens))
    assert ours.shape == pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, pixels, atol=1e-4, rtol=0)
    assert ours.std() > 0.05  # a decoder that does something (a wrong key map would not match)
    assert "AutoencoderRAE.from_pretrained" in (out / "README.md").read_text()


def test_export_refusals_are_one_line(exported, rae_folder, tmp_path):
    from conftest import run_cli

    def refused(run, *extra):
        p = run_cli("export", run, tmp_path / "x", "--format", "diffusers", *extra, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and not (tmp_path / "x").exists(), p.stderr
        return lines[0]

    tiny = _decoder_run(tmp_path / "tiny", {"encoder": "tiny", "weights": "random-init(seed=0)"}, 36, 8)
    assert "heads of 64" in refused(tiny) and "tiny" in refused(tiny)
    grid4 = _decoder_run(tmp_path / "grid4", {"encoder": "dinov2-b-reg4", "weights": None}, GRID * GRID, 4)
    assert "position table" in refused(grid4, "--encoder-weights", rae_folder[0])  # 4 x 4: diffusers spaces it 4
    assert "--encoder-weights" in refused(exported["run"])  # the records name a file by hash only
    assert "sha256" in refused(exported["run"], "--encoder-weights", rae_folder[0])  # not the trained-on weights
    assert "exists" in run_cli("export", exported["run"], exported["out"], "--format", "diffusers",
                               "--encoder-weights", exported["src"], check=False).stderr


def test_export_converts_a_timm_encoder_file(tmp_path):
    """An encoder from a weights file (timm layout, the 518-px table of the releases) is converted to
    transformers' names: diffusers' encoder then gives flatdino's features; a file whose table is on
    another grid is refused (diffusers would resample a 37 x 37 one)."""
    import timm
    from conftest import run_cli
    from safetensors.torch import save_file

    from flatdino_cli.utils import sha256_file

    torch.manual_seed(2)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
    with torch.no_grad():  # visible layer scales, CLS and registers: a wrong map shows
        for name, p in vit.named_parameters():
            if name.endswith(("gamma", "cls_token", "reg_token", "pos_embed")):
                p.copy_(torch.randn_like(p) * 0.5)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    file = tmp_path / "vit.safetensors"
    run = _decoder_run(tmp_path / "dec", {"encoder": "dinov2-s-reg4", "weights": f"sha256:{sha256_file(file)}"}, 256, 2,
                       in_dim=384)
    run_cli("export", run, tmp_path / "out", "--format", "diffusers", "--encoder-weights", file)
    model, info = diffusers.AutoencoderRAE.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref = model.eval()._encoder_forward_fn(model.encoder, model._resize_and_normalize(images))
    ours = load_encoder("dinov2-s-reg4", file)(model._resize_and_normalize(images))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ref.std() > 0.1

    # recorded as taken from the Hugging Face cache: found there again, no --encoder-weights
    snap = tmp_path / "hub" / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123" / "model.safetensors").write_bytes(file.read_bytes())
    cached = _decoder_run(tmp_path / "dec_hf", {"encoder": "dinov2-s-reg4",
                                                "weights": "hf:timm/vit_small_patch14_reg4_dinov2.lvd142m@abc123"},
                          256, 2, in_dim=384)
    run_cli("export", cached, tmp_path / "out_hf", "--format", "diffusers", env={"HF_HUB_CACHE": tmp_path / "hub"})
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors"), load_file(
        tmp_path / "out_hf" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder.")) and a.keys() == b.keys()

    small = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "vit224.safetensors"))
    run224 = _decoder_run(tmp_path / "dec224", {"encoder": "dinov2-s-reg4"}, 256, 2, in_dim=384)
    p = run_cli("export", run224, tmp_path / "out224", "--format", "diffusers", "--encoder-weights",
                tmp_path / "vit224.safetensors", check=False)
    assert p.returncode == 1 and "16 x 16" in p.stderr and "37 x 37" in p.stderr, p.stderr


def test_folder_end_to_end_extract_train_dit_sample(tmp_path, rae_folder):
    """One AutoencoderRAE folder as the encoder's weights, the pixel decoder and the statistics:
    extract -> train-dit (an rae-* preset, made small; classes from the store) -> sample, no conversion."""
    import numpy as np
    from conftest import run_cli

    path, _ = rae_folder
    run_cli("toy-data", tmp_path / "toy", "--per-class", "1", "--size", str(SIDE))
    run_cli("extract", tmp_path / "toy", tmp_path / "store", "--encoder", "dinov2-b-reg4", "--encoder-weights", path)
    small = ["model.width=32", "model.depth=1", "model.heads=2", "model.mlp_hidden=64", "train.max_steps=2",
             "train.batch_size=4"]
    run_cli("train-dit", "--preset", "rae-xl-256x768", "--latents", tmp_path / "store", "--out", tmp_path / "dit",
            "--device", "cpu", *[a for s in small for a in ("--set", s)])
    from flatdino_cli.rundir import run_config

    cfg = run_config(tmp_path / "dit")
    assert (cfg.model.tokens, cfg.model.in_dim, tuple(cfg.model.grid), cfg.model.num_classes) == (GRID * GRID, 64, (GRID, GRID), 12)
    for i, stats in enumerate(([], ["--stats", path])):  # the run's own statistics, or the folder's
        run_cli("sample", "--dit", tmp_path / "dit", "--decoder", path, *stats, "--class", "3", "-n", "2", "--steps", "2",
                "--out", tmp_path / f"s{i}")
        with np.load(tmp_path / f"s{i}" / f"samples_2x{4 * GRID}x{4 * GRID}x3.npz") as z:
            assert z["arr_0"].shape == (2, 4 * GRID, 4 * GRID, 3) and z["arr_0"].std() > 0

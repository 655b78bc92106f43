"""train-decoder: LPIPS from local files, GAN terms, discriminator resume, store alignment, toy PSNR."""

import json
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from flatdino_cli.config import ExtractConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import list_images, load_rgb, split_indices, to_tensor
from flatdino_cli.errors import UserError
from flatdino_cli.losses import (PatchDiscriminator, ViTDiscriminator, adaptive_weight, generator_loss,
                                 hinge_d_loss)
from flatdino_cli.losses.gan import _translate
from flatdino_cli.losses.lpips import LPIPS_CHANNELS, VGG_FILE, load_lpips, resolve_lpips_files
from flatdino_cli.runtime import setup_runtime
from flatdino_cli.toydata import write_toy_dataset
from flatdino_cli.train import fit

SMALL = ["model.width=32", "model.depth=1", "model.heads=2", "model.mlp_hidden=64"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: a second intra-op thread mostly waits (measured 4-10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rt():
    return setup_runtime("cpu", "fp32", False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, per_class=2, progress=False)  # 24 images, 48 px
    return root


# ----------------------------------------------------------------------------- LPIPS
def _write_lpips_files(folder):
    """Random weights in the real files' layouts: torchvision VGG16 (+ a classifier key) and lpips v0.1."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has a classifier; it must be ignored
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(vgg, folder / "checkpoints" / VGG_FILE)
    torch.save(lin, folder / "vgg.pth")
    return folder / "checkpoints" / VGG_FILE, folder / "vgg.pth"


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_lpips_loads_local_files_and_measures_distance(tmp_path, hub_dir):
    vgg_path, lin_path = _write_lpips_files(hub_dir)
    lp = load_lpips(lin_path)  # VGG16 found in torch.hub.get_dir()/checkpoints/
    assert torch.equal(lp.lins[2].weight, torch.load(lin_path)["lin2.model.1.weight"])
    assert torch.equal(lp.features[28].weight, torch.load(vgg_path)["features.28.weight"])  # conv5_3
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    d0, d1, d2 = (lp(x, (x + s * noise).clamp(-1, 1)) for s in (0.0, 0.05, 0.4))
    assert d0.shape == (2,) and torch.all(d0 == 0)
    assert torch.all(d1 > 0) and torch.all(d2 > d1)
    x.requires_grad_(True)
    lp(x, x.detach() + 0.1).sum().backward()  # differentiable w.r.t. the images, weights frozen
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in lp.parameters())


def test_missing_lpips_weights_fail_fast(tmp_path, hub_dir, rt):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        resolve_lpips_files(None, None)
    msg = str(e.value)
    assert "--no-lpips" in msg and VGG_FILE in msg and "--lpips-weights" in msg and "\n" not in msg
    # the whole stage fails the same way before touching the (nonexistent) images or an encoder
    from flatdino_cli.stages.decoder import DecoderSources, decoder_task

    with pytest.raises(UserError, match="--no-lpips"):
        decoder_task(load_preset("decoder-xl"), rt, DecoderSources(tmp_path / "no-such-images", "dinov2-b-reg4"))
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(UserError, match="vgg.pth"):  # a given but missing --lpips-weights file is named
        resolve_lpips_files(tmp_path / "vgg.pth", None)


# ----------------------------------------------------------------------------- GAN terms
def test_hinge_and_generator_loss_hand_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # relu(1 - real) = [0, .5] -> .25; relu(1 + fake) = [0, 1.5] -> .75; 0.5 * (.25 + .75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_adaptive_weight_hand_values():
    W = torch.nn.Parameter(torch.ones(2, 2))
    rec, gan = 3 * W.sum(), 0.5 * W.sum()  # gradient norms 3*2 = 6 and 0.5*2 = 1
    w = adaptive_weight(rec, gan, W, 1e4)
    assert w.item() == pytest.approx(6.0, rel=1e-5) and not w.requires_grad
    assert adaptive_weight(3 * W.sum(), 0.5 * W.sum(), W, 2.0).item() == pytest.approx(2.0)
    assert adaptive_weight(3 * W.sum(), 0 * W.sum(), W, 1e4).item() == pytest.approx(1e4)  # clamped
    assert W.grad is None  # it only reads gradients


def test_translation_is_an_integer_shift_with_zero_fill():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16) + 1
    out = _translate(x, 0.125)
    for b in range(2):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[b], _shift(x[b], dy, dx))]
        assert len(matches) == 1


def _shift(img, dy, dx):
    H, W = img.shape[-2:]
    pad = torch.nn.functional.pad(img, [2, 2, 2, 2])
    return pad[:, 2 + dy: 2 + dy + H, 2 + dx: 2 + dx + W]


def test_discriminators_shapes_and_frozen_backbone():
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    assert PatchDiscriminator()(x).shape == (2, 36)
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    d = ViTDiscriminator(vit, key_depths=(1, 3), kernel_size=3, input_size=32)
    logits = d(x)
    assert logits.shape == (2, 3 * 16)  # heads on the final block, block 1 and block 3; 4x4 tokens each
    assert not any(k.startswith(("_backbone", "backbone")) for k in d.state_dict())  # heads only
    generator_loss(logits).backward()
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in vit.parameters())


def test_dino_discriminator_without_weights_fails_fast(tmp_path, monkeypatch):
    from flatdino_cli.losses import build_discriminator

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="--disc-weights"):
        build_discriminator("dino-s8")


# ----------------------------------------------------------------------------- the stage
def _cfg(*sets):
    return load_preset("tiny-decoder", [*SMALL, *sets])


def test_discriminator_and_optimizer_resume_exactly(toy, tmp_path, rt):
    from flatdino_cli.stages.decoder import DecoderSources, _check_resume, decoder_task

    # 22 training images / batch 8 -> 2 steps per epoch; GAN and discriminator from the first step
    cfg = _cfg("loss.gan=0.5", "loss.disc_start_epoch=0", "loss.gan_start_epoch=0", "train.batch_size=8",
               "train.epochs=2", "train.ckpt_every_steps=2")
    straight = decoder_task(cfg, rt, DecoderSources(toy, "tiny"))
    assert set(straight.aux) == {"disc", "disc_opt"}
    fit(straight, straight.config.train, tmp_path / "a", rt)

    def stop_at_3(step, model, ema):
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3: the last checkpoint is step 2's

    first = decoder_task(cfg, rt, DecoderSources(toy, "tiny"))
    first.on_step = stop_at_3
    with pytest.raises(KeyboardInterrupt):
        fit(first, first.config.train, tmp_path / "b", rt)
    resumed = decoder_task(cfg, rt, DecoderSources(toy, "tiny"))  # a fresh discriminator, which resume must overwrite
    fit(resumed, resumed.config.train, tmp_path / "b", rt)

    a, b = (torch.load(tmp_path / r / "checkpoints/latest/state.pt", weights_only=True) for r in "ab")
    assert b["step"] == 4 and b["aux"]["disc_opt"]["state"][0]["step"] == 4
    for k, v in a["aux"]["disc"].items():
        assert torch.equal(v, b["aux"]["disc"][k]), k
    for i, s in a["aux"]["disc_opt"]["state"].items():
        assert torch.equal(s["exp_avg"], b["aux"]["disc_opt"]["state"][i]["exp_avg"])
    ma, mb = (load_file(tmp_path / r / "checkpoints/latest/model.safetensors") for r in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    with pytest.raises(UserError, match="discriminator"):  # resuming it without its discriminator is refused
        _check_resume(tmp_path / "b", None, resume=True)


def test_micro_batches_give_the_same_discriminator_and_decoder_updates_as_one_batch(toy, tmp_path, rt, monkeypatch):
    """The discriminator steps once per optimizer step on the whole batch, after the decoder's step and
    outside its micro-batch loop: 4 micro-batches of 2 train both nets as one batch of 8 does."""
    import flatdino_cli.losses.gan as gan
    import flatdino_cli.stages.decoder as stage
    from flatdino_cli.extract import extract_features

    # what is random per micro-batch by design is made deterministic: DiffAugment's draws (identity
    # here), the feature noise (tau 0) and the adaptive GAN weight (a ratio of this micro-batch's
    # gradient norms; clamped to its bound it is one constant)
    monkeypatch.setattr(stage, "diff_augment", lambda x: x)  # the generator's term
    monkeypatch.setattr(gan, "diff_augment", lambda x: x)  # the discriminator's step
    store = tmp_path / "feats"
    extract_features(toy, store, ExtractConfig(encoder="tiny", val_split=4, dtype="float32", batch_size=16), rt)
    sets = ["loss.gan=0.5", "loss.disc_start_epoch=0", "loss.gan_start_epoch=0", "loss.noise_tau=0",
            "loss.max_adaptive_weight=1e-3", "train.batch_size=8", "train.max_steps=3", "train.epochs=0"]
    states = {}
    for micro in (8, 2):
        task = stage.decoder_task(_cfg(*sets, f"train.micro_batch_size={micro}"), rt,
                                  stage.DecoderSources(toy, features=store))
        fit(task, task.config.train, tmp_path / f"m{micro}", rt)
        states[micro] = torch.load(tmp_path / f"m{micro}" / "checkpoints/latest/state.pt", weights_only=True)
        states[micro]["model"] = load_file(tmp_path / f"m{micro}" / "checkpoints/latest/model.safetensors")
    one, four = states[8], states[2]
    assert four["micro_batch_size"] == 2 and four["step"] == 3
    assert four["aux"]["disc_opt"]["state"][0]["step"] == 3  # one discriminator step per decoder step
    for k, v in one["aux"]["disc"].items():
        torch.testing.assert_close(four["aux"]["disc"][k], v, atol=1e-5, rtol=1e-4, msg=k)
    for k, v in one["model"].items():
        torch.testing.assert_close(four["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_feature_store_rows_align_with_images(toy, tmp_path, rt):
    from flatdino_cli.extract import extract_features
    from flatdino_cli.stages.decoder import DecoderSources, decoder_task

    store = tmp_path / "feats"
    extract_features(toy, store, ExtractConfig(encoder="tiny", val_split=4, dtype="float32", batch_size=16), rt)
    from_store = decoder_task(_cfg(), rt, DecoderSources(toy, features=store))
    on_the_fly = decoder_task(_cfg(), rt, DecoderSources(toy, "tiny"))
    assert len(from_store.train_set) == 20 and len(from_store.val_set) == 4  # the store's own val/ split
    from flatdino_cli.encoders import load_encoder

    enc = load_encoder("tiny")
    items = on_the_fly.train_set
    items.flip = False
    by_path = {p: i for i, p in enumerate(items.paths)}
    shared = [j for j, p in enumerate(from_store.train_set.paths) if p in by_path][::6]
    assert len(shared) >= 3
    for j in shared:
        target, feats = from_store.train_set[j]
        t2, x2 = items[by_path[from_store.train_set.paths[j]]]
        assert torch.equal(target, t2) and feats.shape == (36, 64)
        assert torch.allclose(feats, enc(x2[None])[0], atol=1e-4)  # the row is this image's features
    other = tmp_path / "other"
    write_toy_dataset(other, per_class=1, seed=5, progress=False)
    (other / "00_red_circle" / "extra.png").write_bytes((other / "00_red_circle" / "00000.png").read_bytes())
    with pytest.raises(UserError, match="no row in the store"):
        decoder_task(_cfg(), rt, DecoderSources(other, features=store))


def test_toy_decoder_beats_mean_image(tmp_path, cli):
    """CLI end to end on toy data: validation PSNR >= mean-image PSNR + 3 dB; --no-lpips is recorded."""
    images, run = tmp_path / "toy", tmp_path / "run"
    write_toy_dataset(images, per_class=30, progress=False)  # 360 images: 324 train, 36 val
    t0 = time.perf_counter()
    p = cli("train-decoder", "--preset", "tiny-decoder", "--images", images, "--encoder", "tiny", "--out", run,
            "--epochs", "3", "--batch-size", "16", "--set", "model.width=64", "--set", "model.depth=2",
            "--set", "model.mlp_hidden=256", "--set", "train.lr=2e-3", "--set", "loss.lpips=1", "--no-lpips",
            "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - t0
    assert "val PSNR" in p.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["lpips"] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r][-1]

    # the baseline, recomputed here: mean of the training images, scored on the held-out ones
    imgs = list_images(images)
    tr, va = split_indices(len(imgs), len(imgs) // 10, 0)
    pix = torch.stack([to_tensor(load_rgb(pth)) for pth in imgs.paths])  # 48 px: the crop is the image
    mse = (pix[tr].mean(0) - pix[va]).pow(2).mean((1, 2, 3))
    baseline = (-10 * torch.log10(mse)).mean().item()
    assert val["val/psnr_mean_image"] == pytest.approx(baseline, abs=0.05)

    # and the decoder's PSNR, recomputed through load_decoder on the run dir
    from flatdino_cli.data import normalize
    from flatdino_cli.encoders import load_encoder
    from flatdino_cli.models.pixel_decoder import load_decoder

    dec, enc = load_decoder(run), load_encoder("tiny")
    with torch.no_grad():
        recon = dec(enc(normalize(pix[va]))).clamp(0, 1)
    ours = (-10 * torch.log10((recon - pix[va]).pow(2).mean((1, 2, 3)))).mean().item()
    assert ours == pytest.approx(val["val/psnr"], abs=0.05)
    print(f"\ntoy decoder: val PSNR {ours:.2f} dB vs mean image {baseline:.2f} dB ({elapsed:.0f} s)")
    assert ours >= baseline + 3.0
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()


# ----------------------------------------------------------------------------- FAE's pixel decoder
def test_fixed_noise_sigma_for_faes_gaussian_embedding_decoder():
    from flatdino_cli.config import DecoderLossConfig
    from flatdino_cli.stages.decoder import noisy_features

    feats = torch.randn(64, 256, 32)
    torch.manual_seed(0)
    fixed = (noisy_features(feats, DecoderLossConfig(noise_tau=0.4, noise_fixed=True)) - feats).flatten(1).std(1)
    spread = (noisy_features(feats, DecoderLossConfig(noise_tau=0.8)) - feats).flatten(1).std(1)
    assert torch.allclose(fixed, torch.full_like(fixed, 0.4), atol=0.02)  # every sample exactly sigma 0.4
    assert spread.min() < 0.2 and spread.max() > 0.6  # RAE: sigma ~ 0.8 U(0, 1)
    assert torch.equal(noisy_features(feats, DecoderLossConfig(noise_tau=0.0)), feats)
    fae = load_preset("decoder-fae-l")
    assert (fae.loss.noise_tau, fae.loss.noise_fixed, fae.model.in_dim, fae.model.width) == (0.4, True, 1536, 1024)


def test_init_starts_from_another_decoder_run(toy, tmp_path, rt):
    """--init: FAE's pixel fine-tuning continues the stage-1 decoder (here with lr 0: weights unchanged)."""
    from flatdino_cli.checkpoint import weights_file
    from flatdino_cli.stages.decoder import DecoderSources, train_decoder

    base = ("loss.gan=0", "loss.lpips=0", "train.max_steps=1", "train.batch_size=8")
    train_decoder(_cfg(*base), tmp_path / "stage1", rt, DecoderSources(toy, "tiny", no_lpips=True))
    train_decoder(_cfg(*base, "train.lr=0", "train.warmup_start_lr=0", "train.final_lr=0", "train.weight_decay=0"),
                  tmp_path / "ft", rt, DecoderSources(toy, "tiny", no_lpips=True, init=tmp_path / "stage1"))
    src = load_file(weights_file(tmp_path / "stage1", "decoder", prefer_ema=True))
    got = load_file(tmp_path / "ft" / "checkpoints/latest/model.safetensors")
    assert all(torch.equal(src[k], got[k]) for k in src)
    assert json.loads((tmp_path / "ft" / "inputs.json").read_text())["init"]["path"].endswith("stage1")
    with pytest.raises(UserError, match="another architecture"):
        train_decoder(_cfg(*base, "model.width=16"), tmp_path / "bad", rt,
                      DecoderSources(toy, "tiny", no_lpips=True, init=tmp_path / "stage1"))


def test_resume_on_other_images_is_refused_unless_new_data(toy, tmp_path, rt):
    """train-decoder records what it trained on (images, encoder, store rows): resuming on another image
    folder is a one-line refusal naming --new-data; with it, both inputs are kept in inputs.json."""
    from flatdino_cli.stages.decoder import DecoderSources, train_decoder

    other = tmp_path / "other"
    write_toy_dataset(other, per_class=3, progress=False)  # 36 other images
    base = ("loss.gan=0", "loss.lpips=0", "train.batch_size=8")
    run = tmp_path / "run"
    train_decoder(_cfg(*base, "train.max_steps=1"), run, rt, DecoderSources(toy, "tiny", no_lpips=True))
    first = json.loads((run / "inputs.json").read_text())["data_identity"]
    assert first["kind"] == "images" and first["encoder"]["encoder"] == "tiny" and first["features"] is None
    before = (run / "checkpoints/latest/model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"other data than .*--new-data") as e:
        train_decoder(_cfg(*base, "train.max_steps=2"), run, rt, DecoderSources(other, "tiny", no_lpips=True))
    assert "\n" not in str(e.value) and "source_hash" in str(e.value)
    assert (run / "checkpoints/latest/model.safetensors").read_bytes() == before  # nothing touched
    train_decoder(_cfg(*base, "train.max_steps=2"), run, rt, DecoderSources(other, "tiny", no_lpips=True),
                  new_data=True)
    inputs = json.loads((run / "inputs.json").read_text())
    assert inputs["previous_inputs"][0]["data_identity"] == first
    assert inputs["data_identity"]["source_hash"] != first["source_hash"]

"""train-vae (stages/vae.py): one-line errors of the command, the data it trains on (another store of
the same shape refused unless --new-data, a store too small for the preset), the best checkpoint picked
by the Huber loss on --val-features (none for an empty validation set), and the crop rule on images.
The training loop under it: test_train.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import Store
from flatdino_cli.errors import UserError
from flatdino_cli.extract import extract_latents
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import CPU
from flatdino_cli.stages.vae import train_vae
from test_train import ENV, encoder_store, one_thread, short_preset, store, write_preset  # noqa: F401 (fixtures)


def tiny_vae_run(features, out):
    """A one-step tiny-vae run dir on a store of the tiny encoder's features (other test files use it)."""
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32",
                                   "model.enc_depth=1", "model.enc_heads=2", "model.dec_width=32",
                                   "model.dec_depth=1", "model.dec_heads=2", "train.max_steps=1",
                                   "train.batch_size=4", "val_count=2"])
    train_vae(cfg, out, CPU, features=features)
    return out


# ----------------------------------------------------------------------------- one-line errors
def _one_line_error(code: int, stdout: str, stderr: str, needles: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("flatdino: error: "), (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_train_vae_missing_features_is_one_line(tmp_path, store, cli):
    preset = write_preset(tmp_path / "tiny.yaml")
    p = cli("train-vae", "--preset", preset, "--features", tmp_path / "no-such-store", "--out", tmp_path / "run",
            "--device", "cpu", check=False, env=ENV)
    _one_line_error(p.returncode, p.stdout, p.stderr, [str(tmp_path / "no-such-store"), "flatdino extract"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset, sets, needles", [
    ("s-32x128", [], ["--preset s-32x128", "dit", "vae-"]),
    (None, ["--set", "train.lrr=1"], ["train.lrr", "did you mean lr"]),
], ids=["dit-preset", "typo"])
def test_train_vae_config_errors_are_one_line(tmp_path, store, preset, sets, needles):
    # in-process (the subprocess path is the test above): the same command wrapper turns UserError into
    # one line on stderr and exit code 1
    from typer.testing import CliRunner

    from flatdino_cli.cli import app

    preset = preset or str(write_preset(tmp_path / "tiny.yaml"))
    r = CliRunner().invoke(app, ["train-vae", "--preset", preset, "--features", str(store), "--out",
                                 str(tmp_path / "run"), "--device", "cpu", *sets])
    assert isinstance(r.exception, SystemExit), r.exception
    _one_line_error(r.exit_code, r.stdout, r.stderr, needles)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the data it trains on
def test_foreign_store_of_the_same_shape_is_refused_then_accepted_on_purpose(tmp_path):
    a, b = encoder_store(tmp_path / "a", "enc-a"), encoder_store(tmp_path / "b", "enc-b", seed=1)
    run = tmp_path / "vae"
    cfg = load_preset(str(short_preset(tmp_path / "p.yaml")))
    train_vae(cfg, run, CPU, features=a)
    inputs = (run / "inputs.json").read_bytes()
    more = load_preset(str(short_preset(tmp_path / "p.yaml", epochs=2)))
    with pytest.raises(UserError, match=r"other data.*differs in encoder.*--new-data"):
        train_vae(more, run, CPU, features=b)
    assert (run / "inputs.json").read_bytes() == inputs  # the record of the original store is kept
    with pytest.raises(UserError, match=r"made by encoder enc-b .* trained on features of enc-a.*--new-data"):
        extract_latents(b, run, tmp_path / "lat", CPU)
    assert not (tmp_path / "lat").exists()
    summary = extract_latents(b, run, tmp_path / "lat", CPU, new_data=True)
    lat = Store.open(summary["stores"][0])  # records the VAE's training data beside its own source
    assert lat.manifest["identity"]["vae_training_data"]["encoder"]["encoder"] == "enc-a"
    assert lat.manifest["extra"]["encoder"]["encoder"] == "enc-b"
    train_vae(more, run, CPU, features=b, new_data=True)
    rec = json.loads((run / "inputs.json").read_text())
    assert rec["data_identity"]["encoder"]["encoder"] == "enc-b"
    assert rec["previous_inputs"][0]["data_identity"]["encoder"]["encoder"] == "enc-a"


def test_store_too_small_for_the_preset_is_one_line(tmp_path):
    feats = encoder_store(tmp_path / "few", "enc-a", n=6)
    with pytest.raises(UserError, match=r"few: 6 usable rows.*needs at least"):
        train_vae(load_preset(str(short_preset(tmp_path / "p.yaml"))), tmp_path / "run", CPU, features=feats)
    assert not (tmp_path / "run").exists()


def test_train_summary_without_validation_says_so(cli, tmp_path):
    feats = encoder_store(tmp_path / "f", "enc-a", n=40)
    p = cli("train-vae", "--preset", short_preset(tmp_path / "p.yaml", max_steps=1), "--features", feats,
            "--out", tmp_path / "run", "--device", "cpu")
    assert "inf" not in p.stdout and "no validation yet" in p.stdout


# ----------------------------------------------------------------------------- validation and the best checkpoint
def _feature_store(path, n: int, seed: int, scale: float = 1.0, shape=(8, 16)):
    s = Store.create(path, "features", shape, n, "float32", {"encoder": "synthetic"}, {},
                     [f"img{i}.png" for i in range(n)], [i % 4 for i in range(n)])
    s.write_rows(np.arange(n), scale * np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32))
    s.mark_done(np.arange(n))
    s.finalize()
    s.close()
    return path


def test_vae_best_checkpoint_follows_val_huber_on_val_features(tmp_path):
    train_store = _feature_store(tmp_path / "train", 64, seed=0)
    val_store = _feature_store(tmp_path / "val", 24, seed=1, scale=2.0)  # another set: other numbers
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32",
                                   "model.enc_depth=1", "model.enc_heads=2", "model.dec_width=32",
                                   "model.dec_depth=1", "model.dec_heads=2", "train.epochs=4",
                                   "train.batch_size=8", "train.val_every_epochs=1", "train.warmup_epochs=0",
                                   "train.decay_epochs=1", "loss.beta=0.05"])  # a KL term big enough to matter
    run = tmp_path / "run"
    summary = train_vae(cfg, run, CPU, features=train_store, val_features=val_store)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert len(val) == 4 and summary["best_val"] == pytest.approx(min(r["val/loss"] for r in val))
    assert all(r["val/loss_with_kl"] > r["val/loss"] for r in val)
    # the best checkpoint's Huber on ALL of the --val-features store is the number it was picked by
    _, vae, _ = load_run(run, "vae")
    feats = torch.from_numpy(np.array(Store.open(val_store).data, dtype=np.float32))
    with torch.no_grad():
        recon = vae.decode(vae.encode(feats)[0])
    assert F.huber_loss(recon, feats).item() == pytest.approx(summary["best_val"], rel=1e-4)
    assert json.loads((run / "inputs.json").read_text())["val_features"]["path"] == str(val_store.resolve())
    with pytest.raises(UserError, match="--val-features"):
        train_vae(cfg, tmp_path / "bad", CPU, features=train_store,
                  val_features=_feature_store(tmp_path / "other", 8, seed=2, shape=(4, 16)))


def test_an_empty_validation_set_picks_no_best_checkpoint(tmp_path):
    # 8 rows hold out 8 // 10 = 0: an empty validation set must not score 0 and freeze `best` at epoch 1
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32",
                                   "model.enc_depth=1", "model.enc_heads=2", "model.dec_width=32",
                                   "model.dec_depth=1", "model.dec_heads=2", "train.epochs=2",
                                   "train.batch_size=4", "train.val_every_epochs=1"])
    summary = train_vae(cfg, tmp_path / "run", CPU, features=_feature_store(tmp_path / "f", 8, seed=0))
    assert summary["best_val"] == float("inf") and not (tmp_path / "run/checkpoints/best").exists()


# ----------------------------------------------------------------------------- on images
def test_vae_image_mode_crops_by_the_one_crop_size_rule(tmp_path, monkeypatch):
    """train-vae on images takes its crop size from encoders.default_crop_size (the rule extract uses)."""
    from flatdino_cli import encoders
    from flatdino_cli.stages import vae as vae_stage
    from flatdino_cli.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "imgs", per_class=1, size=56, progress=False)
    assert vae_stage.default_crop_size is encoders.default_crop_size  # the one rule, not a copy
    monkeypatch.setattr(vae_stage, "default_crop_size", lambda enc: enc.spec.image_size + 4)  # ...and it is used
    cfg = load_preset("tiny-vae", ["model.tokens=4", "model.latent_dim=8", "model.enc_width=32", "model.enc_depth=1",
                                   "model.enc_heads=2", "model.dec_width=32", "model.dec_depth=1",
                                   "model.dec_heads=2", "train.max_steps=1", "train.batch_size=4"])
    train_vae(cfg, tmp_path / "run", CPU, images=tmp_path / "imgs", encoder_name="tiny")
    aug = json.loads((tmp_path / "run/inputs.json").read_text())["images"]["augmentation"]
    assert aug["crop_size"] == 48 + 4 and aug["input_size"] == 48


def test_patch_group_makes_each_block_of_neighbouring_patches_one_token():
    from flatdino_cli.models.vae import FlatVAE

    cfg = load_preset("tiny-vae", ["model.patch_group=2", "model.enc_width=32", "model.dec_width=32"]).model
    cfg = type(cfg)(**{**cfg.__dict__, "num_patches": 144, "feature_dim": 6})  # a 12 x 12 grid
    torch.manual_seed(0)
    vae = FlatVAE(cfg).eval()
    assert vae.encoder.in_proj.in_features == 24 and vae.decoder.queries.shape[1] == 36  # 4 x 6 numbers, 6 x 6
    feats = torch.randn(2, 144, 6)
    seen = []
    vae.encoder.in_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    recon, mu, _ = vae(feats)
    assert recon.shape == feats.shape and mu.shape == (2, cfg.tokens, cfg.latent_dim)
    # token 0 holds patches (0,0), (0,1), (1,0), (1,1) of the 12-wide grid; token 7 starts at (2,2)
    assert torch.equal(seen[0][:, 0].reshape(2, 4, 6), feats[:, [0, 1, 12, 13]])
    assert torch.equal(seen[0][:, 7, :6], feats[:, 26])
    # the decoder's query 7 is written back onto the same four patches
    out = []
    vae.decoder.out_proj.register_forward_hook(lambda m, i, o: out.append(o))
    recon = vae.decode(mu)
    assert out[0].shape == (2, 36, 24) and torch.equal(recon[:, [26, 27, 38, 39]], out[0][:, 7].reshape(2, 4, 6))


@pytest.mark.parametrize("sets, needle", [(["model.patch_group=4"], "divisor of the patch grid's side"),
                                          (["model.kind=fae", "model.patch_group=2"], "1 for the FAE")])
def test_patch_group_errors_are_one_line(sets, needle):
    with pytest.raises(UserError, match=needle):
        load_preset("tiny-vae", ["model.num_patches=36", *sets])

"""Nothing lost, nothing mixed up: bad values, damaged runs, locks, foreign stores, bad folders."""

from __future__ import annotations

import pytest

from flatdino_cli.config import load_preset
from flatdino_cli.errors import UserError

# (preset, --set item): every one must be a one-line UserError, never a ZeroDivisionError/NaN run
BAD_VALUES = [
    ("tiny-vae", "model.heads=0"),  # no such key in a VAE: unknown-key error
    ("tiny-vae", "model.tokens=0"),
    ("tiny-vae", "model.enc_heads=0"),
    ("tiny-vae", "model.dec_heads=0"),
    ("tiny-vae", "model.latent_dim=-1"),
    ("tiny-vae", "model.mlp_ratio=-2"),
    ("tiny-vae", "model.mlp_ratio=nan"),
    ("tiny-vae", "loss.beta=-1"),
    ("tiny-vae", "loss.huber_delta=0"),
    ("tiny-vae", "val_count=-5"),
    ("tiny-vae", "train.lr=nan"),
    ("tiny-vae", "train.lr=inf"),
    ("tiny-vae", "train.lr=-1e-4"),
    ("tiny-vae", "train.eps=0"),
    ("tiny-vae", "train.weight_decay=-1"),
    ("tiny-vae", "train.betas=[0.9, 1.5]"),
    ("tiny-vae", "train.max_steps=0"),
    ("tiny-vae", "train.epochs=-1"),
    ("tiny-vae", "train.grad_clip=nan"),
    ("tiny-vae", "train.num_workers=-1"),
    ("tiny-vae", "train.keep_old_runs=-1"),
    ("tiny-dit", "model.heads=0"),
    ("tiny-dit", "model.tokens=0"),
    ("tiny-dit", "model.depth=0"),
    ("tiny-dit", "model.num_classes=0"),
    ("tiny-dit", "model.class_dropout=1.5"),
    ("tiny-dit", "model.head_heads=0"),
    ("tiny-dit", "flow.steps=0"),
    ("tiny-dit", "flow.cfg_scale=nan"),
    ("tiny-dit", "sample_every=-1"),
    ("tiny-decoder", "model.heads=0"),
    ("tiny-decoder", "model.patch_size=0"),
    ("tiny-decoder", "model.num_patches=10"),
    ("tiny-decoder", "loss.noise_tau=-1"),
    ("tiny-decoder", "loss.l1=nan"),
]


@pytest.mark.parametrize("preset,item", BAD_VALUES)
def test_bad_config_values_are_one_line_errors(preset, item):
    with pytest.raises(UserError) as e:
        load_preset(preset, [item])
    assert "\n" not in str(e.value) and item.split("=")[0].split(".")[-1] in str(e.value)


@pytest.mark.parametrize("item", ["model.enc_heads=0", "train.lr=nan", "model.mlp_ratio=-1"])
def test_bad_config_value_on_the_command_line(cli, tmp_path, item):
    p = cli("train-vae", "--preset", "tiny-vae", "--features", tmp_path, "--out", tmp_path / "run", "--set", item,
            "--device", "cpu", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and item.split("=")[0] in p.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_errors_name_the_problem_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: vae\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"line \d+.*invalid YAML") as e:
        load_preset(str(bad))
    assert "python tags" not in str(e.value)
    bad.write_text("stage: vae\nmodel: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match=r"line 2.*python tags are refused"):
        load_preset(str(bad))


def test_device_mps_is_one_line(cli, tmp_path):
    p = cli("train-vae", "--preset", "tiny-vae", "--features", tmp_path, "--out", tmp_path / "run",
            "--device", "mps", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--device mps" in p.stderr

"""Configs (config.py) and their loader (config_yaml.py): presets resolve and inherit, --set is type
checked, YAML is strict; every bad value is a one-line error naming the key, also on the command line.
What the presets hold: test_presets.py."""

import pytest
import yaml

from flatdino_cli.config import VAEStageConfig
from flatdino_cli.config_yaml import apply_overrides, list_presets, load_config, load_preset, save_config
from flatdino_cli.errors import UserError


def test_every_preset_resolves():
    names = list_presets()
    for T in (16, 32, 64, 128):
        for d in (16, 32, 64, 128):
            assert f"vae-{T}x{d}" in names
    for n in ("s-32x128", "b-32x128", "l-32x128", "xl-32x128", "dh-xl-32x128", "rae-xl-256x768",
              "rae-dh-xl-256x768", "decoder-xl"):
        assert n in names
    for n in names:
        cfg = load_preset(n)
        assert cfg.stage in ("vae", "dit", "decoder")


def test_base_preset_inheritance_and_beta():
    cfg = load_preset("vae-16x64")
    assert (cfg.model.tokens, cfg.model.latent_dim) == (16, 64)
    assert cfg.model.dec_width == 1024 and cfg.train.lr == 1e-4  # inherited from vae-32x128
    assert load_preset("vae-32x128").beta() == pytest.approx(1.25e-7)
    assert cfg.beta() == pytest.approx(1e-6 * 512 / (16 * 64))


def test_set_overrides_are_type_checked():
    cfg = load_preset("xl-32x128", ["train.lr=1e-3", "model.depth=2", "flow.cfg_interval=[0.1, 0.9]",
                                    "train.max_steps=5"])
    assert cfg.train.lr == 1e-3 and cfg.model.depth == 2 and cfg.flow.cfg_interval == (0.1, 0.9)
    assert cfg.train.max_steps == 5
    with pytest.raises(UserError, match="model.depth must be int"):
        apply_overrides(cfg, ["model.depth=two"])
    with pytest.raises(UserError, match="did you mean lr"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(UserError, match="unknown key 'trian.lr'.*train"):
        apply_overrides(cfg, ["trian.lr=1"])
    with pytest.raises(UserError, match="key=value"):
        apply_overrides(cfg, ["train.lr"])


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UserError, match="vae-32x128"):
        load_preset("vae-32x127")


def test_yaml_python_tags_refused(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("stage: vae\nmodel: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="python tags are refused"):
        load_preset(str(bad))


def test_config_roundtrip(tmp_path):
    cfg = load_preset("rae-dh-xl-256x768", ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["grid"] == [16, 16]


def test_validation_message():
    with pytest.raises(UserError, match="train.schedule"):
        apply_overrides(VAEStageConfig(), ["train.schedule=exponential"])


def test_figure4_grid_presets_all_train_50_epochs():
    # Figure 4 trains every latent shape 50 epochs (5 decaying); 32x64 and 32x128 keep Table 2's 150 in their
    # own presets, so the grid has -e50 presets for those two, and REPRODUCE.md's row 4 names them
    from pathlib import Path

    for t in (16, 32, 64):
        for d in (16, 32, 64, 128):
            name = f"vae-{t}x{d}-e50" if (t, d) in ((32, 64), (32, 128)) else f"vae-{t}x{d}"
            cfg = load_preset(name)
            assert (cfg.model.tokens, cfg.model.latent_dim) == (t, d), name
            assert (cfg.train.epochs, cfg.train.decay_epochs) == (50, 5), name
    assert load_preset("vae-32x128").train.epochs == 150  # Table 2's main laminator is untouched
    row4 = next(ln for ln in (Path(__file__).parent.parent / "docs/REPRODUCE.md").read_text().splitlines()
                if ln.startswith("| 4 |"))
    assert "vae-32x64-e50" in row4 and "vae-32x128-e50" in row4


def test_reproduce_text_versions_resolve():
    # REPRODUCE.md's "text vs code" rows: each --set there is a real, type-checked key of its preset
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs/REPRODUCE.md").read_text()
    section = text.split("### Where the paper's text and the authors' code disagree")[1].split("\n### ")[0]
    commands = re.findall(r"`(flatdino train-\w+ [^`]+)`", section)
    assert len(commands) == 2
    for cmd in commands:
        words = shlex.split(cmd)
        preset = words[words.index("--preset") + 1]
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        default, changed = load_preset(preset), load_preset(preset, sets)
        assert default != changed, cmd


def test_sample_config_checks_guidance_before_anything_is_loaded():
    """`flatdino sample`'s option checks are SampleConfig's: the same one-line messages, raised before
    any run is opened (the paths here do not exist)."""
    from flatdino_cli.config import SampleConfig

    base, schedule = ("no-dit", None, "no-decoder"), ((0.0, 1.0, 2.0),)
    for kwargs, message in (({"batch_size": 0}, "--batch-size 0: must be >= 1"),
                            ({"guide_scale": 1.5}, "AutoGuidance needs both"),
                            ({"guide": "weak"}, "AutoGuidance needs both"),
                            ({"guide": "weak", "guide_scale": 1.5, "cfg_scale": 2.0}, "two guidance methods"),
                            ({"cfg_scale": 2.0, "schedule": schedule}, "--cfg-schedule sets the weight"),
                            ({"interval": (0.1, 1.0), "schedule": schedule}, "--cfg-schedule sets the weight")):
        with pytest.raises(UserError, match=message) as e:
            SampleConfig(*base, **kwargs)
        assert "\n" not in str(e.value)
    assert SampleConfig(*base, guide="weak", schedule=schedule).weight is None  # the schedule weighs
    assert SampleConfig(*base, guide="weak", guide_scale=1.42).weight == 1.42
    assert SampleConfig(*base, cfg_scale=4.5, classes=["0", "goldfinch"]).weight == 4.5
    assert SampleConfig(*base, classes=["0", "goldfinch"]).classes == ("0", "goldfinch")  # frozen: a tuple


# ----------------------------------------------------------------------------- bad values and YAML: one line
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
    ("tiny-dit", "model.num_classes=-1"),
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

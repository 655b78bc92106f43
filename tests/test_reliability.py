"""Nothing lost, nothing mixed up: bad values, damaged runs, locks, foreign stores, bad folders."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import flatdino_cli.checkpoint as checkpoint
import flatdino_cli.rundir as rundir
from flatdino_cli.checkpoint import checkpoint_dir
from flatdino_cli.config import ExtractConfig, TrainConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import Store
from flatdino_cli.errors import UserError
from flatdino_cli.extract import extract_features, extract_latents
from flatdino_cli.lock import LOCK_NAME, FolderLock
from flatdino_cli.runtime import CPU
from flatdino_cli.stages.vae import train_vae
from flatdino_cli.train import Task, fit
from test_train import synthetic_store, write_preset

ROOT = Path(__file__).resolve().parents[1]

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


def test_device_mps_is_one_line(cli, tmp_path):
    p = cli("train-vae", "--preset", "tiny-vae", "--features", tmp_path, "--out", tmp_path / "run",
            "--device", "mps", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--device mps" in p.stderr


# ----------------------------------------------------------------------------- run dirs: damage, locks, aside
def _tiny_task(n: int = 32, val: bool = True) -> Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(net, batch, info):
        loss = F.mse_loss(net(batch[0]), batch[1])
        return loss, {}

    def val_fn(net, batches, rt):
        return {"loss": sum(F.mse_loss(net(b[0]), b[1]).item() for b in batches)}

    return Task(model=model, train_set=data, loss_fn=loss_fn, config=TrainConfig(), val_set=data if val else None,
                val_fn=val_fn if val else None, inputs={"data": "tiny"})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CFG = TrainConfig(epochs=2, batch_size=8, log_every=1)


def test_damaged_run_is_refused_and_left_byte_identical(tmp_path):
    run = tmp_path / "run"
    fit(_tiny_task(), CFG, run, CPU)
    (run / "checkpoints" / "latest" / "state.pt").unlink()
    before = _files(run)
    assert any(k.startswith("checkpoints/best/") for k in before)
    with pytest.raises(UserError, match=r"no complete checkpoints/latest.*--no-resume.*checkpoints/best") as e:
        fit(_tiny_task(), CFG, run, CPU)
    assert "\n" not in str(e.value)
    assert _files(run) == before  # best, metrics, config: nothing overwritten


def test_no_resume_moves_the_whole_run_aside_and_keeps_the_last_k(tmp_path, capsys):
    run = tmp_path / "run"
    fit(_tiny_task(), CFG, run, CPU)
    first = _files(run)
    fit(_tiny_task(), CFG, run, CPU, resume=False)
    aside = sorted(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and _files(aside[0]) == first  # checkpoints + config + metrics + inputs together
    assert f"moved the previous run to {aside[0]}" in capsys.readouterr().out
    for _ in range(2):
        fit(_tiny_task(), CFG, run, CPU, resume=False)
    assert len(list(tmp_path.glob("run.old-*"))) == 1  # default keep 1
    fit(_tiny_task(), dataclasses.replace(CFG, keep_old_runs=3), run, CPU, resume=False)
    (run / "stats.pt").write_bytes(b"prepared by the stage for this run")
    task = dataclasses.replace(_tiny_task(), keep_files=("stats.pt",))
    fit(task, dataclasses.replace(CFG, keep_old_runs=3), run, CPU, resume=False)
    aside = sorted(tmp_path.glob("run.old-*"))
    assert len(aside) == 3 and (aside[-1] / "stats.pt").is_file() and (run / "stats.pt").is_file()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "yesterday"}))
    assert fit(_tiny_task(), CFG, run, CPU)["step"] == 8
    assert f"stale lock (pid {dead.pid}" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_lock_is_refused_while_held_and_names_the_holder(tmp_path):
    with FolderLock(tmp_path / "run", "run directory"):
        with pytest.raises(UserError, match=rf"in use by another flatdino process \(pid {os.getpid()} on host "):
            fit(_tiny_task(), CFG, tmp_path / "run", CPU)
    with FolderLock(tmp_path / "run"):  # released: free again
        pass


def test_two_writer_processes_one_refused_other_byte_identical_to_solo(tmp_path, cli):
    feats = _store(tmp_path / "feats", "enc-a", n=40)
    preset = _preset(tmp_path / "p.yaml")
    args = ["train-vae", "--preset", preset, "--features", feats, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_READY": str(tmp_path / "ready"),
           "PAUSE_GO": str(tmp_path / "go")}
    first = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_paused_cli.py"), *map(str, args),
                              "--out", tmp_path / "run"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):  # generous: start-up on a loaded machine
            if (tmp_path / "ready").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "ready").exists(), first.communicate()
        second = cli(*args, "--out", tmp_path / "run", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"in use by another flatdino process (pid {first.pid} " in second.stderr
        (tmp_path / "go").write_text("")
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    cli(*args, "--out", tmp_path / "solo", env={"OMP_NUM_THREADS": "1"})  # the first writer's thread count
    got, solo = _files(tmp_path / "run" / "checkpoints"), _files(tmp_path / "solo" / "checkpoints")
    assert got.keys() == solo.keys()
    for k in got:
        if k.endswith(".safetensors"):
            assert got[k] == solo[k], k
    assert (tmp_path / "run" / "config.yaml").read_bytes() == (tmp_path / "solo" / "config.yaml").read_bytes()


def test_extract_into_a_locked_store_is_refused(tmp_path, cli):
    toy = tmp_path / "toy"
    cli("toy-data", toy, "--per-class", "1")
    with FolderLock(tmp_path / "store", "store"):
        p = cli("extract", toy, tmp_path / "store", "--encoder", "tiny", "--overwrite", "--device", "cpu", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and f"pid {os.getpid()}" in p.stderr
    assert not (tmp_path / "store" / "manifest.json").exists()


# ----------------------------------------------------------------------------- foreign data
def _store(path: Path, encoder: str, n: int = 40, seed: int = 0) -> Path:
    return synthetic_store(path, n, {"encoder": encoder, "weights": "w-" + encoder}, seed)


def _preset(path: Path, **train_cfg) -> Path:
    return write_preset(path, **{"epochs": 1, **train_cfg})


def test_foreign_store_of_the_same_shape_is_refused_then_accepted_on_purpose(tmp_path):
    a, b = _store(tmp_path / "a", "enc-a"), _store(tmp_path / "b", "enc-b", seed=1)
    run = tmp_path / "vae"
    cfg = load_preset(str(_preset(tmp_path / "p.yaml")))
    train_vae(cfg, run, CPU, features=a)
    inputs = (run / "inputs.json").read_bytes()
    more = load_preset(str(_preset(tmp_path / "p.yaml", epochs=2)))
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


# ----------------------------------------------------------------------------- disk full
def test_disk_full_during_a_checkpoint_is_one_line_and_resumable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(_tiny_task(val=False), dataclasses.replace(CFG, epochs=1), run, CPU)  # latest at step 4
    real = checkpoint.save_file

    def full(tensors, filename, *a, **k):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(UserError, match=r"checkpoints/\.tmp-latest: disk full .*needs about .* MB free") as e:
        fit(_tiny_task(val=False), CFG, run, CPU)
    assert "\n" not in str(e.value)
    assert checkpoint_dir(run).name == "latest" and not (run / "checkpoints" / ".tmp-latest").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert fit(_tiny_task(val=False), CFG, run, CPU)["step"] == 8


def test_disk_full_during_extract_names_the_file(tmp_path, monkeypatch):
    from flatdino_cli.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", per_class=1, size=48, seed=0)

    def full(self, indices, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "write_rows", full)
    with pytest.raises(UserError, match=r"store/data.npy: disk full while writing \(needs about [\d.]+ MB"):
        extract_features(tmp_path / "toy", tmp_path / "store", ExtractConfig(encoder="tiny", batch_size=4), CPU)


# ----------------------------------------------------------------------------- bad folders
def _garbage_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"not an image at all")


def test_all_unreadable_folder_is_an_error_naming_folder_and_files(tmp_path):
    _garbage_images(tmp_path / "bad", ["a.png", "b.jpg", "c.png", "d.png"])
    with pytest.raises(UserError, match=r"bad: none of its 4 images could be read \(e\.g\. .*a\.png.*b\.jpg.*"
                                        r"nothing was written"):
        extract_features(tmp_path / "bad", tmp_path / "store", ExtractConfig(encoder="tiny", val_split=1), CPU)
    assert not (tmp_path / "store").exists()  # no finished store of zeros left to be mistaken for data


def test_store_too_small_for_the_preset_is_one_line(tmp_path):
    feats = _store(tmp_path / "few", "enc-a", n=6)
    with pytest.raises(UserError, match=r"few: 6 usable rows.*needs at least"):
        train_vae(load_preset(str(_preset(tmp_path / "p.yaml"))), tmp_path / "run", CPU, features=feats)
    assert not (tmp_path / "run").exists()


def test_symlink_loop_and_newline_names_add_no_rows(tmp_path):
    from flatdino_cli.data import list_images
    from flatdino_cli.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", per_class=2, size=48, seed=0)
    cls = sorted((tmp_path / "toy").iterdir())[0]
    n = len(list_images(tmp_path / "toy"))
    (cls / "loop").symlink_to(cls)  # a loop
    (cls / "again").symlink_to(tmp_path / "toy")  # the whole tree once more
    first = sorted(cls.glob("*.png"))[0]
    (cls / "bad\nname.png").write_bytes(first.read_bytes())
    with pytest.warns(UserWarning) as record:
        images = list_images(tmp_path / "toy")
    assert len(images) == n
    for path, label in zip(images.paths, images.labels):  # every image under its own class, once
        rel = Path(path).relative_to((tmp_path / "toy").resolve())
        assert len(rel.parts) == 2 and rel.parts[0] == images.class_names[label], rel
    text = " ".join(str(w.message) for w in record)
    assert "symlinks" in text and "bad\\nname.png" in text


# ----------------------------------------------------------------------------- what a person reads
def test_help_examples_are_never_rewrapped():
    """Every command line quoted in a command's docstring shows on one line of its --help at 80 columns."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from flatdino_cli.cli import app

    group = get_command(app)
    checked = 0
    for name, cmd in group.commands.items():
        lines = [ln.strip().removeprefix("Example:").strip() for ln in (cmd.help or "").splitlines()]
        quoted = [ln for ln in lines if ln.startswith(("flatdino ", "torchrun "))]
        if not quoted:
            continue
        shown = CliRunner().invoke(app, [name, "--help"], terminal_width=80).output
        lines = [ln.strip() for ln in shown.splitlines()]
        for q in quoted:
            assert any(ln.endswith(q) for ln in lines), f"{name} --help re-wraps: {q}"
            checked += 1
    assert checked >= 15


def test_sample_grid_names_each_row_in_full(tmp_path):
    from PIL import ImageDraw

    from flatdino_cli.toydata import CLASS_NAMES
    from flatdino_cli.viz import _font, make_grid

    tiles = np.full((12 * 3, 48, 48, 3), 128, np.uint8)
    labels = [f"{c} {n}" for c, n in enumerate(CLASS_NAMES)]
    grid = make_grid(tiles, 3, row_labels=labels)
    plain = make_grid(tiles, 3)
    column = grid[:, : grid.shape[1] - plain.shape[1]]
    longest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=_font(16)) for t in labels)
    assert column.shape[1] >= longest * 10 / 16  # wide enough for the longest name at the smallest size
    assert np.array_equal(grid[:, column.shape[1]:], plain)
    for r in range(12):  # dark text beside every row
        band = column[2 + r * 50: 2 + r * 50 + 48]
        assert (band < 100).any(), r


def test_quickstart_refuses_too_few_images_up_front_and_prints_full_paths(cli, tmp_path):
    from flatdino_cli.quickstart import format_summary

    p = cli("quickstart", "--out", tmp_path / "qs", "--per-class", "6", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--per-class 7" in p.stderr
    assert not (tmp_path / "qs").exists()
    text = format_summary({"out": "runs/qs", "minutes": 1, "stage_minutes": 1, "stages": [
        {"stage": "sample", "grid": "grid.png"}, {"stage": "ablate-tokens", "figure": "token_ablation.png"}]})
    assert str((Path("runs/qs") / "samples" / "grid.png").resolve()) in text
    assert str((Path("runs/qs") / "ablate" / "token_ablation.png").resolve()) in text


def test_train_summary_without_validation_says_so(cli, tmp_path):
    feats = _store(tmp_path / "f", "enc-a", n=40)
    p = cli("train-vae", "--preset", _preset(tmp_path / "p.yaml", max_steps=1), "--features", feats,
            "--out", tmp_path / "run", "--device", "cpu")
    assert "inf" not in p.stdout and "no validation yet" in p.stdout


def test_inception_weights_are_never_taken_from_tmp(tmp_path, monkeypatch):
    import tempfile

    from flatdino_cli.analysis import inception_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    planted = Path(tempfile.gettempdir()) / inception_weights.INCEPTION_FILE
    made = not planted.exists()
    if made:
        planted.write_bytes(b"planted by someone else")
    try:
        with pytest.raises(UserError, match=str(tmp_path / "cache" / "flatdino" / inception_weights.INCEPTION_FILE)):
            inception_weights.find_inception_weights()
    finally:
        if made:
            planted.unlink()
    mine = tmp_path / "cache" / "flatdino" / inception_weights.INCEPTION_FILE
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"x")
    assert inception_weights.find_inception_weights() == mine


def test_a_full_disk_anywhere_else_is_still_one_line(tmp_path, monkeypatch):
    """Writes without their own disk-full message (metrics.jsonl, summaries) end in one line too."""
    from typer.testing import CliRunner

    from flatdino_cli.cli import app

    def full(self, **row):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(rundir.MetricsLog, "write", full)
    feats = _store(tmp_path / "f", "enc-a", n=40)
    r = CliRunner().invoke(app, ["train-vae", "--preset", str(_preset(tmp_path / "p.yaml")), "--features", str(feats),
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    last = r.stderr.strip().splitlines()[-1]  # on a line of its own, after the closed progress bar
    assert last.startswith(f"flatdino: error: {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device")


def test_train_dit_refuses_to_resume_on_other_latents(tmp_path):
    from test_dit import K, TINY_DIT_YAML, write_latents

    from flatdino_cli.stages.dit import train_dit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4, 2)).astype(np.float32)
    a = write_latents(tmp_path / "a", x, [i % K for i in range(32)])
    b = write_latents(tmp_path / "b", x, [(i + 1) % K for i in range(32)])  # other images' labels: another source
    (tmp_path / "tiny.yaml").write_text(TINY_DIT_YAML)
    cfg = load_preset(str(tmp_path / "tiny.yaml"), ["train.max_steps=2", "train.batch_size=8"])
    train_dit(cfg, tmp_path / "run", CPU, a)
    more = load_preset(str(tmp_path / "tiny.yaml"), ["train.max_steps=4", "train.batch_size=8"])
    with pytest.raises(UserError, match=r"other data.*differs in source_hash.*--new-data"):
        train_dit(more, tmp_path / "run", CPU, b)
    assert train_dit(more, tmp_path / "run", CPU, b, new_data=True)["step"] == 4
    rec = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert rec["data_path"] == str(b.resolve()) and rec["previous_inputs"][0]["data_path"] == str(a.resolve())

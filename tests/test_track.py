"""--log-to tensorboard|wandb (track.py) through the shared training loop: scalars, hyper-parameters and
images read back with TensorBoard's own reader, a killed-and-resumed run continuing the same
TensorBoard / W&B run, the offline W&B run folder, and the one-line error for a missing library.

A 4-16-1 MLP trained in-process for a few steps; W&B runs offline (its service process is the slow part).
"""

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from flatdino_cli.config import TrainConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.errors import UserError
from flatdino_cli.runtime import CPU
from flatdino_cli.train import Task, fit
from flatdino_cli.viz import save_png



class Killed(BaseException):
    """Stands in for SIGKILL (no `except Exception` can swallow it)."""


def mse(net, batch, info):
    x, y = batch
    loss = F.mse_loss(net(x), y)
    return loss, {"mse": loss.item()}


def tiny_task(on_step=None) -> Task:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    return Task(model=model, train_set=TensorDataset(x, x.sum(1, keepdim=True).sin()), loss_fn=mse,
                config=TrainConfig(), on_step=on_step)


def grid_writer(run: Path, every: int = 2, kill_at: int | None = None):
    """An on_step that writes a small PNG every `every` steps (like train-dit's sample grids)."""

    def on_step(step, model, ema):
        if kill_at is not None and step == kill_at:
            raise Killed
        if step % every:
            return None
        path = run / "samples" / f"step_{step:07d}.png"
        save_png(np.full((8, 8, 3), step * 10, np.uint8), path)
        return path

    return on_step


def cfg(log_to, max_steps, **kw) -> TrainConfig:
    return TrainConfig(batch_size=4, max_steps=max_steps, epochs=0, lr=1e-2, log_every=1, ckpt_every_steps=4,
                       log_to=tuple(log_to), **kw)


def jsonl(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_hparams_images_and_resume_continue_one_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    # killed after step 6 (checkpoint at 4): steps 5 and 6 were logged, then redone by the resumed run
    with pytest.raises(Killed):
        fit(tiny_task(grid_writer(run, kill_at=7)), cfg(["tensorboard"], 10), run, CPU)
    fit(tiny_task(grid_writer(run)), cfg(["tensorboard"], 10), run, CPU)

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "mse", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(tags["scalars"])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 11)), "one value per step: the killed run's 5-6 purged"
    rows = [r for r in jsonl(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in rows], rtol=1e-6)
    assert [e.step for e in acc.Images("samples")] == [2, 4, 6, 8, 10]
    # the resolved config as hyper-parameters (HParams plugin) and as text
    hp = acc.PluginTagToContent("hparams")
    assert b"warmup_epochs" in hp["_hparams_/session_start_info"]  # the task config is a TrainConfig here
    assert "config/text_summary" in tags["tensors"]


def test_wandb_offline_run_folder_and_resume_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    fit(tiny_task(grid_writer(run)), cfg(["wandb", "tensorboard"], 4), run, CPU)
    fit(tiny_task(grid_writer(run)), cfg(["wandb", "tensorboard"], 6), run, CPU)  # resumed, 2 more steps

    run_id = json.loads((run / "tracking.json").read_text())["wandb_id"]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f"-{run_id}" in f.name for f in folders), folders
    keys = (b"loss", b"lr", b"grad_norm", b"samples_per_s", b"warmup_epochs", b"samples")  # scalars, the config, the image
    records = [_wandb_log(folders[0] / f"run-{run_id}.wandb", *keys),
               _wandb_log(folders[1] / f"run-{run_id}.wandb", b"samples_per_s")]
    for key in keys:
        assert key in records[0], key  # scalars, the config, the image
    assert b"samples_per_s" in records[1]
    assert (run / "tensorboard").is_dir()  # both trackers at once
    # --no-resume starts over: a new W&B run, not steps 1.. again in the old one
    fit(tiny_task(), cfg(["wandb"], 2), run, CPU, resume=False)
    assert json.loads((run / "tracking.json").read_text())["wandb_id"] != run_id


def _wandb_log(path: Path, *keys: bytes, timeout: float = 120.0) -> bytes:
    """The bytes of an offline W&B run file, once its service has flushed every one of `keys` into it
    (it writes asynchronously, in no fixed order, a moment after run.finish() returns)."""
    deadline = time.monotonic() + timeout
    while not all(k in (data := path.read_bytes()) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    return data


def test_missing_tracker_library_is_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r'wandb package is not installed; pip install "flatdino\[track\]"'):
        fit(tiny_task(), cfg(["wandb"], 2), tmp_path / "run", CPU)
    with pytest.raises(UserError, match="--log-to comet: unknown tracker"):
        fit(tiny_task(), cfg(["comet"], 2), tmp_path / "run", CPU)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_log_to_cli_option_sets_train_log_to(tmp_path):
    """--log-to on the train commands is the override train.log_to=[...] (also settable in a preset)."""
    from typer.testing import CliRunner

    from flatdino_cli.cli import app
    from flatdino_cli.stages.start import TrainRequest

    c = load_preset("vae-32x128", TrainRequest("vae-32x128", log_to=["tensorboard", "wandb"]).overrides())
    assert c.train.log_to == ("tensorboard", "wandb")
    assert dataclasses.replace(c.train, log_to=()).log_to == ()
    for command in ("train-vae", "train-dit", "train-decoder"):
        out = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert "--log-to" in out and "Example: --log-to tensorboard" in out, command


def test_only_rank_zero_opens_trackers(tmp_path, monkeypatch):
    from flatdino_cli.track import open_trackers

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert open_trackers(("tensorboard", "wandb"), tmp_path, {"a": 1}, 0, is_main=False) == []
    assert list(tmp_path.iterdir()) == []  # no event file, no W&B folder, no tracking.json


def test_train_vae_command_logs_to_tensorboard(tmp_path):
    """The real command: --log-to reaches the loop through train-vae, validation rows included."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from flatdino_cli.cli import app
    from flatdino_cli.data import Store

    store = tmp_path / "store"
    s = Store.create(store, "features", (8, 16), 72, "float32", {"encoder": "synthetic"}, {},
                     [f"img{i}.png" for i in range(72)], [i % 4 for i in range(72)])
    s.write_rows(np.arange(72), np.random.default_rng(0).standard_normal((72, 8, 16)).astype(np.float32))
    s.mark_done(np.arange(72))
    s.finalize()
    s.close()
    model = {"kind": "flat", "tokens": 4, "latent_dim": 8, "enc_width": 32, "enc_depth": 1, "enc_heads": 2,
             "dec_width": 32, "dec_depth": 1, "dec_heads": 2, "mlp_ratio": 2.0}
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"stage": "vae", "model": model, "val_count": 8,
                                      "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "log_every": 2}}))
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train-vae", "--preset", str(preset), "--features", str(store), "--out", str(run),
                                 "--device", "cpu", "--log-to", "tensorboard"])
    assert r.exit_code == 0, r.output
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [e.step for e in acc.Scalars("val/cosine")] == [8, 16]  # validation every epoch (8 steps)
    assert "log_to" in (run / "config.yaml").read_text()


def test_trackers_are_closed_however_the_loop_ends(tmp_path, monkeypatch):
    """A diverged run (NaN at step 6) and an interrupted one (Ctrl-C at step 3) still close their trackers:
    W&B's finish and TensorBoard's flush run, so nothing logged before the stop is left unwritten."""
    from flatdino_cli import train
    from flatdino_cli.train import TrainingDiverged

    class Recorder:
        def __init__(self):
            self.steps, self.closed = [], False

        def scalars(self, step, row):
            self.steps.append(step)

        def image(self, tag, path, step):
            pass

        def close(self):
            self.closed = True

    opened = []
    monkeypatch.setattr(train, "open_trackers", lambda *a, **k: opened.append(Recorder()) or opened[-1:])

    def stop_at(step, exc):
        def loss_fn(net, batch, info):
            if info.step + 1 == step and exc is KeyboardInterrupt:
                raise KeyboardInterrupt
            loss, m = mse(net, batch, info)
            return (loss * float("nan") if info.step + 1 == step else loss), m
        return loss_fn

    for n, (step, exc) in enumerate(((6, TrainingDiverged), (3, KeyboardInterrupt))):
        with pytest.raises(exc):
            fit(dataclasses.replace(tiny_task(), loss_fn=stop_at(step, exc)), cfg(["tensorboard"], 10),
                tmp_path / f"run{n}", CPU)
        assert opened[-1].closed and opened[-1].steps == list(range(1, step)), (exc, opened[-1].steps)

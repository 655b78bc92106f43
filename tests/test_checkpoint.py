"""Checkpoints (checkpoint.py) under the training loop: a changed byte or pickled code in a checkpoint is
refused, a kill at any point of a checkpoint write keeps the previous one (and the resume ends where an
uninterrupted run ends), a directory is a checkpoint only with both files, a full disk is one line."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flatdino_cli.checkpoint as checkpoint
import flatdino_cli.train as train
from flatdino_cli.checkpoint import checkpoint_dir, load_state
from flatdino_cli.config import TrainConfig
from flatdino_cli.errors import UserError
from flatdino_cli.runtime import CPU
from flatdino_cli.train import fit
from test_rundir import FIT_CFG, fit_task
from test_train import (ENV, Killed, TinyNet, assert_same, one_thread, store, tiny_task,  # noqa: F401 (fixtures)
                        write_preset)


# ----------------------------------------------------------------------------- integrity: a changed byte, pickled code
def test_flipped_byte_in_weights_is_refused_on_resume(tmp_path, store, cli):
    preset = write_preset(tmp_path / "tiny.yaml", epochs=1, ckpt_every_steps=4)
    args = ["train-vae", "--preset", preset, "--features", store, "--out", tmp_path / "run", "--device", "cpu"]
    cli(*args, env=ENV)
    weights = checkpoint_dir(tmp_path / "run") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = cli(*args, "--set", "train.epochs=2", env=ENV, check=False)
    assert r.returncode != 0 and "model.safetensors: its bytes changed since it was written" in r.stderr
    assert "Traceback" not in r.stderr


class Planted:
    """Unpickling this creates `path`: stands for any code a hostile state.pt would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_object_in_state_pt_is_refused(tmp_path):
    side = tmp_path / "planted"
    bad = tmp_path / "bad.pt"
    torch.save({"step": 1, "payload": Planted(side)}, bad)
    torch.load(bad, weights_only=False).clear()  # control: an unsafe load does run it
    assert side.exists()
    side.unlink()

    with pytest.raises(UserError, match="refused") as e:
        load_state(bad)
    assert "\n" not in str(e.value) and not side.exists()

    run = tmp_path / "run"
    cfg = TrainConfig(epochs=1, batch_size=4)
    fit(tiny_task(), cfg, run, CPU)
    state = run / "checkpoints" / "latest" / "state.pt"
    good = load_state(state)
    torch.save({**good, "payload": Planted(side)}, state)
    with pytest.raises(UserError, match="state.pt"):
        fit(tiny_task(), cfg, run, CPU)
    assert not side.exists()


# ----------------------------------------------------------------------------- a kill while checkpointing
@pytest.mark.parametrize("where", ["model.safetensors", "state.pt", "rename"])
def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch, where):
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, ckpt_every_steps=2, log_every=1)  # 8 steps, ckpt at 2,4,6,8
    run, first = tmp_path / "run", tmp_path / "first"
    saves = []
    real_save = train.save_checkpoint

    def save_checkpoint(*a, **k):
        saves.append(a[1])
        out = real_save(*a, **k)
        if len(saves) == 1:
            shutil.copytree(out, first)
        return out

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    if where == "model.safetensors":
        real_file = checkpoint.save_file

        def save_file(tensors, filename, *a, **k):
            if len(saves) == 2:
                Path(filename).write_bytes(b"\x08\x00\x00\x00")  # a torn file
                raise Killed
            return real_file(tensors, filename, *a, **k)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
    elif where == "state.pt":
        real_torch_save = torch.save

        def save(obj, f, *a, **k):
            if len(saves) == 2:
                Path(f).write_bytes(b"PK\x03\x04")
                raise Killed
            return real_torch_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:  # between `latest -> .old-latest` and `.tmp-latest -> latest`
        real_rename = Path.rename

        def rename(self, target):
            if len(saves) == 2 and self.name == ".tmp-latest":
                raise Killed
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)

    with pytest.raises(Killed):
        fit(tiny_task(), cfg, run, CPU)
    monkeypatch.undo()
    assert len(saves) == 2

    found = checkpoint_dir(run, "latest")
    assert found is not None and found.name == (".old-latest" if where == "rename" else "latest")
    for f in ("model.safetensors", "state.pt"):
        assert (found / f).read_bytes() == (first / f).read_bytes(), f
    assert set(load_file(found / "model.safetensors")) == set(TinyNet().state_dict())
    assert load_state(found / "state.pt")["step"] == 2

    # resuming from it finishes, leaves only latest/, and ends where an uninterrupted run ends
    assert fit(tiny_task(), cfg, run, CPU)["step"] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest"]
    fit(tiny_task(), cfg, tmp_path / "ref", CPU)
    for f in ("model.safetensors", "state.pt"):
        load = load_file if f.endswith("safetensors") else load_state
        assert_same(load(run / "checkpoints/latest" / f), load(tmp_path / "ref/checkpoints/latest" / f), f)


def test_checkpoint_dir_needs_both_files(tmp_path):
    d = tmp_path / "checkpoints" / "latest"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"")
    assert checkpoint_dir(tmp_path) is None  # no state.pt: not a checkpoint
    old = tmp_path / "checkpoints" / ".old-latest"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"")
    (old / "state.pt").write_bytes(b"")
    assert checkpoint_dir(tmp_path) == old


# ----------------------------------------------------------------------------- disk full
def test_disk_full_during_a_checkpoint_is_one_line_and_resumable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(fit_task(val=False), dataclasses.replace(FIT_CFG, epochs=1), run, CPU)  # latest at step 4
    real = checkpoint.save_file

    def full(tensors, filename, *a, **k):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(UserError, match=r"checkpoints/\.tmp-latest: disk full .*needs about .* MB free") as e:
        fit(fit_task(val=False), FIT_CFG, run, CPU)
    assert "\n" not in str(e.value)
    assert checkpoint_dir(run).name == "latest" and not (run / "checkpoints" / ".tmp-latest").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert fit(fit_task(val=False), FIT_CFG, run, CPU)["step"] == 8

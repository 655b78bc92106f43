"""The shared training loop (train.py): bitwise resume after SIGKILL, crash-safe checkpoints, DDP and
gradient accumulation, refusal of pickled code in state.pt, the NaN guard, LR schedules, best/ by
validation loss, metrics.jsonl across a resume, torch.compile on CPU, and train-vae's one-line errors.

Models are tiny (a 4-16-1 MLP in-process; a width-32, depth-1 laminator on a 136-row synthetic
feature store for the CLI runs): about a minute of CPU in all, most of it process start-up (the CLI
runs, torchrun, torch.compile).
"""

import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import flatdino_cli.checkpoint as checkpoint
import flatdino_cli.train as train
from flatdino_cli.checkpoint import checkpoint_dir, load_state
from flatdino_cli.config import TrainConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import Store
from flatdino_cli.errors import UserError
from flatdino_cli.preempt import PREEMPTED_EXIT
from flatdino_cli.models.vae import FlatVAE
from flatdino_cli.rundir import read_metrics
from flatdino_cli.runtime import CPU, setup_runtime
from flatdino_cli.stages.vae import train_vae
from flatdino_cli.train import Task, TrainingDiverged, fit, lr_at

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "_mean_latent_cli.py"
# one thread per process (the two cores are shared); the tree under test first on the path, also for a
# script run by torchrun (which puts the script's folder, not the cwd, on sys.path)
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
SPE = 16  # steps per epoch of the CLI runs: 136 rows - 8 held out = 128 train rows // batch 8


class Killed(BaseException):
    """Stands in for SIGKILL: a BaseException, so no `except Exception` in the loop can swallow it."""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a loaded machine run fastest (and reproducibly) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- tiny in-process task
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 1)
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)  # (n, 4)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())  # targets (n, 1)


def mse(net, batch, info):
    x, y = batch
    loss = F.mse_loss(net(x), y)
    return loss, {"mse": loss.item()}


def tiny_task(loss_fn=mse, n: int = 32, **kw) -> Task:
    torch.manual_seed(0)  # same init every time
    return Task(model=TinyNet(), train_set=tiny_data(n), loss_fn=loss_fn, config=TrainConfig(), **kw)


def assert_same(a, b, where: str = "state") -> None:
    """Recursive bitwise equality of (nested) checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of a run's metrics.jsonl."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val/loss" in r]


# ----------------------------------------------------------------------------- CLI fixtures
def synthetic_store(path: Path, n: int, identity: dict, seed: int = 0) -> Path:
    """A finished feature store of n random rows of (8 patches, 16 dims), labels i % 4."""
    s = Store.create(path, "features", (8, 16), n, "float32", identity, {},
                     [f"img{i}.png" for i in range(n)], [i % 4 for i in range(n)])
    s.write_rows(np.arange(n), np.random.default_rng(seed).standard_normal((n, 8, 16)).astype(np.float32))
    s.mark_done(np.arange(n))
    s.finalize()
    s.close()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """136 rows; train-vae holds 8 out for validation (val_count)."""
    return synthetic_store(tmp_path_factory.mktemp("feats") / "store", 136, {"encoder": "synthetic"})


def write_preset(path: Path, **train_cfg) -> Path:
    model = {"kind": "flat", "tokens": 4, "latent_dim": 8, "enc_width": 32, "enc_depth": 1, "enc_heads": 2,
             "dec_width": 32, "dec_depth": 1, "dec_heads": 2, "mlp_ratio": 2.0}
    train_cfg = {"epochs": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, **train_cfg}
    path.write_text(yaml.safe_dump({"stage": "vae", "model": model, "loss": {"loss": "huber"},
                                    "train": train_cfg, "val_count": 8}))
    return path


@pytest.fixture
def spawn(tmp_path):
    """Start a command in the background, output to a log file (a full pipe would stall it), with ENV
    plus `env`, in its own process group; every process still alive at teardown is killed, with its
    children (torchrun's workers). test_preempt.py uses it too."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list, log: str, env: dict | None = None) -> subprocess.Popen:
        with open(tmp_path / log, "w") as f:
            p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**ENV, **(env or {})}, start_new_session=True)
        p.log = tmp_path / log
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _cli(*args) -> list:
    return [sys.executable, "-m", "flatdino_cli.cli", *args]


# ----------------------------------------------------------------------------- 1. SIGKILL + resume
def test_sigkill_mid_epoch_then_resume_is_bitwise(tmp_path, store, spawn, cli):
    preset = write_preset(tmp_path / "tiny.yaml", epochs=2, ckpt_every_steps=2, ema=0.9, schedule="wsd",
                          warmup_epochs=1, warmup_start_lr=1e-5, decay_epochs=1, final_lr=1e-5)
    total = 2 * SPE

    def args(out: Path) -> list:
        return ["train-vae", "--preset", preset, "--features", store, "--out", out, "--device", "cpu", "--seed", "3"]

    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_p = spawn(_cli(*args(ref)), "ref.log")  # the uninterrupted run, alongside
    victim = spawn(_cli(*args(run)), "run.log")
    first = run / "checkpoints" / "latest" / "state.pt"  # appears complete: latest/ is made by a rename
    deadline = time.monotonic() + 300
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert first.exists(), f"no checkpoint appeared:\n{victim.log.read_text()[-2000:]}"
    assert victim.wait(60) == -signal.SIGKILL, f"the run ended before the kill:\n{victim.log.read_text()[-2000:]}"
    step = load_state(checkpoint_dir(run) / "state.pt")["step"]
    assert 0 < step < total and step % SPE, f"latest checkpoint at step {step}: not mid-epoch"

    resumed = cli(*args(run), env=ENV)
    assert f"from step {step}/{total}" in resumed.stdout
    assert ref_p.wait(600) == 0, ref_p.log.read_text()[-2000:]

    for which in ("latest", "best"):
        a, b = checkpoint_dir(run, which), checkpoint_dir(ref, which)
        assert a.name == b.name == which
        for f in ("model.safetensors", "ema.safetensors"):
            assert_same(load_file(a / f), load_file(b / f), f"{which}/{f}")
        assert_same(load_state(a / "state.pt"), load_state(b / "state.pt"), f"{which}/state.pt")  # optimizer too
    assert load_state(run / "checkpoints" / "latest" / "state.pt")["step"] == total

    # the log tells the same story, once per step (rows the killed process wrote past its checkpoint are gone)
    (tr_a, val_a), (tr_b, val_b) = metrics(run), metrics(ref)
    assert [r["step"] for r in tr_a] == list(range(1, total + 1))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in tr_a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in tr_b]
    assert val_a == val_b and [r["step"] for r in val_a] == [SPE, 2 * SPE]


def test_sigterm_saves_the_step_reached_then_resume_is_bitwise(tmp_path, store, spawn, cli):
    # no periodic checkpoint mid-run: whatever `latest` holds after the signal, the signal wrote
    preset = write_preset(tmp_path / "tiny.yaml", epochs=4, ckpt_every_steps=10_000, ema=0.9)
    total = 4 * SPE
    # signalled once the log shows step k: a random step of epoch 1, three epochs before the end (the
    # signal has seconds to land, however slowly this process is scheduled)
    k = random.Random().randint(2, SPE)

    def args(out: Path) -> list:
        return ["train-vae", "--preset", preset, "--features", store, "--out", out, "--device", "cpu", "--seed", "3"]

    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_p = spawn(_cli(*args(ref)), "ref.log")
    victim = spawn(_cli(*args(run)), "run.log")
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while victim.poll() is None and time.monotonic() < deadline and not (
            log.exists() and sum('"loss"' in ln for ln in log.read_text().splitlines()) >= k):
        time.sleep(0.005)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(120) == PREEMPTED_EXIT, victim.log.read_text()[-2000:]
    step = load_state(checkpoint_dir(run) / "state.pt")["step"]
    assert k <= step < total
    assert f"train-vae: preempted at step {step}, saved; rerun the same command to continue" in victim.log.read_text()

    resumed = cli(*args(run), env=ENV)
    assert f"from step {step}/{total}" in resumed.stdout
    assert ref_p.wait(600) == 0, ref_p.log.read_text()[-2000:]
    a, b = checkpoint_dir(run, "latest"), checkpoint_dir(ref, "latest")
    for f in ("model.safetensors", "ema.safetensors"):
        assert_same(load_file(a / f), load_file(b / f), f)
    assert_same(load_state(a / "state.pt"), load_state(b / "state.pt"), "state.pt")
    tr_a, tr_b = metrics(run)[0], metrics(ref)[0]
    assert [r["step"] for r in tr_a] == list(range(1, total + 1))  # no doubled rows
    assert [(r["loss"], r["lr"]) for r in tr_a] == [(r["loss"], r["lr"]) for r in tr_b]


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


# ----------------------------------------------------------------------------- 2. kill while checkpointing
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


# ----------------------------------------------------------------------------- 3. DDP and accumulation
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path, store, spawn, monkeypatch):
    # Adam's first step is lr * sign(grad), blind to a mis-scaled gradient; eps=1 makes it ~ lr * grad
    preset = write_preset(tmp_path / "tiny.yaml", lr=1.0, eps=1.0)
    ddp = spawn([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "--master-port", _free_port(), HELPER, "train-vae", "--preset", preset, "--features", store,
                 "--out", tmp_path / "ddp", "--device", "cpu", "--set", "train.max_steps=1"], "ddp.log")
    spec = importlib.util.spec_from_file_location("_mean_latent_cli", HELPER)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    monkeypatch.setattr(FlatVAE, "forward", helper.mean_latent_forward)  # z = mu, as the DDP ranks run
    train_vae(load_preset(str(preset), ["train.max_steps=1"]), tmp_path / "one", CPU, features=store)
    assert ddp.wait(600) == 0, ddp.log.read_text()[-3000:]

    a, b = tmp_path / "ddp/checkpoints/latest", tmp_path / "one/checkpoints/latest"
    sa, sb = load_state(a / "state.pt"), load_state(b / "state.pt")
    assert (sa["world_size"], sb["world_size"], sa["step"], sb["step"]) == (2, 1, 1, 1)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), (k, (wa[k] - wb[k]).abs().max())
    (ra,), _ = metrics(tmp_path / "ddp")
    (rb,), _ = metrics(tmp_path / "one")
    assert rb["grad_norm"] > 1e-3
    for key in ("loss", "grad_norm"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-5), key


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    base = dict(epochs=1, max_steps=2, batch_size=8, lr=1.0, eps=1.0, log_every=1)  # eps: see the DDP test
    accum, full = tiny_task(), tiny_task()
    before = {k: v.clone() for k, v in full.model.state_dict().items()}
    fit(accum, TrainConfig(**base, micro_batch_size=2), tmp_path / "accum", CPU)  # 4 micro-batches per step
    fit(full, TrainConfig(**base), tmp_path / "full", CPU)
    sa, sf = accum.model.state_dict(), full.model.state_dict()
    assert max((sf[k] - before[k]).abs().max().item() for k in sf) > 1e-2  # the steps did move the weights
    for k in sa:
        assert torch.allclose(sa[k], sf[k], rtol=0, atol=1e-5), k
    for ra, rf in zip(*(metrics(tmp_path / d)[0] for d in ("accum", "full")), strict=True):
        assert ra["step"] == rf["step"]
        assert ra["loss"] == pytest.approx(rf["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rf["grad_norm"], rel=1e-5)


# ----------------------------------------------------------------------------- 4. pickled code in state.pt
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


# ----------------------------------------------------------------------------- 5. NaN guard
def test_nan_loss_stops_at_its_step_and_keeps_last_good_checkpoint(tmp_path):
    bad_step = 5  # 1-based, as the message counts

    def loss_fn(net, batch, info):
        loss, m = mse(net, batch, info)
        return (loss * float("nan") if info.step + 1 == bad_step else loss), m

    task = tiny_task(loss_fn)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        fit(task, TrainConfig(epochs=1, batch_size=4, lr=1e-2, ckpt_every_steps=2, log_every=1), run, CPU)
    msg = str(e.value)
    assert re.search(rf"\bstep {bad_step}\b", msg) and "\n" not in msg, msg
    last = checkpoint_dir(run)
    assert str(last) in msg
    assert load_state(last / "state.pt")["step"] == bad_step - 1
    saved = load_file(last / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert_same(saved, dict(task.model.state_dict()), "the NaN gradient was never applied")
    assert [r["step"] for r in metrics(run)[0]] == list(range(1, bad_step))


# ----------------------------------------------------------------------------- 6. schedules
def test_lr_wsd_linear_and_cosine():
    spe, total = 10, 100  # warmup 20 steps, decay over the last 30 (steps 70..99)
    cfg = TrainConfig(lr=1.0, warmup_start_lr=0.1, warmup_epochs=2, schedule="wsd", decay_epochs=3, final_lr=0.01)
    lin = {0: 0.1, 10: 0.55, 20: 1.0, 50: 1.0, 69: 1.0, 70: 1 - 0.99 / 30, 84: 0.505, 99: 0.01}
    for step, want in lin.items():
        assert lr_at(step, total, spe, cfg) == pytest.approx(want, abs=1e-12), step
    cos = dataclasses.replace(cfg, decay_shape="cosine")
    # frac = 10/30 at step 79: 1 - 0.99 * (1 - cos(pi / 3)) / 2
    for step, want in {20: 1.0, 69: 1.0, 79: 1 - 0.99 * 0.25, 84: 0.505, 99: 0.01}.items():
        assert lr_at(step, total, spe, cos) == pytest.approx(want, abs=1e-12), step


def test_lr_constant_with_warmup_and_cosine():
    const = TrainConfig(lr=2.0, warmup_epochs=1, schedule="constant")
    for step, want in {0: 0.0, 5: 1.0, 10: 2.0, 99: 2.0}.items():
        assert lr_at(step, 100, 10, const) == pytest.approx(want, abs=1e-12), step
    cos = TrainConfig(lr=1.0, warmup_epochs=2, warmup_start_lr=0.0, schedule="cosine", final_lr=0.01)
    total = 101  # cosine over steps 20..100
    want = {0: 0.0, 10: 0.5, 20: 1.0, 40: 0.01 + 0.495 * (1 + math.cos(math.pi / 4)), 60: 0.505, 100: 0.01}
    for step, w in want.items():
        assert lr_at(step, total, 10, cos) == pytest.approx(w, abs=1e-12), step
    lrs = [lr_at(s, total, 10, cos) for s in range(20, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, 5, 10, TrainConfig(lr=1.0, schedule="cosine")) == 1.0  # no warmup: starts at lr


# ----------------------------------------------------------------------------- 7. validation, best/, metrics
def test_best_checkpoint_and_metrics_across_a_resume(tmp_path):
    # 16 items / batch 4 = 4 steps per epoch, 5 epochs; val loss per epoch falls then rises: best is epoch 2,
    # written before the interruption, so a resume that forgot best_val would overwrite it at epoch 3
    val_loss = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 3.0}
    cfg = TrainConfig(epochs=5, batch_size=4, lr=1e-2, ckpt_every_steps=3, log_every=1, schedule="wsd",
                      warmup_epochs=1, warmup_start_lr=1e-3, decay_epochs=1, final_lr=1e-4)
    run, now, seen = tmp_path / "run", {"step": 0}, {}

    def on_step(step, model, ema):
        now["step"] = step
        if step == 11 and not seen.get("killed"):  # logged step 11; last checkpoint at step 9
            seen["killed"] = True
            raise Killed

    def val_fn(model, batches, rt):
        assert not model.training
        n = sum(len(x) for x, _ in batches)
        epoch = now["step"] // 4
        seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"loss": val_loss[epoch], "items": n}

    def task():
        return tiny_task(n=16, val_set=tiny_data(6, seed=1), val_fn=val_fn, on_step=on_step)

    with pytest.raises(Killed):
        fit(task(), cfg, run, CPU)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 0.')  # a row torn by the kill
    summary = fit(task(), cfg, run, CPU)
    assert summary["step"] == 20 and summary["best_val"] == 1.0

    best = checkpoint_dir(run, "best")
    assert best.name == "best" and load_state(best / "state.pt")["step"] == 8
    weights = load_file(best / "model.safetensors")
    assert_same(weights, seen[2], "best/ = epoch 2")
    assert not torch.equal(weights["fc1.weight"], seen[3]["fc1.weight"])

    train_rows, val_rows = metrics(run)
    assert [r["step"] for r in train_rows] == list(range(1, 21))  # none twice, none missing
    for r in train_rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "mse"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in ("loss", "lr", "grad_norm")) and r["samples_per_s"] > 0
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 20, 4, cfg), abs=1e-15)
    assert train_rows[-1]["lr"] == pytest.approx(1e-4)
    assert [(r["step"], r["val/loss"], r["val/items"]) for r in val_rows] == [
        (4 * e, val_loss[e], 6) for e in range(1, 6)]


def test_quality_evaluations_at_their_cadence_across_a_kill(tmp_path):
    # 32 items / batch 4 = 8 steps per epoch, 3 epochs; an evaluation every 3 steps; checkpoints at 5, 8,
    # 10, 15, 16, 20, 24. The kill at step 14 comes after the evaluation of step 12 was logged but before a
    # checkpoint held it: the resume from step 10 drops that row and evaluates step 12 again (no repeat),
    # and keeps those of steps 3, 6, 9 (no skip)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, ckpt_every_steps=5, log_every=1, ema=0.9)
    calls = []

    def evaluate(net):  # a stand-in metric that follows the weights it is given (the EMA model)
        calls.append(sum(p.double().sum().item() for p in net.parameters()))
        return {"fd_rep": calls[-1], "fd_rep_nocfg": 2 * calls[-1]}

    def task(kill_at=None):
        def on_step(step, model, ema):
            if step == kill_at:
                raise Killed
        return tiny_task(n=32, on_step=on_step, evaluate=evaluate, eval_period=lambda total, spe: 3)

    def quality(run):
        return [(r["step"], r["fd_rep"], r["fd_rep_nocfg"]) for r in read_metrics(run) if "fd_rep" in r]

    fit(task(), cfg, tmp_path / "ref", CPU)
    ref = quality(tmp_path / "ref")
    assert [s for s, _, _ in ref] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert ref[0][1] != ref[-1][1]  # the metric sees the weights move
    with pytest.raises(Killed):
        fit(task(kill_at=14), cfg, tmp_path / "run", CPU)
    assert [s for s, _, _ in quality(tmp_path / "run")] == [3, 6, 9, 12]
    calls.clear()
    fit(task(), cfg, tmp_path / "run", CPU)
    assert len(calls) == 5  # steps 12, 15, 18, 21, 24
    assert quality(tmp_path / "run") == ref  # one row per evaluation, the same values (bitwise resume)
    rows = read_metrics(tmp_path / "run")
    assert all(r["eval_seconds"] >= 0 for r in rows if "fd_rep" in r)


def test_resume_with_other_global_batch_is_refused_other_micro_batch_continues(tmp_path, capsys):
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, ckpt_every_steps=2, log_every=1, schedule="constant")
    run = tmp_path / "run"
    fit(tiny_task(n=16), dataclasses.replace(cfg, epochs=1), run, CPU)  # 2 steps, checkpoint at step 2
    with pytest.raises(UserError, match=r"train.batch_size=8, not 4.*--no-resume"):
        fit(tiny_task(n=16), dataclasses.replace(cfg, batch_size=4), run, CPU)
    summary = fit(tiny_task(n=16), dataclasses.replace(cfg, micro_batch_size=4), run, CPU)
    assert summary["step"] == 4 and "micro-batch 4 (was 1 x 8)" in capsys.readouterr().out
    assert load_state(checkpoint_dir(run) / "state.pt")["micro_batch_size"] == 4


# ----------------------------------------------------------------------------- 8. torch.compile
def test_torch_compile_fit_on_cpu(tmp_path):
    rt = setup_runtime(device="cpu", precision="fp32", compile=True)
    assert rt.compile and rt.device.type == "cpu"
    torch.manual_seed(0)
    task = Task(model=nn.Linear(4, 1), train_set=tiny_data(16), loss_fn=mse, config=TrainConfig())
    try:
        out = fit(task, TrainConfig(epochs=1, batch_size=4, lr=1e-2, log_every=1), tmp_path / "run", rt)
    finally:
        torch._dynamo.reset()
    assert out["step"] == 4
    rows = metrics(tmp_path / "run")[0]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    saved = load_file(tmp_path / "run/checkpoints/latest/model.safetensors")
    assert set(saved) == {"weight", "bias"}  # the plain module's keys, not the compiled wrapper's
    assert torch.equal(saved["weight"], task.model.weight.detach())


# ----------------------------------------------------------------------------- 9. CLI errors
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

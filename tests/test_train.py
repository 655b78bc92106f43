"""The shared training loop (train.py): DDP and gradient accumulation, the NaN guard, LR schedules,
weight-decay groups, torch.compile on CPU; and the helpers the other training tests share (a tiny
in-process task, a synthetic feature store, a tiny train-vae preset, background processes).
Resume: test_train_resume.py; checkpoints: test_checkpoint.py; train-vae itself: test_train_vae.py.

Models are tiny (a 4-16-1 MLP in-process; a width-32, depth-1 laminator on a 136-row synthetic
feature store for the CLI runs): most of the time is process start-up (torchrun, torch.compile).
"""
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from flatdino_cli.checkpoint import checkpoint_dir, load_state
from flatdino_cli.config import TrainConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import Store
from flatdino_cli.models import build_model
from flatdino_cli.models.vae import FlatVAE
from flatdino_cli.runtime import CPU, setup_runtime
from flatdino_cli.stages.vae import train_vae
from flatdino_cli.steps import lr_at, param_groups
from flatdino_cli.train import Task, TrainingDiverged, fit

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


def encoder_store(path: Path, encoder: str, n: int = 40, seed: int = 0) -> Path:
    """n rows made by `encoder` (its identity names encoder and weights)."""
    return synthetic_store(path, n, {"encoder": encoder, "weights": "w-" + encoder}, seed)


def short_preset(path: Path, **train_cfg) -> Path:
    """write_preset, one epoch unless told otherwise."""
    return write_preset(path, **{"epochs": 1, **train_cfg})


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


# ----------------------------------------------------------------------------- DDP and accumulation
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


# ----------------------------------------------------------------------------- NaN guard
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


# ----------------------------------------------------------------------------- schedules
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


# ----------------------------------------------------------------------------- torch.compile
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


# ----------------------------------------------------------------------------- weight decay groups
def _decayed(model, cfg) -> set[str]:
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.decay_2d_only)
    ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_skips_query_tokens_and_position_tables():
    cfg = load_preset("tiny-vae", ["model.enc_depth=1", "model.dec_depth=1"])
    vae = build_model(cfg)
    decayed = _decayed(vae, cfg)
    # the authors decay 2-D weight matrices only: the (1, T, W) tables are not weight matrices
    for table in ("encoder.queries", "decoder.queries", "decoder.pos"):
        assert table not in decayed
    assert "encoder.out_proj.weight" in decayed and "decoder.in_proj.weight" in decayed
    assert not any(n.endswith(".bias") for n in decayed)
    # a DiT with a learned table under the 2-D rule: the table is not decayed either
    dit_cfg = load_preset("tiny-dit", ["model.pos_embed=learned", "train.decay_2d_only=true",
                                       "train.weight_decay=1e-4"])
    dit = build_model(dit_cfg)
    assert "pos_embed" not in _decayed(dit, dit_cfg) and "x_embedder.weight" in _decayed(dit, dit_cfg)

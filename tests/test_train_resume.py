"""Resuming the training loop (train.py): after a SIGKILL mid-epoch the rerun is bitwise the
uninterrupted run (weights, EMA, optimizer, metrics rows); best/ and metrics.jsonl survive a kill, the
quality evaluations keep their cadence (none repeated, none skipped), and a resume with another global
batch is refused while another micro-batch continues."""

import dataclasses
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flatdino_cli.checkpoint import checkpoint_dir, load_state
from flatdino_cli.config import TrainConfig
from flatdino_cli.errors import UserError
from flatdino_cli.rundir import read_metrics
from flatdino_cli.runtime import CPU
from flatdino_cli.steps import lr_at
from flatdino_cli.train import fit
from test_train import (ENV, SPE, Killed, _cli, assert_same, metrics, one_thread, spawn, store,  # noqa: F401 (fixtures)
                        tiny_data, tiny_task, write_preset)


# ----------------------------------------------------------------------------- SIGKILL + resume
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


# ----------------------------------------------------------------------------- what a resume keeps
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

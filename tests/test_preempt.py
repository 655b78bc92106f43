"""Preemption with real processes: a stop signal at a random step of train-vae (SIGTERM: the step
reached is saved), of train-dit under 2-process gloo torchrun (SIGUSR1 to rank 1 only, or SIGTERM to
torchrun) and of train-decoder with its discriminator and loader workers (SIGTERM to the process
group), then the rerun is bitwise equal to an uninterrupted run with one metrics row per step; a
signal inside a checkpoint write (SIGTERM: the write finishes, the run stops a step later; SIGKILL at
the end of the grace period: the previous checkpoint is intact); a flipped bit in
model.safetensors refused by `sample`; extract stopped by SIGTERM (to its process group, loader
workers included) or Ctrl-C keeps its finished chunks, says how many, and the rerun ends
byte-identical; sample and fid's feature cache stopped mid-way keep the batches done. `--help` of
the long commands names exit code 75.

The tests synchronise on what the processes write (metrics rows, store chunks) or on a signal sent
at a fixed point of the code, never on how fast they run; timeouts are generous. About 2.5 minutes
on two shared cores, mostly the torchrun and decoder runs.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from flatdino_cli.checkpoint import CHECKSUMS, checkpoint_dir, load_state, verify_checkpoint
from flatdino_cli.data import Store
from flatdino_cli.errors import UserError
from flatdino_cli import preempt
from flatdino_cli.preempt import PREEMPTED_EXIT
from test_dit import write_latents
from test_fid import Counting, data, ext, net, write_npz  # noqa: F401  (a random-weight Inception)
from test_sample import w  # noqa: F401  (tiny VAE / DiT / decoder run dirs)
from test_train import ENV, ROOT, SPE, _cli, _free_port, assert_same, metrics, spawn, store, write_preset  # noqa: F401

WAIT = 300  # s: the most a test waits for a process to reach a point it synchronises on


def wait_for(proc, ready, what: str) -> None:
    """Poll `ready()` until it holds; fails if `proc` ended first or WAIT seconds passed."""
    deadline = time.monotonic() + WAIT
    while not ready():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {what}:\n{proc.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT} s:\n{proc.log.read_text()[-3000:]}"
        time.sleep(0.005)


def train_rows(run: Path) -> int:
    """Training rows in metrics.jsonl (log_every=1: the steps done), a torn last line not counted."""
    log = run / "metrics.jsonl"
    if not log.is_file():
        return 0
    return sum(ln.endswith("}") and '"loss"' in ln for ln in log.read_text().splitlines())


def same_run(a: Path, b: Path, files=("model.safetensors", "ema.safetensors")) -> None:
    """latest/ of two runs bitwise equal (weights, EMA, optimizer, aux state), and their training logs."""
    ca, cb = checkpoint_dir(a), checkpoint_dir(b)
    for f in files:
        assert_same(load_file(ca / f), load_file(cb / f), f)
    assert_same(load_state(ca / "state.pt"), load_state(cb / "state.pt"), "state.pt")
    (tr_a, val_a), (tr_b, val_b) = metrics(a), metrics(b)
    assert [r["step"] for r in tr_a] == [r["step"] for r in tr_b] == list(range(1, len(tr_b) + 1))  # none doubled
    def timeless(rows):  # all but the throughput
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]

    assert timeless(tr_a) == timeless(tr_b) and val_a == val_b


def children(pid: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun workers started by process `pid` (read from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or not ours
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = int(d.name)
    return out


# ----------------------------------------------------------------------------- train-vae: SIGTERM
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


# ----------------------------------------------------------------------------- train-dit under torchrun
DIT_SETS = ["model.tokens=4", "model.in_dim=8", "model.width=32", "model.depth=1", "model.heads=2",
            "model.mlp_hidden=64", "model.num_classes=4", "train.batch_size=8", "train.epochs=20",
            "train.log_every=1", "train.ckpt_every_steps=100000", "train.num_workers=0"]
DIT_TOTAL = 20 * 64 // 8  # 64 latent rows / batch 8 = 8 steps per epoch, 20 epochs


@pytest.mark.parametrize("target", ["rank 1", "torchrun"])
def test_stop_signal_under_torchrun_train_dit_then_resume_is_bitwise(tmp_path, spawn, target):
    """SIGUSR1 (SLURM's `--signal=USR1@120`) to one rank, not rank 0, which saves: it learns of the stop
    from the step's all-reduce; or SIGTERM to torchrun itself (Kubernetes signals the container's first
    process), which forwards it to both."""
    latents = write_latents(tmp_path / "latents", np.random.default_rng(0).standard_normal((64, 4, 8)),
                            [i % 4 for i in range(64)])

    def cmd(out: Path) -> list:
        sets = [a for s in DIT_SETS for a in ("--set", s)]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                _free_port(), "-m", "flatdino_cli.cli", "train-dit", "--preset", "tiny-dit", "--latents", latents,
                "--out", out, *sets, "--device", "cpu", "--seed", "5"]

    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_p = spawn(cmd(ref), "ref.log")  # the uninterrupted run, alongside
    victim = spawn(cmd(run), "run.log")
    k = random.Random().randint(2, DIT_TOTAL // 10)  # a random step, long before the end
    wait_for(victim, lambda: train_rows(run) >= k, f"step {k}")
    ranks = children(victim.pid)
    assert sorted(ranks) == [0, 1], ranks
    if target == "rank 1":
        os.kill(ranks[1], signal.SIGUSR1)
    else:
        os.kill(victim.pid, signal.SIGTERM)
    victim.wait(WAIT)
    out = victim.log.read_text()
    step = load_state(checkpoint_dir(run) / "state.pt")["step"]
    assert k <= step < DIT_TOTAL, out[-3000:]
    assert out.count(f"train-dit: preempted at step {step}, saved; rerun the same command to continue") == 1, out
    if target == "rank 1":  # torchrun's report of its workers (signalled itself, it reports the signal instead)
        assert "exitcode  : 75" in out, out[-3000:]
    assert train_rows(run) == step

    resumed = spawn(cmd(run), "resumed.log")
    assert resumed.wait(WAIT) == 0, resumed.log.read_text()[-3000:]
    assert f"from step {step}/{DIT_TOTAL}" in resumed.log.read_text()
    assert ref_p.wait(WAIT) == 0, ref_p.log.read_text()[-3000:]
    same_run(run, ref)


# ----------------------------------------------------------------------------- train-decoder with its GAN
DEC_SETS = ["model.width=32", "model.depth=1", "model.heads=2", "model.mlp_hidden=64", "loss.gan=0.5",
            "loss.disc_start_epoch=0", "loss.gan_start_epoch=0", "train.batch_size=4", "train.epochs=4",
            "train.log_every=1", "train.ckpt_every_steps=100000", "train.num_workers=2"]


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory) -> Path:
    from flatdino_cli.toydata import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, per_class=4, progress=False)  # 48 images: 44 train, 4 val
    return root


def test_sigterm_during_train_decoder_with_discriminator_then_resume_is_bitwise(tmp_path, spawn, toy_images):
    """SIGTERM to the process group, as SLURM signals every process of a job step: the two loader workers
    get it too (torch's own SIGTERM handler would end them) and must leave the stop to the main process."""
    def args(out: Path) -> list:
        sets = [a for s in DEC_SETS for a in ("--set", s)]
        return ["train-decoder", "--preset", "tiny-decoder", "--images", toy_images, "--encoder", "tiny", "--no-lpips",
                "--out", out, *sets, "--device", "cpu", "--seed", "2"]

    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_p = spawn(_cli(*args(ref)), "ref.log")
    victim = spawn(_cli(*args(run)), "run.log")
    total = 4 * (44 // 4)  # 44 training images / batch 4, 4 epochs
    k = random.Random().randint(2, total // 4)
    wait_for(victim, lambda: train_rows(run) >= k, f"step {k}")
    os.killpg(victim.pid, signal.SIGTERM)
    assert victim.wait(WAIT) == PREEMPTED_EXIT, victim.log.read_text()[-3000:]
    state = load_state(checkpoint_dir(run) / "state.pt")
    step = state["step"]
    assert k <= step < total
    assert state["aux"]["disc_opt"]["state"][0]["step"] == step  # the discriminator saved at the same step
    assert f"train-decoder: preempted at step {step}, saved; rerun" in victim.log.read_text()

    resumed = spawn(_cli(*args(run)), "resumed.log")
    assert resumed.wait(WAIT) == 0, resumed.log.read_text()[-3000:]
    assert f"from step {step}/{total}" in resumed.log.read_text()
    assert ref_p.wait(WAIT) == 0, ref_p.log.read_text()[-3000:]
    same_run(run, ref, files=("model.safetensors",))  # ema 0 in tiny-decoder: no EMA file


# ----------------------------------------------------------------------------- a signal inside a checkpoint write
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_signal_inside_a_checkpoint_write(tmp_path, store, spawn, cli, sig):  # noqa: F811
    """_signal_in_save_cli.py makes the process send itself the signal in the middle of the first
    checkpoint write that replaces an existing one (the step-4 save here, after its weights, before its
    state.pt): the same moment on any machine. SIGTERM: the write finishes and the run stops after the
    next step. SIGKILL (a grace period too short): the step-2 checkpoint is left whole."""
    preset = write_preset(tmp_path / "tiny.yaml", epochs=1, ckpt_every_steps=2)  # saves at steps 2, 4, ...

    def args(out: Path) -> list:
        return ["train-vae", "--preset", preset, "--features", store, "--out", out, "--device", "cpu", "--seed", "3"]

    run = tmp_path / "run"
    p = spawn([sys.executable, Path(__file__).parent / "_signal_in_save_cli.py", *args(run)], "run.log",
              {"SIGNAL_IN_SAVE": sig})
    code = p.wait(WAIT)
    latest = checkpoint_dir(run)
    if sig == "SIGTERM":
        assert code == PREEMPTED_EXIT, p.log.read_text()[-3000:]
        assert latest.name == "latest" and load_state(latest / "state.pt")["step"] == 5
        assert "train-vae: preempted at step 5, saved" in p.log.read_text()
    else:
        assert code == -signal.SIGKILL, p.log.read_text()[-3000:]
        assert load_state(latest / "state.pt")["step"] == 2
    verify_checkpoint(latest)  # its files are the bytes its checksums.json recorded
    assert set(json.loads((latest / CHECKSUMS).read_text())) == {"model.safetensors", "state.pt"}
    assert train_rows(run) >= load_state(latest / "state.pt")["step"]
    cli(*args(run), env=ENV)
    cli(*args(tmp_path / "ref"), env=ENV)
    same_run(run, tmp_path / "ref", files=("model.safetensors",))


# ----------------------------------------------------------------------------- a flipped byte, on sample
@pytest.mark.parametrize("which", ["dit", "vae"])
def test_flipped_byte_in_model_safetensors_is_refused_on_sample(w, tmp_path, cli, which):  # noqa: F811
    runs = {k: tmp_path / k for k in ("dit", "vae", "dec")}
    for k, dest in runs.items():
        shutil.copytree(w[k], dest)
    inputs = runs["dit"] / "inputs.json"  # the copied DiT names the copied VAE as the one it was trained with
    inputs.write_text(inputs.read_text().replace(str(w["vae"].resolve()), str(runs["vae"].resolve())))
    args = ["sample", "--dit", runs["dit"], "--vae", runs["vae"], "--decoder", runs["dec"], "--no-ema",
            "--class", "1", "-n", "2", "--device", "cpu"]
    cli(*args, "--out", tmp_path / "good", env=ENV)  # control: the copies sample
    weights = runs[which] / "checkpoints" / "latest" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside a tensor: still a readable safetensors file
    weights.write_bytes(bytes(data))
    r = cli(*args, "--out", tmp_path / "bad", env=ENV, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"flatdino: error: {weights}: its bytes changed since it was written"), lines
    assert not list((tmp_path / "bad").glob("images/*.png"))


# ----------------------------------------------------------------------------- extract
@pytest.fixture(scope="module")
def toy_480(tmp_path_factory) -> Path:
    """480 toy images and their tiny-encoder store, extracted without interruption (the reference)."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("toy480")
    run_cli("toy-data", root / "toy", "--per-class", "40")
    run_cli("extract", root / "toy", root / "ref", "--encoder", "tiny", "--batch-size", "2", env=ENV)
    return root


@pytest.mark.parametrize("sig, workers", [("SIGTERM", 2), ("SIGINT", 0)])
def test_extract_stopped_keeps_its_chunks_says_how_many_and_the_rerun_is_identical(tmp_path, spawn, cli, toy_480,
                                                                                   sig, workers):
    """The signal goes to the whole process group, as SLURM's does (and Ctrl-C's): the loader's workers
    get it too and must leave the stop to the main process."""
    out = tmp_path / "feats"
    args = ["extract", toy_480 / "toy", out, "--encoder", "tiny", "--batch-size", "2", "--workers", str(workers)]
    victim = spawn(_cli(*args), "extract.log")
    k = random.Random().randint(4, 24)  # rows; 456+ still to go when the signal is sent

    def rows_done() -> int:
        try:
            return int((np.load(out / "done.npy", mmap_mode="r") != 0).sum())
        except (OSError, ValueError):  # not made yet
            return 0

    wait_for(victim, lambda: rows_done() >= k, f"{k} rows")
    os.killpg(victim.pid, getattr(signal, sig))
    code = victim.wait(WAIT)
    log = victim.log.read_text()
    line = [ln for ln in log.replace("\r", "\n").splitlines() if ln.startswith("extract: ")]
    assert len(line) == 1 and "Traceback" not in log, log[-3000:]
    how, expect = ("preempted", PREEMPTED_EXIT) if sig == "SIGTERM" else ("interrupted", 130)
    m = re.fullmatch(rf"extract: {how} after ([\d,]+) of 480 images in {re.escape(str(out))}, saved; rerun the "
                     "same command to continue", line[0])
    assert code == expect and m, (code, line)
    said, done = int(m[1].replace(",", "")), rows_done()
    assert k <= done < 480
    # SIGTERM stops after the chunk in flight is on disk; Ctrl-C stops at once, the chunk it cut short not
    # counted (and not flagged, so it is made again)
    assert said == done if sig == "SIGTERM" else said <= done <= said + 2, (said, done)
    with pytest.raises(UserError, match="incomplete store"):  # nothing half-made is read as finished
        Store.open(out)

    cli(*args, env=ENV)
    for f in ("data.npy", "done.npy", "labels.npy", "paths.txt", "manifest.json"):
        assert (out / f).read_bytes() == (toy_480 / "ref" / f).read_bytes(), f


def test_training_help_documents_the_preemption_exit_code(cli):
    for command in ("train-vae", "train-dit", "train-decoder", "extract", "sample"):
        text = " ".join(cli(command, "--help").stdout.split())  # Typer wraps the lines
        assert f"code {PREEMPTED_EXIT}" in text and "SIGTERM / SIGUSR1" in text, command


# ----------------------------------------------------------------------------- fid's feature cache
def test_fid_features_stopped_by_sigterm_keep_the_batches_done(data, ext, tmp_path):  # noqa: F811
    """In-process (the handlers of a command installed around it): the signal comes during the third batch
    of 4, in the second chunk of 8; that chunk is saved short (4 images) and the rerun computes only
    the last 4."""
    from flatdino_cli.analysis.fid import open_source, source_summary

    src = open_source(write_npz(tmp_path / "s.npz", data["images"][:16]), "S")

    class Signalled(Counting):
        def __call__(self, images):
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(images)

    with preempt.handle_signals(), pytest.raises(preempt.Preempted) as e:
        source_summary(src, Signalled(ext), batch_size=4, chunk=8, progress=False)
    assert e.value.message == (f"fid: preempted after 12 of 16 images of {src.path}, saved; rerun the same "
                               "command to continue")
    assert sorted(p.name for p in tmp_path.glob("*.partial/chunk-*.npz")) == ["chunk-000000000.npz",
                                                                            "chunk-000000008.npz"]
    resumed = Counting(ext)
    s = source_summary(src, resumed, batch_size=4, chunk=8, progress=False)
    assert resumed.images == 4 and not list(tmp_path.glob("*.partial"))
    whole = source_summary(open_source(data["x"], "R"), ext, progress=False).pool[:16]  # one uninterrupted pass
    np.testing.assert_allclose(s.pool, whole, rtol=1e-4, atol=1e-5)  # other batch sizes: other float32 sums


# ----------------------------------------------------------------------------- sample
def test_sample_stopped_by_sigterm_keeps_its_images_says_how_many_and_resumes(w, tmp_path, cli, monkeypatch):  # noqa: F811
    """In-process through the CLI's command wrapper (its handlers installed): the signal arrives while the
    3rd batch is generated (the first of shard 2); that batch's PNGs are written, then the run stops."""
    import flatdino_cli.sample as S

    def args(out: Path) -> list:
        return ["sample", "--dit", w["dit"], "--vae", w["vae"], "--decoder", w["dec"], "--out", out, "--device", "cpu",
                "--classes", "all", "--per-class", "6", "--shard-size", "9", "--batch-size", "1"]  # batches of 8 on CPU

    cli(*args(tmp_path / "ref"), env=ENV)
    real, calls = S.generate, []

    def signalled(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(S, "generate", signalled)
    out = tmp_path / "run"
    r = cli(*args(out), env=ENV, check=False)
    assert r.returncode == PREEMPTED_EXIT and calls == [8, 1, 8], (r.returncode, calls, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == ("sample: preempted after 17 of 18 images, saved; rerun the same "
                                                 "command to continue")
    assert len(list((out / "images").glob("*.png"))) == 17 and not list(out.glob("samples_*.npz"))
    assert not json.loads((out / "samples.json").read_text())["complete"]

    calls.clear()
    cli(*args(out), env=ENV)
    assert calls == [1]  # only the image not yet made
    for f in ("samples_18x48x48x3.npz", "grid.png"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f

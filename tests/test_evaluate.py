"""fd_rep (evaluate.py): reference statistics cached with their store's identity and refused for another;
train-dit's evaluations at their cadence, drawn by `plot` on the FLOPs axis; evaluate_dit on tiny random
runs, flat and RAE-mode."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import (FD_REP, FD_REP_NOCFG, REFERENCE_FILE, eval_every_steps, evaluate_dit, fd_rep,
                                   reference_stats, rep_vectors)
from flatdino_cli.pipeline.load import load_pipeline
from flatdino_cli.rundir import read_metrics

from conftest import ROOT, run_cli
from test_sample import w  # noqa: F401 (fixture: tiny VAE / DiT / decoder run dirs)


def test_reference_is_cached_and_refused_for_another_store(toy_features, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(toy_features / "val", val)
    ref = reference_stats(val)
    assert (val / REFERENCE_FILE).is_file()
    again = reference_stats(val)  # read back from the cache
    np.testing.assert_array_equal(again.gaussian.mu, ref.gaussian.mu)
    # the reference's own rows are at distance ~0 from it; shuffled grids are not
    data = np.load(val / "data.npy").astype(np.float32)
    own = rep_vectors(data, ref.pca_mean, ref.pca_basis)
    assert abs(fd_rep(own, ref)) < 1e-6
    shuffled = data[:, np.random.default_rng(0).permutation(data.shape[1])]
    assert fd_rep(rep_vectors(shuffled, ref.pca_mean, ref.pca_basis), ref) > 1e-3
    other = tmp_path / "train"
    shutil.copytree(toy_features, other, ignore=shutil.ignore_patterns("val"))
    shutil.copy(val / REFERENCE_FILE, other / REFERENCE_FILE)  # a cache made for the val store
    with pytest.raises(UserError) as e:
        reference_stats(other)
    assert "another store" in str(e.value) and "\n" not in str(e.value)


def test_eval_cadence_defaults_to_about_count_evaluations():
    assert eval_every_steps(-1, "steps", 20, 1000, 50) == 50  # 20 evaluations
    assert eval_every_steps(-1, "steps", 20, 30, 10) == 2  # 15 (every 2 steps) + none extra: never more than 20
    assert eval_every_steps(0, "steps", 20, 1000, 50) == 0  # off
    assert eval_every_steps(3, "epochs", 20, 1000, 50) == 150
    assert eval_every_steps(7, "steps", 20, 1000, 50) == 7


def test_train_dit_logs_fd_rep_eval_gives_it_again_and_plot_draws_it_on_flops(dit_run, toy_features, tmp_path, cli,
                                                                              monkeypatch):
    out, r = dit_run
    rows = [row for row in read_metrics(out) if FD_REP in row]
    assert [row["step"] for row in rows] == [3, 6]
    for row in rows:
        assert math.isfinite(row[FD_REP]) and row[FD_REP] > 0 and math.isfinite(row[FD_REP_NOCFG])
        assert row["eval_samples"] == 24
    assert rows[0][FD_REP] != rows[1][FD_REP]
    assert f"step 3: {FD_REP}" in r.stdout + r.stderr
    inputs = json.loads((out / "inputs.json").read_text())
    assert inputs["eval_reference"]["store"] == str((toy_features / "val").resolve())

    # after the fact: the kept checkpoints and latest, the same numbers as in training (same samples)
    e = cli("eval", out, "--samples", "24", "--device", "cpu", "--batch-size", "256", "--out", tmp_path / "eval.json")
    got = json.loads((tmp_path / "eval.json").read_text())
    assert [(g["checkpoint"], g["step"]) for g in got] == [("step-0000003", 3), ("step-0000006", 6), ("latest", 6)]
    for g, want in zip(got, [rows[0], rows[1], rows[1]]):
        assert g[FD_REP] == pytest.approx(want[FD_REP], rel=1e-6)
        assert g[FD_REP_NOCFG] == pytest.approx(want[FD_REP_NOCFG], rel=1e-6)
    assert "step-0000003 (step 3): fd_rep" in e.stdout
    monkeypatch.setattr("flatdino_cli.evaluate.evaluate_dit", lambda *a, **k: pytest.fail("recomputed"))
    again = cli("eval", out, "--samples", "24", "--device", "cpu", "--out", tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == got and "latest" in again.stdout

    info = cli("info", out).stdout
    assert f"fd_rep" in info and f"at step 6" in info
    p = cli("plot", out, "--x", "flops", "--out", tmp_path / "curves.png")
    assert FD_REP in p.stdout and (tmp_path / "curves.png").stat().st_size > 10_000


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_give_the_one_process_value(dit_run, tmp_path, cli):
    # each rank samples images r, r + 2, ... and the vectors are gathered: the same statistic as one process
    out, _ = dit_run
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("fd_rep.json"))  # nothing cached
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        _free_port(), "-m", "flatdino_cli.cli", "eval", str(tmp_path / "run"), "--samples", "24",
                        "--device", "cpu", "--out", str(tmp_path / "ddp.json")],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("eval: ") == 4  # rank 0 reports: 3 checkpoints and the file
    cli("eval", out, "--samples", "24", "--device", "cpu", "--out", tmp_path / "one.json")
    ddp, one = (json.loads((tmp_path / f).read_text()) for f in ("ddp.json", "one.json"))
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one):
        assert a["checkpoint"] == b["checkpoint"]
        for key in (FD_REP, FD_REP_NOCFG):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_a_missing_checkpoint_is_named_with_the_ones_there(dit_run, tmp_path):
    from flatdino_cli.checkpoint import weights_file

    out, _ = dit_run
    with pytest.raises(UserError) as e:
        weights_file(out, "dit", which="step-0000005")
    assert str(e.value).endswith("has no checkpoint step-0000005 (it has: latest, step-0000003, step-0000006)")
    with pytest.raises(UserError) as e:
        weights_file(tmp_path, "dit")  # a run with no checkpoint at all: the usual advice
    assert "has no checkpoint yet; train it first" in str(e.value)


# ----------------------------------------------------------------------------- evaluate_dit on tiny random runs
@pytest.mark.usefixtures("one_thread")
def test_evaluate_dit_gives_fd_rep_for_flat_and_rae(w):
    """evaluate.evaluate_dit samples through the generate path (sample_chunks) and scores features in
    the encoder space against a store's reference; the same seed gives the same value."""
    ref = reference_stats(w["root"] / "feats", cache=w["root"] / "ref.npz")
    for run in ("dit", "rae"):
        pipe = load_pipeline(w[run], vae_run=w["vae"] if run == "dit" else None, decoder=w["dec"])
        a = evaluate_dit(pipe, ref, samples=10, seed=0)
        assert set(a) == {FD_REP, FD_REP_NOCFG} and all(np.isfinite(v) and v > 0 for v in a.values())
        assert evaluate_dit(pipe, ref, samples=10, seed=0) == a

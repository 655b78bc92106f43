"""The folder lock (lock.py) of run directories and stores: a stale lock of a dead process is taken over,
a held one refused naming its holder, two real writer processes on one run (one refused, the other's
run byte-identical to a solo run), extract into a locked store refused."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from flatdino_cli.errors import UserError
from flatdino_cli.lock import LOCK_NAME, FolderLock
from flatdino_cli.runtime import CPU
from flatdino_cli.train import fit
from test_rundir import FIT_CFG, files_of, fit_task
from test_train import encoder_store, short_preset


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "yesterday"}))
    assert fit(fit_task(), FIT_CFG, run, CPU)["step"] == 8
    assert f"stale lock (pid {dead.pid}" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_lock_is_refused_while_held_and_names_the_holder(tmp_path):
    with FolderLock(tmp_path / "run", "run directory"):
        with pytest.raises(UserError, match=rf"in use by another flatdino process \(pid {os.getpid()} on host "):
            fit(fit_task(), FIT_CFG, tmp_path / "run", CPU)
    with FolderLock(tmp_path / "run"):  # released: free again
        pass


def test_two_writer_processes_one_refused_other_byte_identical_to_solo(tmp_path, cli):
    feats = encoder_store(tmp_path / "feats", "enc-a", n=40)
    preset = short_preset(tmp_path / "p.yaml")
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
    got, solo = files_of(tmp_path / "run" / "checkpoints"), files_of(tmp_path / "solo" / "checkpoints")
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

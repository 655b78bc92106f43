import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

import quickstart_jobs

from flatdino_cli.cpu import apply_cpu_defaults

apply_cpu_defaults()  # as the `flatdino` command does, before torch loads OpenMP: idle threads sleep (cpu.py)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# tests share two cores with whatever else runs; keep torch from oversubscribing them
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


QUICKSTART_JOBS = pytest.StashKey[tuple]()


def pytest_collection_modifyitems(config, items):
    """The quickstart tests run last, and their quickstarts start now, in the background, beside
    every other test (quickstart_jobs.py): they are the suite's longest work and depend on nothing."""
    later = [item for item in items if item.path.name == "test_quickstart.py"]
    if not later or config.option.collectonly:
        return
    items[:] = [item for item in items if item.path.name != "test_quickstart.py"] + later
    root = Path(tempfile.mkdtemp(prefix="flatdino-quickstarts-"))
    config.stash[QUICKSTART_JOBS] = (root, quickstart_jobs.start(root))


def pytest_unconfigure(config):
    root, job = config.stash.get(QUICKSTART_JOBS, (None, None))
    if job is not None:
        quickstart_jobs.stop(job)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def workspace_variable_kept():
    """`--workspace` sets FLATDINO_WORKSPACE for the process: a test that left it changed would steer
    the default folders of every later test in this process (the quickstart tests, run last, met one)."""
    before = os.environ.get("FLATDINO_WORKSPACE")
    yield
    assert os.environ.get("FLATDINO_WORKSPACE") == before, "the test left FLATDINO_WORKSPACE changed"


@pytest.fixture(scope="session")
def quickstarts(pytestconfig):
    """The background quickstarts' folder (quickstart_jobs.py), once they have finished."""
    root, job = pytestconfig.stash[QUICKSTART_JOBS]
    quickstart_jobs.wait(root, job)
    return root


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT):
    """`flatdino ...` in this process, in folder `cwd` (Typer's runner: no interpreter and torch start-up
    per call); returns a CompletedProcess (returncode, stdout, stderr kept apart). `env` is set for the
    call only (OMP_NUM_THREADS sets torch's thread count), and whatever the command sets in os.environ
    (--workspace) is undone after it; `timeout` is for run_cli_process's signature (an in-process call
    cannot be cut short). Use run_cli_process where a real process is the point (kill, torchrun,
    concurrency)."""
    from typer.testing import CliRunner

    from flatdino_cli.cli import app

    argv = [str(a) for a in args]
    env = {k: str(v) for k, v in (env or {}).items()}
    threads = torch.get_num_threads()
    saved_env = dict(os.environ)
    with contextlib.chdir(cwd), warnings.catch_warnings():
        warnings.simplefilter("default")  # a warning seen by an earlier test is shown again, as in a fresh process
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", threads)))  # what the variable does to a new process
        try:
            r = CliRunner().invoke(app, argv, env=env, catch_exceptions=True)
        finally:
            torch.set_num_threads(threads)
            os.environ.clear()
            os.environ.update(saved_env)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):  # what python would print
        stderr += "".join(traceback.format_exception(r.exception))
    p = subprocess.CompletedProcess(["flatdino", *argv], r.exit_code, r.stdout, stderr)
    if check and p.returncode != 0:
        raise AssertionError(f"flatdino {' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def run_cli_process(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None,
                    cwd: Path = ROOT):
    """Run `python -m flatdino_cli.cli ...` in a subprocess (in folder `cwd`); returns CompletedProcess."""
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))  # this checkout, from any cwd
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "flatdino_cli.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"flatdino {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def toy_features(tmp_path_factory):
    """A small toy ImageFolder (12 classes x 6) and its tiny-encoder feature store with a 12-image val
    split, built once per session. Read-only: tests that change a store copy it first."""
    root = tmp_path_factory.mktemp("toy_features")
    run_cli("toy-data", root / "toy", "--per-class", "6")
    run_cli("extract", root / "toy", root / "feats", "--encoder", "tiny", "--val-split", "12")
    return root / "feats"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation on a shared, oversubscribed machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dit_run(toy_features, tmp_path_factory):
    """A 6-step tiny RAE-grid DiT evaluated at steps 3 and 6 on 24 samples, its checkpoints kept."""
    out = tmp_path_factory.mktemp("dit") / "dit"
    sets = ["train.max_steps=6", "train.epochs=0", "train.log_every=1", "train.keep_every_steps=3", "eval.every=3",
            "eval.samples=24", "flow.steps=4", "model.depth=1"]
    r = run_cli("train-dit", "--preset", "tiny-rae-dit", "--latents", toy_features, "--out", out, "--device", "cpu",
                "--batch-size", "16", *[a for s in sets for a in ("--set", s)])
    return out, r

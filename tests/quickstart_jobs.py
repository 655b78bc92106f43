"""The two quickstarts test_quickstart.py checks, run in the background while the rest of the suite runs.

They are the suite's longest work (minutes each, on one core each) and need nothing from the other
tests, so conftest starts this file as a process as soon as pytest has collected a quickstart test,
and moves those tests to the end of the run, where they wait for it and read what it left:

  ROOT/inputs    the toy data, made once for both laminators (each extracts its own encoder's features)
  ROOT/qs        the flat quickstart: killed during train-vae, then rerun to the end (ROOT/qs.log)
  ROOT/qsfae     `--laminator fae`, beside it (ROOT/qsfae.log)
  ROOT/cache     the toy classifier's cache (XDG_CACHE_HOME), shared: the user's ~/.cache is left alone
  ROOT/jobs.json what happened (exit codes, whether the kill came before train-vae finished), written last

The flat quickstart, the longest job (its tiny VAE alone is minutes), gets two threads, so it takes
both cores back as the other tests and the FAE run end (its VAE ran 1.7x faster on 2 quiet cores than
on one); the FAE run gets one, and waiting threads sleep (cpu.py), so the overlap costs no spinning.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIT_STEPS = 2520  # tiny-dit's steps on the quickstart's 2,700 training images
# the flat DiT keeps a checkpoint, and logs fd_rep, at every fifth of its steps (the Spearman test)
FLAT_SETS = ("--set", f"dit:train.keep_every_steps={DIT_STEPS // 5}", "--set", f"dit:eval.every={DIT_STEPS // 5}")
FAE_SETS = ("--set", "vae:train.epochs=6")  # half the FAE VAE's epochs: the FAE run ends before the flat one


def env(root: Path, threads: int = 1) -> dict[str, str]:
    """What every quickstart process of these tests runs with (and the in-test reruns too): this
    checkout's package from any folder, `threads` threads, the shared judge cache."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {"XDG_CACHE_HOME": str(root / "cache"), "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}


def quickstart_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flatdino_cli.cli", "quickstart", "--out", str(out), *args]


def start(root: Path) -> subprocess.Popen:
    """Start the jobs as a process group of their own (its output in ROOT/jobs.log): stop() ends it
    with every quickstart it started."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "jobs.log", "w") as log:
        return subprocess.Popen([sys.executable, __file__, str(root)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ, **env(root)), start_new_session=True)


def stop(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def wait(root: Path, job: subprocess.Popen, timeout: float = 3600) -> dict:
    """jobs.json once the jobs have ended (AssertionError with their log if they have not in time, or
    if the driver process died without writing it: a SIGKILL or an OOM kill skips its `finally`)."""
    deadline = time.time() + timeout
    while not (root / "jobs.json").exists():
        if job.poll() is not None and not (root / "jobs.json").exists():
            raise AssertionError(f"the background quickstarts' driver exited ({job.returncode}) without "
                                 "jobs.json:\n" + tail(root / "jobs.log"))
        if time.time() > deadline:
            raise AssertionError("the background quickstarts did not finish:\n" + tail(root / "jobs.log"))
        time.sleep(2)
    return json.loads((root / "jobs.json").read_text())


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else f"({path} missing)"


def quickstart_dir(path: Path, shared: Path) -> Path:
    """A quickstart folder whose toy-data stage is the shared one (read only)."""
    (path / ".stages").mkdir(parents=True)
    (path / "toy").symlink_to(shared / "toy", target_is_directory=True)
    shutil.copy(shared / ".stages" / "toy-data.json", path / ".stages")
    return path


def run_jobs(root: Path) -> dict:
    import torch

    from flatdino_cli.quickstart import QuickstartPlan, run_quickstart
    from flatdino_cli.runtime import setup_runtime

    torch.set_num_threads(1)
    shared = root / "inputs"
    run_quickstart(shared, setup_runtime("cpu", "auto", False), QuickstartPlan(until="toy-data"))
    flat, fae = quickstart_dir(root / "qs", shared), quickstart_dir(root / "qsfae", shared)
    one_core, two_cores = dict(os.environ, **env(root)), dict(os.environ, **env(root, threads=2))
    with open(root / "qsfae.log", "w") as fae_log:
        fae_job = subprocess.Popen(quickstart_cmd(fae, "--laminator", "fae", *FAE_SETS), cwd=REPO, stdout=fae_log,
                                   stderr=subprocess.STDOUT, env=one_core)
        # the flat one is killed as soon as train-vae has written a checkpoint, then run again to the end
        first = subprocess.Popen(quickstart_cmd(flat, *FLAT_SETS), cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=two_cores)
        while first.poll() is None and not (flat / "vae" / "checkpoints" / "latest").exists():
            time.sleep(0.5)
        exited_early = first.poll() is not None
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_mid_vae = not exited_early and not (flat / ".stages" / "train-vae.json").exists()
        t0 = time.time()
        with open(root / "qs.log", "w") as flat_log:
            rerun = subprocess.run(quickstart_cmd(flat, *FLAT_SETS), cwd=REPO, stdout=flat_log,
                                   stderr=subprocess.STDOUT, env=two_cores)
        rerun_seconds = time.time() - t0
        fae_rc = fae_job.wait()
    return {"killed_mid_vae": killed_mid_vae, "flat_rc": rerun.returncode, "flat_rerun_seconds": rerun_seconds,
            "fae_rc": fae_rc}


def main(root: Path) -> None:
    status = {"error": "interrupted"}
    try:
        status = run_jobs(root)
    except Exception as e:  # the tests must learn of it, not wait for a file that never comes
        status = {"error": repr(e)}
        raise
    finally:
        (root / "jobs.json.tmp").write_text(json.dumps(status))
        (root / "jobs.json.tmp").replace(root / "jobs.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

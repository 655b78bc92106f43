import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# tests share two cores with whatever else runs; keep torch from oversubscribing them
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None, cwd: Path = ROOT):
    """Run `python -m flatdino_cli.cli ...` in a subprocess (in folder `cwd`); returns CompletedProcess."""
    import subprocess

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

"""`flatdino --version`, shell completion, and what keeps `flatdino --help` instant: the CLI module imports
none of the heavy libraries (torch, matplotlib, the trackers, huggingface_hub) until a command runs."""

import subprocess
import sys

from conftest import ROOT, run_cli

import flatdino_cli


def test_version_and_completion_options():
    p = run_cli("--version")
    assert p.stdout.strip() == f"flatdino {flatdino_cli.__version__}"
    top = run_cli("--help").stdout
    assert "--version" in top and "--install-completion" in top and "--show-completion" in top
    script = run_cli("--show-completion", "bash", env={"SHELL": "/bin/bash"}).stdout
    assert "complete" in script and "_completion" in script


def test_cli_import_stays_light():
    heavy = ("torch", "matplotlib", "numpy", "wandb", "tensorboard", "huggingface_hub", "safetensors")
    code = ("import sys, flatdino_cli.cli; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"

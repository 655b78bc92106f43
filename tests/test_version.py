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


def test_readme_cpu_only_install_matches_the_pins_and_its_check_runs():
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme.split("**A laptop without a GPU.**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    install = next(ln for ln in block.splitlines() if "--index-url" in ln)
    assert "https://download.pytorch.org/whl/cpu" in install
    for pkg in ("torch", "torchvision"):  # the CPU wheels pinned as the project pins them
        pin = re.search(rf'"{pkg}==([^"]+)"', pyproject).group(1)
        assert f"{pkg}=={pin}" in install.split()
    check = next(ln for ln in block.splitlines() if ln.startswith("python -c"))
    out = subprocess.run(check, shell=True, capture_output=True, text=True, check=True).stdout.split()
    import torch

    assert out == [torch.__version__, str(torch.version.cuda), str(torch.cuda.is_available())]

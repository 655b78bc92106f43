"""Install-level checks: the wheel ships the presets, every command's --help has an example,
errors are one line, and the README's set-up block is what CI runs."""

import os
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT, run_cli


def _source_modules() -> list[str]:
    """Every module of the source tree, so a new subpackage can never be left out of the wheel unseen."""
    pkg = ROOT / "flatdino_cli"
    mods = []
    for f in sorted(pkg.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def test_built_wheel_imports_every_module_and_trains(tmp_path):
    """Build the wheel, install it into a fresh target outside the source tree, import every module of
    the source tree from there, and run one tiny training command through the installed console script."""
    wheel_dir, target, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # build from a copy: a build/ folder left in the checkout would hand stale modules to the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs",
                                                             "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(wheel_dir), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("flatdino-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "-q", str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    mods = _source_modules()
    assert "flatdino_cli.stages.vae" in mods and "flatdino_cli.losses.lpips" in mods
    code = ("import importlib, sys, flatdino_cli; from flatdino_cli.config_yaml import list_presets, load_preset; "
            "assert str(flatdino_cli.__file__).startswith(sys.argv[1]), flatdino_cli.__file__; "
            "bad = [m for m in sys.argv[2:] if not importlib.import_module(m).__file__.startswith(sys.argv[1])]; "
            "assert not bad, f'not imported from the installed copy: {bad}'; "
            "print(len(list_presets())); print(load_preset('xl-32x128').model.width)")
    p = subprocess.run([sys.executable, "-c", code, str(target), *mods], capture_output=True, text=True, env=env,
                       cwd=tmp_path)  # not the source tree: only the installed copy is importable
    assert p.returncode == 0, p.stderr
    n, width = p.stdout.split()
    assert int(n) >= 26 and int(width) == 1152

    # a tiny train-vae through the installed console script, on a synthetic feature store
    make_store = ("import sys, numpy as np; from flatdino_cli.data import Store; n = 24; "
                  "s = Store.create(sys.argv[1], 'features', (8, 16), n, 'float32', {'encoder': 'synthetic'}, {}, "
                  "[f'img{i}.png' for i in range(n)], [i % 4 for i in range(n)]); "
                  "s.write_rows(np.arange(n), np.random.default_rng(0).standard_normal((n, 8, 16)).astype(np.float32)); "
                  "s.mark_done(np.arange(n)); s.finalize(); s.close()")
    subprocess.run([sys.executable, "-c", make_store, str(tmp_path / "feats")], check=True, env=env, cwd=tmp_path)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "stage": "vae", "val_count": 8, "loss": {"loss": "huber"},
        "model": {"kind": "flat", "tokens": 4, "latent_dim": 8, "enc_width": 32, "enc_depth": 1, "enc_heads": 2,
                  "dec_width": 32, "dec_depth": 1, "dec_heads": 2, "mlp_ratio": 2.0},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "log_every": 1}}))
    p = subprocess.run([str(target / "bin" / "flatdino"), "train-vae", "--preset", str(preset), "--features",
                        str(tmp_path / "feats"), "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest" / "model.safetensors").is_file()


def _commands():
    from flatdino_cli.cli import app

    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


def test_every_command_help_has_an_example():
    top = run_cli("--help")
    assert "quickstart" in top.stdout or "extract" in top.stdout
    for name in _commands():
        if name == "presets":
            continue
        p = run_cli(name, "--help")
        assert "Example" in p.stdout, f"`flatdino {name} --help` has no example"
        assert "flatdino " + name in " ".join(p.stdout.split()), f"`flatdino {name} --help` example does not run it"


def test_bad_input_is_one_line_no_traceback(tmp_path):
    p = run_cli("extract", tmp_path / "missing", tmp_path / "out", "--encoder", "tiny", check=False)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "missing" in err[0]
    p = run_cli("presets", "show", "xl-32x129", check=False)
    assert p.returncode == 1 and "xl-32x128" in p.stderr and "Traceback" not in p.stderr


def test_presets_listing_and_show():
    p = run_cli("presets")
    assert "xl-32x128" in p.stdout and "vae-16x16" in p.stdout and "BROKEN" not in p.stdout
    p = run_cli("presets", "show", "xl-32x128", "--set", "model.depth=2")
    assert "depth: 2" in p.stdout and "# parameters, total:" in p.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- setup-commands -->", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines()[1:] if ln.strip()]
    assert len(lines) == 2, "the set-up block holds exactly the two commands"
    assert "pytest" in lines[1] and ".[test]" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "setup-commands" in ci and "sed -n 2p" in ci

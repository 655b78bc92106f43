"""Install-level checks: the wheel ships the presets, every command's --help has an example,
errors are one line, and the README's set-up block is what CI runs."""

import os
import subprocess
import sys

from conftest import ROOT, run_cli


def test_wheel_ships_presets(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "-w", str(wheel_dir), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("flatdino-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "-q", str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    code = ("import flatdino_cli, sys; from flatdino_cli.config import list_presets, load_preset; "
            "assert str(flatdino_cli.__file__).startswith(sys.argv[1]), flatdino_cli.__file__; "
            "names = list_presets(); print(len(names)); print(load_preset('xl-32x128').model.width)")
    p = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env,
                       cwd=tmp_path)  # not the source tree: only the installed copy is importable
    assert p.returncode == 0, p.stderr
    n, width = p.stdout.split()
    assert int(n) >= 26 and int(width) == 1152


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
        assert "flatdino " + name in p.stdout.replace("\n", " ") or "flatdino" in p.stdout


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

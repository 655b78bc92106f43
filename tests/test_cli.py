"""The command-line layer (cli/): the command lines quoted in each --help stay on one line at 80
columns, and an OSError without a message of its own (a full disk anywhere) still ends the command in
one line."""

import errno

from typer.main import get_command
from typer.testing import CliRunner

from flatdino_cli import rundir
from flatdino_cli.cli import app
from test_train import encoder_store, short_preset


def test_help_examples_are_never_rewrapped():
    """Every command line quoted in a command's docstring shows on one line of its --help at 80 columns."""
    group = get_command(app)
    checked = 0
    for name, cmd in group.commands.items():
        lines = [ln.strip().removeprefix("Example:").strip() for ln in (cmd.help or "").splitlines()]
        quoted = [ln for ln in lines if ln.startswith(("flatdino ", "torchrun "))]
        if not quoted:
            continue
        shown = CliRunner().invoke(app, [name, "--help"], terminal_width=80).output
        lines = [ln.strip() for ln in shown.splitlines()]
        for q in quoted:
            assert any(ln.endswith(q) for ln in lines), f"{name} --help re-wraps: {q}"
            checked += 1
    assert checked >= 15


def test_a_full_disk_anywhere_else_is_still_one_line(tmp_path, monkeypatch):
    """Writes without their own disk-full message (metrics.jsonl, summaries) end in one line too."""

    def full(self, **row):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(rundir.MetricsLog, "write", full)
    feats = encoder_store(tmp_path / "f", "enc-a", n=40)
    r = CliRunner().invoke(app, ["train-vae", "--preset", str(short_preset(tmp_path / "p.yaml")), "--features",
                                 str(feats), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    last = r.stderr.strip().splitlines()[-1]  # on a line of its own, after the closed progress bar
    assert last.startswith(f"flatdino: error: {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device")

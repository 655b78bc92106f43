"""Where things go in the workspace: its root, paths as the user types them, and the default folders
of new runs (runs/<stage>-<preset>, a new -N suffix unless it is a resume of the same config) and
stores (stores/<name>)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from tqdm import tqdm

from flatdino_cli.config_yaml import to_dict
from flatdino_cli.errors import UserError
from flatdino_cli.rundir import is_run_dir, run_config
from flatdino_cli.utils import atomic_write_json

ENV_VAR = "FLATDINO_WORKSPACE"
RUN_FILE = "run.json"  # {stage, preset}: what a hand-chosen folder name may not say


def root() -> Path:
    """$FLATDINO_WORKSPACE (the global --workspace option sets it), else the current folder (absolute)."""
    p = os.environ.get(ENV_VAR) or Path.cwd()
    p = Path(p).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise UserError(f"workspace {p}: is a file; pass a folder to --workspace / {ENV_VAR}")
    return p


def shown(path: str | Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(p)


def say(line: str) -> None:
    """One line on stdout, from the first process only (torchrun starts one per GPU)."""
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(line)


def preset_slug(preset: str) -> str:
    """`xl-32x128` -> itself; a YAML file -> its stem (folder-name safe)."""
    name = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "custom"


def _same_config(run_dir: Path, cfg) -> bool:
    """The run's config.yaml, read as a config (so keys added since it was written take their defaults:
    a run of an older version is still resumed), resolves to cfg."""
    try:
        have = to_dict(run_config(run_dir))
    except (OSError, yaml.YAMLError, UserError):
        return False
    return yaml.safe_load(yaml.safe_dump(have)) == yaml.safe_load(yaml.safe_dump(to_dict(cfg)))


def run_dir(command: str, out: Path | None, stage: str, preset: str, cfg) -> Path:
    """--out if given; else runs/<stage>-<preset>, or the first -N suffix that is free or holds a run of
    exactly this config (which is then resumed)."""
    if out is None:
        base = root() / "runs" / f"{stage}-{preset_slug(preset)}"
        out, n = base, 1
        # a folder without config.yaml is taken as is: under torchrun another rank may be creating it
        while is_run_dir(out) and not _same_config(out, cfg):
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        resumed = is_run_dir(out)
        say(f"{command}: {'resuming' if resumed else 'new run'} {shown(out)} (--out to choose)")
    return out


def note_run(out: Path, stage: str, preset: str) -> None:
    """Record the preset a finished run was made with in RUN/run.json (the index shows it)."""
    atomic_write_json(Path(out) / RUN_FILE, {"stage": stage, "preset": preset})


def store_dir(command: str, out: Path | None, name: str) -> Path:
    """OUT if given, else stores/<name> in the workspace (named on stdout)."""
    if out is not None:
        return out
    out = root() / "stores" / name
    say(f"{command}: store {shown(out)} (pass OUT to choose)")
    return out

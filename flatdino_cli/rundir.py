"""The run directory's own files, read and written here only.

A run dir (train-vae / train-dit / train-decoder --out) holds:
  config.yaml    the resolved stage config (what `--preset` and `--set` made), written at every start
  inputs.json    provenance: which data, encoder, VAE run ... it trained on (a resume keeps the history)
  metrics.jsonl  one JSON row per log step, validation and evaluation; appended, so a kill may cut the
                 last line short (readers skip it; a resume drops the rows after its checkpoint)
  finished.json  {step, best_val, finished}: written when the loop ends, removed when it starts again
  checkpoints/   checkpoint.py's folders
An exported folder (hub.py) carries config.yaml and inputs.json in the same form, so they are read
and written by the same functions. Other files a run holds belong to who writes them: the workspace's
run.json, the trackers' tracking.json and tensorboard/, a stage's stats.pt.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from flatdino_cli.checkpoint import checkpoint_dir
from flatdino_cli.config_yaml import load_config, save_config
from flatdino_cli.errors import UserError
from flatdino_cli.lock import LOCK_NAME
from flatdino_cli.utils import atomic_write_json, atomic_write_text, read_json

CONFIG_FILE = "config.yaml"
INPUTS_FILE = "inputs.json"
METRICS_FILE = "metrics.jsonl"
FINISHED_FILE = "finished.json"  # written when the loop ends: the workspace's "finished" mark


def is_run_dir(path: str | Path) -> bool:
    """A folder is a run (or an exported one) when it holds a config.yaml."""
    return (Path(path) / CONFIG_FILE).is_file()


def record_files(run_dir: Path) -> list[Path]:
    """The run's records in the order the workspace index stamps them (their mtimes say it changed)."""
    return [Path(run_dir) / n for n in (CONFIG_FILE, METRICS_FILE, INPUTS_FILE, FINISHED_FILE)]


def last_written(run_dir: Path) -> Path:
    """The record written last in a run's life: the finished mark, else the metrics log, else the config."""
    return next(p for p in (run_dir / FINISHED_FILE, run_dir / METRICS_FILE, run_dir / CONFIG_FILE) if p.exists())


# ----------------------------------------------------------------------------- config.yaml
_STAGE_NAMES = {"vae": "train-vae", "dit": "train-dit", "decoder": "train-decoder"}


def run_config(run_dir: str | Path, expect_stage: str | None = None) -> Any:
    """The run's stage config; UserError when the folder is not a run or one of another stage."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        hint = f" (make one with `flatdino {_STAGE_NAMES[expect_stage]}`)" if expect_stage else ""
        raise UserError(f"{run_dir}: not a flatdino run directory (no config.yaml){hint}")
    cfg = load_config(run_dir / CONFIG_FILE)
    if expect_stage and cfg.stage != expect_stage:
        raise UserError(f"{run_dir}: is a {cfg.stage} run, expected a {expect_stage} run")
    return cfg


def raw_config(run_dir: Path) -> dict | None:
    """config.yaml as plain YAML, without the schema (None when unreadable): for listing many runs,
    of any version, quickly."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def write_config(run_dir: Path, cfg: Any) -> None:
    save_config(cfg, Path(run_dir) / CONFIG_FILE)


# ----------------------------------------------------------------------------- inputs.json (provenance)
def run_inputs(run_dir: str | Path) -> dict:
    """A run's inputs.json ({} when absent: a copied or hand-made run still loads)."""
    return read_json(Path(run_dir) / INPUTS_FILE)


def write_inputs(run_dir: Path, inputs: dict) -> None:
    atomic_write_json(Path(run_dir) / INPUTS_FILE, inputs)


def merge_inputs(run_dir: Path, inputs: dict, new_data: bool) -> dict:
    """inputs.json for a resumed run: the same `data_identity` as before, or (new_data) both recorded."""
    old = run_inputs(run_dir)
    history = old.pop("previous_inputs", [])
    was, now = old.get("data_identity"), inputs.get("data_identity")
    if was is None or now is None or was == now:
        return {**inputs, **({"previous_inputs": history} if history else {})}
    if not new_data:
        differs = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        raise UserError(f"{run_dir}: was trained on other data than {inputs.get('data_path', 'this input')} "
                        f"(differs in {', '.join(differs)}); pass --new-data to fine-tune on it on purpose "
                        f"(both are recorded in inputs.json), or use another --out")
    return {**inputs, "previous_inputs": history + [old]}


# ----------------------------------------------------------------------------- metrics.jsonl
def _parse(line: str) -> dict | None:
    """One metrics.jsonl row; None for a blank line or one a kill cut short mid-write."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if it has none), skipping a line a kill cut short."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [row for row in map(_parse, path.read_text().splitlines()) if row is not None]


class MetricsLog:
    """metrics.jsonl in the run dir (rank 0 only); on resume, entries after the checkpoint are dropped.
    Every row also goes to the experiment trackers (track.py), and so do the images the task writes."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, trackers: list | None = None):
        self.path, self.enabled, self.trackers = Path(run_dir) / METRICS_FILE, enabled, trackers or []
        if enabled and self.path.exists():
            rows = [(ln, _parse(ln)) for ln in self.path.read_text().splitlines()]
            keep = [ln for ln, row in rows if row is not None and row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))  # a kill here keeps the old log

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for t in self.trackers:
                t.scalars(row["step"], {k: v for k, v in row.items() if k != "step"})

    def image(self, path: Path, step: int) -> None:
        for t in self.trackers:
            t.image(Path(path).parent.name, path, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


# ----------------------------------------------------------------------------- finished.json
def run_finished(run_dir: Path) -> dict:
    """The finished mark ({} while the run is unfinished, or from before the mark was written)."""
    return read_json(Path(run_dir) / FINISHED_FILE)


def mark_finished(run_dir: Path, step: int, best_val: float) -> None:
    """What the workspace index reads as "finished, when, how far"."""
    atomic_write_json(Path(run_dir) / FINISHED_FILE, {
        "step": step, "best_val": best_val if math.isfinite(best_val) else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def clear_finished(run_dir: Path) -> None:
    """Training again: not finished until the loop ends."""
    (Path(run_dir) / FINISHED_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- starting over, or not
def refuse_damaged_run(run_dir: Path) -> None:
    """Before anything is written: a run with checkpoints but none to resume from is refused, untouched
    (read-only, so every DDP rank runs it and they stop together)."""
    ckdir = run_dir / "checkpoints"
    leftovers = sorted(p.name for p in ckdir.iterdir() if not p.name.startswith(".tmp-")) if ckdir.is_dir() else []
    if leftovers and checkpoint_dir(run_dir) is None:
        raise UserError(f"{run_dir}: has checkpoints ({', '.join(leftovers)}) but no complete checkpoints/latest "
                        "(model.safetensors + state.pt) to resume from; nothing was changed. Start over with "
                        "--no-resume (the old run is moved aside), or copy checkpoints/best to "
                        "checkpoints/latest to resume from the best one")


def move_run_aside(run_dir: Path, keep_old: int, keep_files: tuple[str, ...] = ()) -> None:
    """--no-resume: move the whole previous run (config, metrics, inputs, checkpoints, samples together)
    to RUN.old-<time>, keeping the newest `keep_old` of those. `keep_files` (inputs the stage already
    prepared in the run dir for the new run) are copied aside, not moved."""
    old = sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME)
    if not old:
        return
    base = run_dir.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, i = base.with_name(f"{base.name}.old-{stamp}"), 0
    while dest.exists():
        i += 1
        dest = base.with_name(f"{base.name}.old-{stamp}-{i}")
    dest.mkdir()
    for p in old:
        if p.name in keep_files:
            shutil.copy2(p, dest / p.name)
        else:
            p.rename(dest / p.name)
    tqdm.write(f"--no-resume: moved the previous run to {dest}")
    kept = sorted(base.parent.glob(f"{glob.escape(base.name)}.old-*"))  # the names sort by age
    for gone in kept[:max(0, len(kept) - keep_old)]:
        shutil.rmtree(gone)
        tqdm.write(f"--no-resume: removed {gone} (keeping the last train.keep_old_runs={keep_old})")

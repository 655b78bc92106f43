"""The index: every run and store under the workspace, found by a scan. Nothing needs registering: a
run is a folder with config.yaml, a store a folder with manifest.json, and `.flatdino/index.json` is
only a cache of what the scan finds (rebuilt entry by entry when missing, corrupt or stale), so
deleting it loses nothing."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from flatdino_cli.evaluate import quality_summary
from flatdino_cli.rundir import (CONFIG_FILE, last_written, raw_config, read_metrics, record_files, run_finished,
                                 run_inputs)
from flatdino_cli.utils import atomic_write_json, disk_use, read_json
from flatdino_cli.workspace.paths import RUN_FILE, root

INDEX_FILE = ".flatdino/index.json"
INDEX_VERSION = 2
_PRUNE = {"checkpoints", "samples", "images", "node_modules", "__pycache__"}  # never hold runs or stores
_MAX_DEPTH = 5


def _rel(ws: Path, path: str | Path | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    p = (ws / p) if not p.is_absolute() else p
    try:
        return p.resolve().relative_to(ws).as_posix()
    except ValueError:
        return str(p)


def _mtime_iso(path: Path) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))


def _stamp(paths: list[Path]) -> list:
    return [p.stat().st_mtime_ns if p.exists() else 0 for p in paths]


def _run_stamp(d: Path) -> list:
    return _stamp(record_files(d) + [d / RUN_FILE])


def _store_stamp(d: Path) -> list:
    return _stamp([d / "manifest.json", d / "val" / "manifest.json"])


def _scan(ws: Path):
    """(kind, folder) for every run and store under the workspace; neither is looked inside."""
    if not ws.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(ws):
        d = Path(dirpath)
        depth = len(d.relative_to(ws).parts)
        if CONFIG_FILE in filenames:
            yield "run", d
            dirnames[:] = []
        elif "manifest.json" in filenames:
            yield "store", d
            dirnames[:] = []  # its val/ split belongs to it
        else:
            dirnames[:] = [n for n in dirnames if not n.startswith(".") and n not in _PRUNE and depth < _MAX_DEPTH]


def _metrics(d: Path) -> tuple[float | None, int | None, tuple[str, float] | None, dict | None]:
    """(last epoch, last step, best metric, fd_rep summary) from metrics.jsonl: the metric is the lowest
    val/loss, else the last loss."""
    rows = read_metrics(d)
    epoch = next((r["epoch"] for r in reversed(rows) if "epoch" in r), None)
    step = next((r["step"] for r in reversed(rows) if "step" in r), None)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    loss = [r["loss"] for r in rows if "loss" in r]
    metric = ("val loss", min(val)) if val else ("loss", loss[-1]) if loss else None
    return epoch, step, metric, quality_summary(rows)


def _run_entry(ws: Path, d: Path) -> dict | None:
    cfg = raw_config(d)
    if cfg is None or cfg.get("stage") not in ("vae", "dit", "decoder"):
        return None
    run = read_json(d / RUN_FILE)
    finished = run_finished(d)
    epoch, step, metric, quality = _metrics(d)
    epochs = float((cfg.get("train") or {}).get("epochs") or 0)
    progress = 1.0 if finished else min(1.0, epoch / epochs) if epoch is not None and epochs > 0 else 0.0
    inputs = run_inputs(d)
    sources = [v.get("path") if isinstance(v, dict) else v for k, v in inputs.items() if k in ("features", "latents", "images")]
    last = last_written(d)
    done_at = finished.get("finished") or (_mtime_iso(last) if progress >= 1 else None)  # runs older than finished.json
    return {"kind": "run", "stage": cfg["stage"], "preset": run.get("preset") or re.sub(r"^(vae|dit|decoder)-", "", d.name),
            "progress": progress, "step": finished.get("step", step), "finished": done_at,
            "time": last.stat().st_mtime, "metric": list(metric) if metric else None, "quality": quality,
            "size": disk_use(d),
            "from": [_rel(ws, s) for s in sources if isinstance(s, str)], "val": None}


def _store_entry(ws: Path, d: Path) -> dict | None:
    m = read_json(d / "manifest.json")
    if m.get("kind") not in ("features", "latents"):
        return None
    ident = m.get("identity") or {}
    # latents and decoded features record the feature store and VAE run they were made from
    made_by = ident.get("vae_reconstruction") or (ident if m["kind"] == "latents" else {})
    sources = [made_by.get("features"), made_by.get("vae_run")]
    return {"kind": "store", "stage": "decoded" if "vae_reconstruction" in ident else m["kind"],
            "preset": Path(made_by["vae_run"]).name if made_by.get("vae_run") else ident.get("encoder"),
            "progress": 1.0 if m.get("complete") else _done_fraction(d), "step": None,
            "finished": _mtime_iso(d / "manifest.json") if m.get("complete") else None,
            "time": (d / "manifest.json").stat().st_mtime, "metric": None, "size": disk_use(d),
            "from": [_rel(ws, p) for p in sources if p], "val": "val" if (d / "val" / "manifest.json").is_file() else None}


def _done_fraction(d: Path) -> float:
    try:
        done = np.load(d / "done.npy", mmap_mode="r")
        return float((np.asarray(done) != 0).mean())
    except (OSError, ValueError):
        return 0.0


def index(ws: Path | None = None) -> dict[str, dict]:
    """{workspace-relative folder: entry} for every run and store, newest first. Scans the folder and
    reuses the cached entry of anything unchanged; rewrites .flatdino/index.json when it differs."""
    ws = ws or root()
    path = ws / INDEX_FILE
    cached = read_json(path)
    if cached.get("version") != INDEX_VERSION or cached.get("workspace") != str(ws):
        cached = {}  # missing, corrupt, another version, or a copied workspace: rebuilt from the folders
    old = cached.get("entries") or {}
    entries = {}
    for kind, d in _scan(ws):
        rel = d.relative_to(ws).as_posix()
        stamp = _run_stamp(d) if kind == "run" else _store_stamp(d)
        prev = old.get(rel)
        if isinstance(prev, dict) and prev.get("stamp") == stamp:
            entries[rel] = prev
            continue
        entry = _run_entry(ws, d) if kind == "run" else _store_entry(ws, d)
        if entry is not None:
            entries[rel] = {**entry, "stamp": stamp}
    entries = dict(sorted(entries.items(), key=lambda kv: kv[1]["time"], reverse=True))
    if entries != old and ws.is_dir():
        try:
            atomic_write_json(path, {"version": INDEX_VERSION, "workspace": str(ws), "entries": entries})
        except OSError:
            pass  # a read-only workspace: the index is only a cache of what the scan found
    return entries


def newest(stage: str, ws: Path | None = None, fits=None) -> list[tuple[str, dict]]:
    """Finished entries of a stage, newest first (and only those `fits(path)` accepts)."""
    ws = ws or root()
    found = [(rel, e) for rel, e in index(ws).items() if e["stage"] == stage and e.get("finished")]
    found.sort(key=lambda kv: kv[1]["time"], reverse=True)
    return [(rel, e) for rel, e in found if fits is None or fits(ws / rel)]

"""The workspace: the folder a user works in (cwd, `--workspace DIR` or FLATDINO_WORKSPACE).

Runs go to runs/<stage>-<preset> (a new -N suffix unless it is a resume of the same config), stores
to stores/<name>. Nothing needs registering: a run is a folder with config.yaml, a store a folder
with manifest.json, and `.flatdino/index.json` is only a cache of what a scan of the folder finds
(rebuilt entry by entry when missing, corrupt or stale), so deleting it loses nothing.
`.flatdino/settings.json` holds the few defaults `flatdino workspace set` configures.

Commands left without an input resolve it here and print one line naming what they picked.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from flatdino_cli.config_yaml import to_dict
from flatdino_cli.data import Store, with_store_shape
from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import quality_summary
from flatdino_cli.rundir import (CONFIG_FILE, is_run_dir, last_written, raw_config, read_metrics, record_files,
                                 run_config, run_finished, run_inputs)
from flatdino_cli.utils import atomic_write_json, disk_use, human_bytes, read_json

ENV_VAR = "FLATDINO_WORKSPACE"
INDEX_FILE = ".flatdino/index.json"
SETTINGS_FILE = ".flatdino/settings.json"
RUN_FILE = "run.json"  # {stage, preset}: what a hand-chosen folder name may not say
INDEX_VERSION = 2
SETTINGS = {
    "decoder": "pixel decoder for sample and reconstruct (a train-decoder run or RAE's model.pt)",
    "encoder-weights": "local DINOv2 weights for extract / train-vae / train-decoder",
    "inception-weights": "clean-fid's inception-2015-12-05.pt for fid",
    "reference-batch": "fid's reference (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)",
}
_PRUNE = {"checkpoints", "samples", "images", "node_modules", "__pycache__"}  # never hold runs or stores
_MAX_DEPTH = 5

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


def _rel(ws: Path, path: str | Path | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    p = (ws / p) if not p.is_absolute() else p
    try:
        return p.resolve().relative_to(ws).as_posix()
    except ValueError:
        return str(p)


def say(line: str) -> None:
    """One line on stdout, from the first process only (torchrun starts one per GPU)."""
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(line)


def _mtime_iso(path: Path) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))


# ============================================================================ default output folders
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


# ============================================================================ the index
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


# ============================================================================ settings
def settings(ws: Path | None = None) -> dict:
    return read_json((ws or root()) / SETTINGS_FILE)


def set_setting(key: str, value: str) -> str:
    """`flatdino workspace set KEY VALUE` (VALUE `none` clears); returns the line to print."""
    if key not in SETTINGS:
        raise UserError(f"workspace set {key}: unknown key; use one of {', '.join(SETTINGS)}")
    ws = root()
    values = settings(ws)
    if value.lower() == "none":
        values.pop(key, None)
        line = f"workspace: {key} cleared"
    else:
        p = Path(value).expanduser()
        if not p.exists():
            raise UserError(f"workspace set {key} {value}: no such file or folder")
        values[key] = str(p.resolve())
        line = f"workspace: {key} = {values[key]}"
    atomic_write_json(ws / SETTINGS_FILE, values)
    return line


def setting(key: str, explicit: Path | None) -> Path | None:
    """An explicit option, else the workspace's setting (if any)."""
    if explicit is not None:
        return explicit
    value = settings().get(key)
    return Path(value) if value else None


# ============================================================================ picking inputs
def _steps(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def _describe(ws: Path, rel: str, e: dict) -> str:
    bits = [f"step {_steps(e['step'])}" if e.get("step") is not None else None, (e.get("finished") or "")[:10] or None]
    return f"{shown(ws / rel)} ({', '.join(b for b in bits if b)})"


def _pick(ws: Path, command: str, stage: str, what: str, option: str, first: str, fits=None) -> tuple[Path, str]:
    """The newest finished entry of a stage and the words naming it (with a note when an older finished
    one of another preset was passed over); a UserError saying what to run first when there is none."""
    found = newest(stage, ws, fits)
    if not found:
        raise UserError(f"{command}: no finished {what} in workspace {ws}; run first: {first} (or pass {option})")
    rel, e = found[0]
    others = {o["preset"] for _, o in found[1:]} - {e["preset"]}
    note = f"; newest of {len(found)} finished, {option} to choose" if others else ""
    return ws / rel, _describe(ws, rel, e) + note


def pick_features(command: str) -> Path:
    """train-vae without --features/--images: the newest finished feature store."""
    ws = root()
    path, said = _pick(ws, command, "features", "feature store", "--features / --images",
                       "flatdino extract IMAGES --val-split 10000")
    say(f"{command}: features {said}")
    return path


def pick_latents(command: str, cfg) -> Path:
    """train-dit without --latents: the newest finished store the preset can train on (latents; raw
    features for rae-* presets)."""
    def fits(path: Path) -> bool:
        try:
            with_store_shape(cfg, Store.open(path), path)  # the preset takes the store's shape
            return True
        except UserError:
            return False

    ws = root()
    kind = "features" if cfg.normalize else "latents"
    vae = newest("vae", ws)
    first = ("flatdino extract IMAGES" if kind == "features" else
             f"flatdino extract {shown(ws / vae[0][1]['from'][0])} --vae {shown(ws / vae[0][0])}"
             if vae and vae[0][1]["from"] else "flatdino train-vae, then flatdino extract FEATURES --vae RUN")
    path, said = _pick(ws, command, kind, f"{kind} store that fits {cfg.model.tokens} x {cfg.model.in_dim}",
                       "--latents", first, fits)
    say(f"{command}: latents {said}")
    return path


def pick_decoder(ws: Path) -> tuple[Path | None, str]:
    """The workspace's configured decoder, else its newest finished train-decoder run."""
    configured = settings(ws).get("decoder")
    if configured:
        return Path(configured), f"{shown(configured)} (workspace setting)"
    found = newest("decoder", ws)
    if found:
        return ws / found[0][0], _describe(ws, *found[0])
    return None, ""


def pick_sample(dit: Path | None, vae: Path | None, decoder: Path | None) -> tuple[Path, Path | None, Path]:
    """sample's DiT (newest finished run), VAE (the one its latents came from) and pixel decoder."""
    ws, parts = root(), []
    if dit is None:
        dit, said = _pick(ws, "sample", "dit", "DiT run", "--dit", "flatdino train-dit --preset xl-32x128")
        parts.append(f"dit {said}")
    if vae is None:
        recorded = run_inputs(dit).get("latents", {}).get("identity", {}).get("vae_run")
        if recorded:
            vae = Path(recorded)
            parts.append(f"vae {shown(recorded)} (its latents' VAE)")
    if decoder is None:
        decoder, said = pick_decoder(ws)
        if decoder is None:
            raise UserError(f"sample: no pixel decoder in workspace {ws}; run first: flatdino workspace set decoder "
                            "PATH/TO/model.pt (RAE's) or flatdino train-decoder (or pass --decoder)")
        parts.append(f"decoder {said}")
    if parts:  # explicit options are not echoed
        say("sample: " + ", ".join(parts))
    return dit, vae, decoder


def pick_ablate(vae: Path | None, features: Path | None) -> tuple[Path, Path]:
    """ablate-tokens' VAE (newest finished run) and the validation split of the store it trained on."""
    ws, parts = root(), []
    if vae is None:
        vae, said = _pick(ws, "ablate-tokens", "vae", "VAE run", "--vae", "flatdino train-vae --preset vae-32x128")
        parts.append(f"vae {said}")
    if features is None:
        store = (run_inputs(vae).get("features") or {}).get("path")
        if not store:
            raise UserError(f"ablate-tokens: {shown(vae)} records no feature store (inputs.json); pass --features")
        features = Path(store) / "val" if (Path(store) / "val" / "manifest.json").is_file() else Path(store)
        parts.append(f"features {shown(features)}{'' if features.name == 'val' else ' (it has no val split)'}")
    if parts:
        say("ablate-tokens: " + ", ".join(parts))
    return vae, features


# ============================================================================ `flatdino workspace`
def listing() -> str:
    """The table `flatdino workspace` prints: newest first, with where each came from."""
    ws = root()
    entries = index(ws)
    lines = [f"workspace {ws}" + (f"  (settings: {', '.join(f'{k}={v}' for k, v in settings(ws).items())})"
                                  if settings(ws) else "")]
    if not entries:
        lines.append("  nothing yet: start with `flatdino quickstart` (toy data) or `flatdino extract IMAGES`")
        return "\n".join(lines)
    names = {rel: rel + (" (+val)" if e.get("val") else "") for rel, e in entries.items()}
    w = max(map(len, names.values()))
    lines.append(f"  {'path':{w}s} {'stage':8s} {'preset':14s} {'progress':>8s} {'metric':>24s} {'size':>9s}  from")
    for rel, e in entries.items():
        metric = f"{e['metric'][0]} {e['metric'][1]:.4g}" if e.get("metric") and e["metric"][1] is not None else ""
        if e.get("quality"):  # a DiT's evaluations: the latest fd_rep, and the best when it was earlier
            q = e["quality"]
            metric = f"fd_rep {q['last']:.3g}" + (f" (best {q['best']:.3g})" if q["best"] < q["last"] else "")
        progress = "done" if e.get("finished") else f"{e['progress']:.0%}"
        lines.append(f"  {names[rel]:{w}s} {e['stage']:8s} {str(e.get('preset') or ''):14s} {progress:>8s} "
                     f"{metric:>24s} {human_bytes(e['size']):>9s}  {' + '.join(e['from']) if e['from'] else '-'}")
    return "\n".join(lines)

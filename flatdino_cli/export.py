"""`flatdino export RUN OUT`: a run's weights as a Hugging Face model folder (the format: hub.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from flatdino_cli.checkpoint import run_config, weights_file
from flatdino_cli.config import save_config, to_dict
from flatdino_cli.errors import UserError
from flatdino_cli.hub import CONFIG_JSON, WEIGHTS, is_export
from flatdino_cli.models import build_model, count_parameters
from flatdino_cli.models.stats import STATS_FILE
from flatdino_cli.runs import run_inputs, run_summary
from flatdino_cli.utils import atomic_write_json, atomic_write_text, sha256_file

LIBRARY = "flatdino"
CARD = "README.md"
LOCAL_PATH_KEYS = ("path", "vae_run", "features", "images")  # provenance that only means something here
_STAGE_FLAGS = (("features", "--features"), ("images", "--images"), ("latents", "--latents"))


def _portable(obj: Any) -> Any:
    """inputs.json without the paths of the machine that trained the run (hashes and kinds stay)."""
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items() if k not in LOCAL_PATH_KEYS or not isinstance(v, str)}
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    return obj


def train_command(stage: str, inputs: dict) -> str:
    """The command that trains this run again from its resolved config (paths as recorded)."""
    parts = [f"flatdino train-{stage} --preset config.yaml"]
    for key, flag in _STAGE_FLAGS:
        value = inputs.get(key)
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str):
            parts.append(f"{flag} {path}")
    images = inputs.get("images")
    encoder = inputs.get("encoder") or (images.get("encoder") if isinstance(images, dict) else None)
    name = encoder.get("encoder") if isinstance(encoder, dict) else encoder  # decoder runs: a store identity
    if isinstance(name, str):
        parts.append(f"--encoder {name}")
    return " ".join(parts + ["--out RUN"])


def _card(name: str, cfg: Any, meta: dict) -> str:
    what = {"vae": "a FlatDINO laminator (beta-VAE): frozen DINOv2 patch features -> a few 1-D latent tokens "
                   "and back", "dit": "a LightningDiT flow-matching generator of latents",
            "decoder": "an RAE-style pixel decoder: encoder features -> pixels"}[cfg.stage]
    option = {"vae": "--vae", "dit": "--dit", "decoder": "--decoder"}[cfg.stage]
    params = ", ".join(f"{k} {v:,}" for k, v in meta["parameters"].items())
    metrics = meta["metrics"]
    lines = [
        "---", f"library_name: {LIBRARY}", "tags: [flatdino, dinov2, flow-matching]", "---", "",
        f"# {name}", "", f"This is {what}, exported from a flatdino {cfg.stage} run.", "",
        f"- architecture: `{meta['architecture']}` ({params} parameters)",
        f"- weights: `{meta['weights']['source']}` of the run (EMA: {meta['weights']['ema']}), "
        f"sha256 `{meta['weights']['sha256'][:16]}...`",
        f"- trained {meta['step']} of {meta['planned_steps'] or '?'} optimizer steps", "",
        "## How it was made", "", "```", meta["command"], "```", "",
        "`config.yaml` in this folder is the resolved config; `inputs.json` the provenance of the data.", "",
        "## Metrics", "",
    ]
    shown = {"last training row": metrics["last_train"], "best validation": metrics["best_val"]}
    for title, row in shown.items():
        if row:
            lines.append(f"- {title} (step {row['step']}): " + ", ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, float)))
    lines += ["", "## How to load it", "", "```",
              "flatdino info hf:ORG/NAME            # after `hf download ORG/NAME`, or a local folder",
              f"flatdino sample ... {option} hf:ORG/NAME   # any {option} option takes this folder or hf: name",
              "```", "", "In Python: `flatdino_cli.runs.load_run(folder, \"" + cfg.stage + "\")` returns "
              "(config, eval-mode model, weights sha256).", ""]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the run's weights as a Hugging Face model folder at `out` (built aside, then renamed)."""
    run_dir, out = Path(run_dir), Path(out)
    if is_export(run_dir):
        raise UserError(f"{run_dir}: is already an exported folder; copy it instead")
    cfg = run_config(run_dir)
    weights = weights_file(run_dir, cfg.stage)
    if out.exists() and (not overwrite or not is_export(out)):
        raise UserError(f"{out}: exists; pick a new folder" + (" or pass --overwrite" if is_export(out) else ""))
    inputs = run_inputs(run_dir)
    summary = run_summary(run_dir)
    built = build_arch_name(cfg)
    meta = {
        "library_name": LIBRARY, "stage": cfg.stage, "architecture": built,
        "parameters": count_parameters(cfg), "model": to_dict(cfg.model), "config": to_dict(cfg),
        "weights": {"source": str(weights.relative_to(run_dir)), "ema": weights.name.startswith("ema"),
                    "sha256": sha256_file(weights)},
        "step": summary["step"], "planned_steps": summary["planned_steps"],
        "metrics": {k: summary[k] for k in ("last_train", "best_val", "last_val")},
        "command": train_command(cfg.stage, inputs),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        shutil.copyfile(weights, tmp / WEIGHTS)  # byte copy: the sha256 (provenance checks) is unchanged
        atomic_write_json(tmp / CONFIG_JSON, meta)
        save_config(cfg, tmp / "config.yaml")
        atomic_write_json(tmp / "inputs.json", _portable(inputs))
        if (run_dir / STATS_FILE).is_file():
            shutil.copyfile(run_dir / STATS_FILE, tmp / STATS_FILE)
        atomic_write_text(tmp / CARD, _card(run_dir.name, cfg, meta))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "stage": cfg.stage, "step": meta["step"], "weights": meta["weights"],
            "files": sorted(p.name for p in out.iterdir())}


def build_arch_name(cfg: Any) -> str:
    """The model class build_model makes for this config (built on the meta device: instant)."""
    with torch.device("meta"):
        return type(build_model(cfg)).__name__

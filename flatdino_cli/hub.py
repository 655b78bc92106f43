"""Runs that travel as Hugging Face model folders: `flatdino export RUN OUT`, and `hf:ORG/NAME[@REV]`.

An exported folder holds model.safetensors (a byte copy of the weights the run is read from: the VAE's
best checkpoint, the EMA of a DiT / pixel decoder), config.json (the resolved config, the
architecture, parameter counts, step and metrics), README.md (the model card), config.yaml (the same
config in the form flatdino reads), inputs.json (the run's provenance, without this machine's paths)
and, for a DiT that normalises its inputs, stats.pt. Every option that takes a run (--vae, --dit,
--decoder) takes such a folder, or `hf:ORG/NAME[@REV]`: a repository in the local Hugging Face cache.
Nothing is downloaded here: a repository missing from the cache is a one-line error naming the
`hf download` command that fetches it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from flatdino_cli.errors import UserError

LIBRARY = "flatdino"
WEIGHTS, CONFIG_JSON, CARD = "model.safetensors", "config.json", "README.md"
LOCAL_PATH_KEYS = ("path", "vae_run", "features", "images")  # provenance that only means something here
_STAGE_FLAGS = (("features", "--features"), ("images", "--images"), ("latents", "--latents"))


def is_export(path: str | Path) -> bool:
    """An exported model folder (weights + config.json, no training checkpoints)."""
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / CONFIG_JSON).is_file() and not (p / "checkpoints").exists()


# ----------------------------------------------------------------------------- hf:ORG/NAME[@REV]
def parse_ref(text: str) -> tuple[str, str | None] | None:
    """'hf:ORG/NAME@REV' -> ('ORG/NAME', 'REV'); None when `text` is not an hf: reference."""
    if not text.startswith("hf:"):
        return None
    repo, _, rev = text[3:].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{text}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, rev or None


def download_command(repo: str, rev: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {rev}" if rev else "")


def resolve(value: Any) -> Any:
    """An hf: reference -> its snapshot folder in the local HF cache; any other value unchanged."""
    ref = parse_ref(str(value)) if value is not None else None
    if ref is None:
        return value
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, rev = ref
    try:  # the cache only: never a network round-trip, so offline fails at once
        folder = Path(snapshot_download(repo, revision=rev, local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserError(f"{value}: not in the local Hugging Face cache; fetch it first with "
                        f"`{download_command(repo, rev)}` (on a machine with internet, then copy the cache)") from None
    if not is_export(folder):
        raise UserError(f"{value}: the cached repository ({folder}) is not a flatdino export "
                        f"(needs {WEIGHTS} and {CONFIG_JSON}; make one with `flatdino export RUN OUT`)")
    return folder


# ----------------------------------------------------------------------------- export
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


def run_summary(run_dir: Path) -> dict:
    """Steps done / planned (from the latest checkpoint), last training row, best and last validation row."""
    from flatdino_cli.checkpoint import checkpoint_dir, load_state
    from flatdino_cli.train import read_metrics

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val/loss" in r]
    ckpt = checkpoint_dir(run_dir)
    state = load_state(ckpt / "state.pt") if ckpt is not None else {}
    return {"step": int(state.get("step", 0)), "planned_steps": state.get("total_steps"),
            "checkpoint": str(ckpt) if ckpt else None, "last_train": train[-1] if train else None,
            "best_val": min(val, key=lambda r: r["val/loss"]) if val else None, "last_val": val[-1] if val else None}


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
    from flatdino_cli.config import save_config, to_dict
    from flatdino_cli.models import count_parameters
    from flatdino_cli.runs import run_config, weights_file
    from flatdino_cli.sample import run_inputs
    from flatdino_cli.models.stats import STATS_FILE
    from flatdino_cli.utils import atomic_write_json, atomic_write_text, sha256_file

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
    import torch

    from flatdino_cli.models import build_model

    with torch.device("meta"):
        return type(build_model(cfg)).__name__

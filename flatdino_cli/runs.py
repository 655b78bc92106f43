"""Reading trained run directories back: config + a checkpoint -> an eval-mode model (which
weights: checkpoint.weights_file), file and store identities, and a run's summary. The run dir's own
files are read through rundir.py; other projects' files (RAE's checkpoints, diffusers folders) in interop/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatdino_cli.checkpoint import checkpoint_dir, load_into, load_state, load_weights, verify_file, weights_file
from flatdino_cli.interop import diffusers as rae_folder
from flatdino_cli.models import build_model
from flatdino_cli.rundir import is_run_dir, read_metrics, run_config
from flatdino_cli.utils import read_json, sha256_file


def load_run(run_dir: str | Path, expect_stage: str, device: torch.device | str = "cpu",
             prefer_ema: bool | None = None, which: str | None = None) -> tuple[Any, nn.Module, str]:
    """(stage config, eval-mode model on device, sha256 of the weights file); `which`: a checkpoint
    folder other than the default one (weights_file)."""
    cfg = run_config(run_dir, expect_stage)
    path = weights_file(run_dir, expect_stage, prefer_ema, which)
    sha = verify_file(path)  # damaged bytes are refused, not sampled with
    model = build_model(cfg)
    load_into(model, load_weights(path), path)
    model.requires_grad_(False).eval().to(device)
    return cfg, model, sha


# ============================================================================ identities
def file_identity(path: Path) -> dict:
    """Path and content hash; an AutoencoderRAE folder is known by its weights file's hash."""
    data = rae_folder.weights_path(path) if rae_folder.is_rae_folder(path) else path
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(data)}


def decoder_identity(decoder: str | Path) -> dict:
    """{"path": what the user named, "weights": the file read, "sha256": its hash}."""
    w = decoder_weights_path(decoder)
    return {"path": str(Path(decoder).resolve()), "weights": str(w.resolve()), "sha256": verify_file(w)}


def decoder_weights_path(decoder: str | Path) -> Path:
    """The file load_decoder reads for `decoder` (run dir -> EMA weights, RAE release dir -> model.pt)."""
    p = Path(decoder)
    if rae_folder.is_rae_folder(p):
        return rae_folder.weights_path(p)
    if p.is_dir() and is_run_dir(p):
        return weights_file(p, "decoder", prefer_ema=True)
    return p / "model.pt" if p.is_dir() else p


def store_manifest(path: str | None) -> dict:
    """The manifest.json of the store at `path` ({} when there is none)."""
    return read_json(Path(path) / "manifest.json") if path else {}


def run_summary(run_dir: Path) -> dict:
    """Steps done / planned (from the latest checkpoint), last training row, best and last validation row."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val/loss" in r]
    ckpt = checkpoint_dir(run_dir)
    state = load_state(ckpt / "state.pt") if ckpt is not None else {}
    return {"step": int(state.get("step", 0)), "planned_steps": state.get("total_steps"),
            "checkpoint": str(ckpt) if ckpt else None, "last_train": train[-1] if train else None,
            "best_val": min(val, key=lambda r: r["val/loss"]) if val else None, "last_val": val[-1] if val else None}

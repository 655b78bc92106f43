"""Reading trained run directories back: config.yaml + a checkpoint -> an eval-mode model.

Which weights: the VAE uses its best-validation checkpoint when there is one (as the authors do);
the DiT and the pixel decoder use the EMA weights of the latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatdino_cli.config import load_config
from flatdino_cli.errors import UserError
from flatdino_cli.hub import WEIGHTS as EXPORT_WEIGHTS
from flatdino_cli.hub import is_export
from flatdino_cli.models import build_model
from flatdino_cli.train import checkpoint_dir, load_into, load_weights
from flatdino_cli.utils import sha256_file

_STAGE_NAMES = {"vae": "train-vae", "dit": "train-dit", "decoder": "train-decoder"}


def run_config(run_dir: str | Path, expect_stage: str | None = None) -> Any:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        hint = f" (make one with `flatdino {_STAGE_NAMES[expect_stage]}`)" if expect_stage else ""
        raise UserError(f"{run_dir}: not a flatdino run directory (no config.yaml){hint}")
    cfg = load_config(run_dir / "config.yaml")
    if expect_stage and cfg.stage != expect_stage:
        raise UserError(f"{run_dir}: is a {cfg.stage} run, expected a {expect_stage} run")
    return cfg


def weights_file(run_dir: str | Path, stage: str, prefer_ema: bool | None = None) -> Path:
    """The checkpoint file a run is read from (see module docstring)."""
    run_dir = Path(run_dir)
    if is_export(run_dir):  # a Hugging Face model folder from `flatdino export`: its one weights file
        return run_dir / EXPORT_WEIGHTS
    if prefer_ema is None:
        prefer_ema = stage != "vae"
    order = ("best", "latest") if stage == "vae" else ("latest",)
    for which in order:
        d = checkpoint_dir(run_dir, which)
        if d is not None:
            ema = d / "ema.safetensors"
            return ema if prefer_ema and ema.is_file() else d / "model.safetensors"
    raise UserError(f"{run_dir}: has no checkpoint yet; train it first (rerun the train command to resume)")


def load_run(run_dir: str | Path, expect_stage: str, device: torch.device | str = "cpu",
             prefer_ema: bool | None = None) -> tuple[Any, nn.Module, str]:
    """(stage config, eval-mode model on device, sha256 of the weights file)."""
    cfg = run_config(run_dir, expect_stage)
    path = weights_file(run_dir, expect_stage, prefer_ema)
    model = build_model(cfg)
    load_into(model, load_weights(path), path)
    model.requires_grad_(False).eval().to(device)
    return cfg, model, sha256_file(path)

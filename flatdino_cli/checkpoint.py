"""Checkpoint I/O: the run dir's checkpoints/{latest,best}/ folders, weight files, and which of them
(and which config.yaml) a run is read from.

Weights are read from .safetensors or from .pt/.pth with weights_only=True (a pickled object is refused,
never executed); a folder is written through a temporary directory and renames, so a kill never leaves
a broken one. Models, losses and the training loop all load through here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flatdino_cli.config import load_config
from flatdino_cli.errors import UserError
from flatdino_cli.hub import WEIGHTS as EXPORT_WEIGHTS
from flatdino_cli.hub import is_export
from flatdino_cli.utils import disk_full_is_user_error


def checkpoint_dir(run_dir: Path, which: str = "latest") -> Path | None:
    """The checkpoint directory to read, falling back to the one a killed rename left behind."""
    base = Path(run_dir) / "checkpoints"
    for name in (which, f".old-{which}"):
        d = base / name
        if (d / "state.pt").is_file() and (d / "model.safetensors").is_file():
            return d
    return None


def _state_to_cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(run_dir: Path, which: str, model: nn.Module, ema: nn.Module | None, state: dict) -> Path:
    """Write checkpoints/<which>/ through a temporary directory and renames (never a broken one)."""
    base = Path(run_dir) / "checkpoints"
    base.mkdir(parents=True, exist_ok=True)
    tmp, final, old = base / f".tmp-{which}", base / which, base / f".old-{which}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = _state_to_cpu(model.state_dict())
    needed = sum(t.numel() * t.element_size() for t in weights.values()) * (2 if ema is not None else 1)
    try:
        with disk_full_is_user_error(tmp, needed * 2):  # weights + EMA, and AdamW's two moments in state.pt
            save_file(weights, str(tmp / "model.safetensors"))
            if ema is not None:
                save_file(_state_to_cpu(ema.state_dict()), str(tmp / "ema.safetensors"))
            torch.save(state, tmp / "state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the one to resume from
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict:
    """state.pt with weights_only=True: a pickled arbitrary object is refused, never executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends
        raise UserError(f"{path}: refused to load (not a plain tensor checkpoint: {type(e).__name__}); "
                        "it may be corrupt or unsafe") from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pt/.pth loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    sd = load_state(path)
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], source: Path | str) -> None:
    """load_state_dict(strict=True), with a one-line error naming the file on mismatch."""
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        missing = [k for k in module.state_dict() if k not in sd][:3]
        unexpected = [k for k in sd if k not in module.state_dict()][:3]
        detail = f"missing {missing}, unexpected {unexpected}" if missing or unexpected else str(e).splitlines()[-1].strip()
        raise UserError(f"{source}: weights do not fit this model ({detail}); check the preset/run it came from") from None


# ----------------------------------------------------------------------------- which weights a run is read from
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
    """The checkpoint file a run is read from: the VAE's best-validation checkpoint when there is one (as
    the authors do), the EMA weights of the latest checkpoint for the DiT and the pixel decoder."""
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

"""Checkpoint I/O: the run dir's checkpoints/{latest,best}/ folders, weight files, and which of them
a run is read from (its config.yaml: rundir.py).

Weights are read from .safetensors or from .pt/.pth with weights_only=True (a pickled object is refused,
never executed); a folder is written through a temporary directory and renames, so a kill never leaves
a broken one. Each checkpoint folder records the sha256 of its files (checksums.json), checked before a
run resumes from it or a command samples with it, so damaged bytes are refused instead of loaded.
Models, losses and the training loop all load through here.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flatdino_cli.errors import UserError
from flatdino_cli.hub import WEIGHTS as EXPORT_WEIGHTS
from flatdino_cli.hub import is_export
from flatdino_cli.utils import atomic_write_json, disk_full_is_user_error, read_json, sha256_file


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
            atomic_write_json(tmp / CHECKSUMS, {f.name: sha256_file(f) for f in sorted(tmp.iterdir())})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the one to resume from
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


CHECKSUMS = "checksums.json"  # {file name: sha256} of a checkpoint folder's files, written with them
_unverified_warned: set[Path] = set()


def _recorded(folder: Path, warn: bool) -> dict | None:
    """The folder's checksums.json, or None (with a one-time warning) for a checkpoint written before
    checksums were recorded."""
    record = read_json(folder / CHECKSUMS)
    if record or not (folder / "state.pt").is_file():  # only run checkpoints record checksums
        return record or None
    if warn and folder.resolve() not in _unverified_warned:
        _unverified_warned.add(folder.resolve())
        warnings.warn(f"{folder}: no checksums recorded (written by an older flatdino); loaded without "
                      "verifying its bytes", stacklevel=3)
    return None


def verify_file(path: Path, digest: str | None = None, warn: bool = True) -> str:
    """sha256 of `path` (`digest` if the caller already has it), refused with a one-line UserError when it
    differs from the one recorded when its checkpoint was written."""
    path = Path(path)
    digest = digest or sha256_file(path)
    want = (_recorded(path.parent, warn) or {}).get(path.name)
    if want is not None and want != digest:
        raise UserError(f"{path}: its bytes changed since it was written (sha256 {digest[:12]}..., recorded "
                        f"{want[:12]}... in {CHECKSUMS}): a disk or copy error; restore the file from a copy "
                        "(or use another checkpoint) rather than load wrong weights")
    return digest


def verify_checkpoint(folder: Path, warn: bool = True) -> None:
    """Every file a checkpoint folder recorded, checked (what a resumed run reads)."""
    for name in _recorded(folder, warn) or {}:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing (listed in {CHECKSUMS}); restore it from a copy")
        verify_file(folder / name, warn=warn)


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
def kept_checkpoint(step: int) -> str:
    """The name of the checkpoint train.keep_every_steps keeps at `step`."""
    return f"step-{step:07d}"


def kept_checkpoints(run_dir: str | Path) -> list[str]:
    """The kept checkpoints of a run (train.keep_every_steps), oldest first."""
    base = Path(run_dir) / "checkpoints"
    names = sorted(d.name for d in base.glob("step-*") if d.is_dir()) if base.is_dir() else []
    return [n for n in names if checkpoint_dir(Path(run_dir), n) is not None]


def weights_file(run_dir: str | Path, stage: str, prefer_ema: bool | None = None, which: str | None = None) -> Path:
    """The checkpoint file a run is read from: the VAE's best-validation checkpoint when there is one (as
    the authors do), the EMA weights of the latest checkpoint for the DiT and the pixel decoder; `which`
    names another checkpoint folder (a kept step-NNNNNNN)."""
    run_dir = Path(run_dir)
    if is_export(run_dir):  # a Hugging Face model folder from `flatdino export`: its one weights file
        return run_dir / EXPORT_WEIGHTS
    if prefer_ema is None:
        prefer_ema = stage != "vae"
    order = (which,) if which else ("best", "latest") if stage == "vae" else ("latest",)
    for name in order:
        d = checkpoint_dir(run_dir, name)
        if d is not None:
            ema = d / "ema.safetensors"
            return ema if prefer_ema and ema.is_file() else d / "model.safetensors"
    if which:
        have = (["latest"] if checkpoint_dir(run_dir) else []) + kept_checkpoints(run_dir)
        raise UserError(f"{run_dir}: has no checkpoint {which} (it has: {', '.join(have) or 'none yet'})")
    raise UserError(f"{run_dir}: has no checkpoint yet; train it first (rerun the train command to resume)")

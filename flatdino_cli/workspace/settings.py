"""The workspace's few defaults, `.flatdino/settings.json`, which `flatdino workspace set` configures."""

from __future__ import annotations

from pathlib import Path

from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_json, read_json
from flatdino_cli.workspace.paths import root

SETTINGS_FILE = ".flatdino/settings.json"
SETTINGS = {
    "decoder": "pixel decoder for sample and reconstruct (a train-decoder run or RAE's model.pt)",
    "encoder-weights": "local DINOv2 weights for extract / train-vae / train-decoder",
    "inception-weights": "clean-fid's inception-2015-12-05.pt for fid",
    "reference-batch": "fid's reference (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)",
}


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

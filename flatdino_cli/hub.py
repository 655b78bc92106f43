"""Runs that travel as Hugging Face model folders: the folder format and `hf:ORG/NAME[@REV]` references
(export.py writes the folders).

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

from pathlib import Path
from typing import Any

from flatdino_cli.errors import UserError

WEIGHTS, CONFIG_JSON = "model.safetensors", "config.json"


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
    from huggingface_hub import snapshot_download  # startup
    from huggingface_hub.errors import LocalEntryNotFoundError  # startup

    repo, rev = ref
    try:  # the cache only: never a network round-trip, so offline fails at once
        folder = Path(snapshot_download(repo, revision=rev, local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserError(f"{value}: not in the local Hugging Face cache; fetch it first with "
                        f"`{download_command(repo, rev)}` (on a machine with internet, then copy the cache)") from None
    from flatdino_cli.interop.diffusers import is_rae_folder  # startup

    if not is_export(folder) and not is_rae_folder(folder):  # RAE's diffusers releases are read too
        raise UserError(f"{value}: the cached repository ({folder}) is not a flatdino export "
                        f"(needs {WEIGHTS} and {CONFIG_JSON}; make one with `flatdino export RUN OUT`)")
    return folder

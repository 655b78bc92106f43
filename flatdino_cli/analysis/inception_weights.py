"""Where the Inception weights file is (never downloading it).

Apart from inception.py so that it needs no torch: `flatdino fid` reports a missing file in about a
second, before torch loads.
"""

from __future__ import annotations

from pathlib import Path

from flatdino_cli.errors import UserError
from flatdino_cli.utils import user_cache_dir

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path` (a file, or a folder holding INCEPTION_FILE), else the user's cache
    (user_cache_dir(), not clean-fid's /tmp: a file there could have been put by anyone)."""
    if path is not None:
        p = Path(path).expanduser()
        p = p / INCEPTION_FILE if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"--inception-weights {path}: no such file (clean-fid's torchscript "
                            f"{INCEPTION_FILE}, from {INCEPTION_URL})")
        return p
    p = user_cache_dir() / INCEPTION_FILE
    if not p.is_file():
        raise UserError(f"Inception weights not found: pass --inception-weights FILE or put {INCEPTION_FILE} "
                        f"at {p} (download it from {INCEPTION_URL}; nothing is downloaded here)")
    return p

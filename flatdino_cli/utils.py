"""Small file helpers: atomic writes and content hashes (nothing a user has is ever half-written)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """The one atomic writer: `write(f)` fills a temp file in the same directory, which is renamed
    over `path`, so a kill never leaves a half-written file under the real name.

    Files get the mode a plain open() would give (0666 minus the umask, so 0644 usually), not
    mkstemp's owner-only 0600. fsync policy: `durable=True` (default; manifests, configs, checkpoints,
    results) fsyncs before the rename, so a power cut leaves the old or the new file. `durable=False`
    is for many small regenerable files (PNGs): no fsync, so a power cut may lose the newest ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), durable)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_strings(items) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(str(s).encode())
        h.update(b"\0")
    return h.hexdigest()

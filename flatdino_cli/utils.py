"""Small file helpers: atomic writes and content hashes (nothing a user has is ever half-written)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from flatdino_cli.errors import UserError


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


def read_json(path: Path) -> dict:
    """A JSON record (inputs.json, a store's manifest.json); {} when it is missing, unreadable or not an
    object, so a copied or hand-made run still loads."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def run_once(markers: Path, name: str, fn: Callable[[], dict], prefix: str = "") -> dict:
    """fn()'s result, recorded in markers/NAME.json with its seconds; when that file exists, the recorded
    result without running fn again (a rerun of a multi-stage command skips its finished stages)."""
    from tqdm import tqdm  # startup

    marker = Path(markers) / f"{name}.json"
    if marker.exists():
        tqdm.write(f"{prefix}{name}: done earlier, skipped")
        return json.loads(marker.read_text())
    tqdm.write(f"{prefix}{name} ...")
    t0 = time.perf_counter()
    result = {**fn(), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(marker, result)
    return result


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


def user_cache_dir(*parts: str) -> Path:
    """$XDG_CACHE_HOME/flatdino/... (default ~/.cache/flatdino/...): the user's own cache, never a
    shared world-writable folder such as /tmp, where another user could plant a file."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "flatdino", *parts)


def check_out_dir(path: Path, option: str = "--out") -> None:
    """Refuse, before anything is written, an output folder that is a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; choose another {option}")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: cannot create this folder ({parent} is a file); choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot create this folder ({parent} is not writable); "
                        f"choose another {option}")


def ensure_dir(path: Path, option: str = "--out") -> Path:
    """Create folder `path` (and parents), or a one-line UserError naming the option."""
    path = Path(path)
    check_out_dir(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot create this folder ({e.strerror}); choose another {option}") from None
    return path


@contextlib.contextmanager
def disk_full_is_user_error(path: Path, needed_bytes: int):
    """Turn a write that failed for lack of space into one line: the file, the space needed and free.

    Some writers do not say ENOSPC (torch.save reports a short write as "unexpected pos"), so a failed
    write with less free space than `needed_bytes` counts as disk full too.
    """
    try:
        yield
    except Exception as e:
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        full = (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
                or free < needed_bytes)
        if not full:
            raise
        raise UserError(f"{path}: disk full while writing (needs about {needed_bytes / 1e6:.1f} MB, "
                        f"{free / 1e6:.1f} MB free); free some space and rerun the same command to resume") from None


def comma_list(text: str, option: str, cast: Callable = str, allow_empty: bool = False) -> list:
    """'10,20,100' -> [10, 20, 100] (each item stripped and cast; empty items dropped); a one-line
    UserError naming `option` for an item `cast` refuses, or for no items unless allow_empty."""
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. 10,20,100") from None
    if not values and not allow_empty:
        raise UserError(f"{option}: give at least one value")
    return values


def grid_side(num_tokens: int, where: str = "the features") -> int:
    """Side of the square token grid of `num_tokens` (16 for DINOv2-B at 224 px, 6 for `tiny`); a
    UserError naming `where` when the tokens do not form one."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise UserError(f"{where}: {num_tokens} tokens do not form a square grid")
    return side


def disk_use(path: Path) -> int:
    """Bytes of a file, or of every file below a folder (links not followed; vanished files skipped)."""
    if not Path(path).is_dir():
        return Path(path).stat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""

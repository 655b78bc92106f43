"""One writer per run dir or store: FOLDER/.lock, an flock()ed file naming its holder.

The kernel drops an flock when its process dies, however it dies, so a lock left by a killed
process is free to take (its file still names the old holder, which is reported as taken over).
The file records pid, host and start time so a refused second writer can say who holds the folder.
Readers (sample, analyses, resuming from another folder) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from tqdm import tqdm

from flatdino_cli.errors import UserError
from flatdino_cli.utils import ensure_dir

LOCK_NAME = ".lock"


def _holder_text(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('started', '?')}"


def _read(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class FolderLock:
    """Context manager: hold `folder`'s writer lock (creating the folder) or raise a one-line UserError."""

    def __init__(self, folder: str | Path, what: str = "folder", option: str = "--out"):
        self.folder, self.what, self.option = Path(folder), what, option
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        ensure_dir(self.folder, self.option)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise UserError(f"{self.folder}: this {self.what} is in use by another flatdino process "
                                f"({_holder_text(holder)}); wait for it to finish, or use another folder") from None
            try:  # the holder we waited on may have removed the file: lock the file that is there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read(fd)
        if old.get("pid") not in (None, os.getpid()):
            tqdm.write(f"{self.folder}: took over a stale lock ({_holder_text(old)}; that process is gone)")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # unlink while still holding it: nobody locks a dead file
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

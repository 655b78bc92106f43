"""Run the flatdino CLI, sending itself signal $SIGNAL_IN_SAVE (SIGTERM, SIGKILL) in the middle of the
first checkpoint write that replaces an existing checkpoint: its weights written, its state.pt not yet.
The same moment on any machine, so a test can land a signal inside a write without a race."""

import os
import signal
import sys
from pathlib import Path

import flatdino_cli.checkpoint as checkpoint

sig = getattr(signal, os.environ["SIGNAL_IN_SAVE"])
save_file = checkpoint.save_file


def signalling(tensors, filename, *a, **k):
    out = save_file(tensors, filename, *a, **k)
    tmp = Path(filename).parent  # checkpoints/.tmp-<which>/
    if Path(filename).name == "model.safetensors" and (tmp.parent / tmp.name.removeprefix(".tmp-")).exists():
        checkpoint.save_file = save_file  # once
        os.kill(os.getpid(), sig)
    return out


checkpoint.save_file = signalling

from flatdino_cli.cli import app  # noqa: E402

sys.argv = ["flatdino", *sys.argv[1:]]
app()

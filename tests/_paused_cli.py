"""Run the flatdino CLI, pausing after its first checkpoint (writes $PAUSE_READY, waits for $PAUSE_GO):
a real writer process that provably holds its run dir while a test starts a second one."""

import os
import sys
import time
from pathlib import Path

import flatdino_cli.train as train

ready, go = Path(os.environ["PAUSE_READY"]), Path(os.environ["PAUSE_GO"])
save_checkpoint = train.save_checkpoint


def paused(*a, **k):
    out = save_checkpoint(*a, **k)
    if not ready.exists():
        ready.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.05)
    return out


train.save_checkpoint = paused

from flatdino_cli.cli import app  # noqa: E402

sys.argv = ["flatdino", *sys.argv[1:]]
app()

"""Experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases (`--log-to`, repeatable).

Both libraries are optional (`pip install "flatdino[track]"`) and imported only when asked for. Only
rank 0 logs. A resumed run continues the same tracker run: TensorBoard appends to RUN/tensorboard/
and drops events after the checkpoint's step (as metrics.jsonl does); W&B reuses the run id kept in
RUN/tracking.json, and writes under RUN/wandb/ (offline with WANDB_MODE=offline, then `wandb sync`).
A run started from step 0 (new, or --no-resume) starts a new W&B run and overwrites TensorBoard's steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_json
from flatdino_cli.viz import load_png

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log-to name -> the package it needs
TB_DIR = "tensorboard"
STATE_FILE = "tracking.json"


def check_available(names: tuple[str, ...] | list[str]) -> None:
    """A one-line error naming the extra for an unknown tracker or a missing library (on every rank)."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--log-to {name}: unknown tracker; use {' or '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"--log-to {name}: the {TRACKERS[name]} package is not installed; "
                            f"pip install \"flatdino[track]\" (or pip install {TRACKERS[name]})")


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists and None as strings (hparams take scalars)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # optional
        from torch.utils.tensorboard.summary import hparams  # optional

        # purge_step drops what a killed run logged after its last checkpoint (all steps on a fresh start)
        self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=resume_step + 1)
        if not resume_step:  # the hyper-parameters once, in this run (not add_hparams' extra sub-run)
            for summary in hparams(flat_config(config), {"loss": 0.0, "val/loss": 0.0}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")
        self.writer.flush()

    def scalars(self, step: int, row: dict[str, float]) -> None:
        for k, v in row.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps what it logged

    def image(self, tag: str, path: Path, step: int) -> None:
        self.writer.add_image(tag, load_png(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, resume_step: int):
        import wandb  # optional

        state_path = run_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if "wandb_id" not in state or not resume_step:  # a fresh start (--no-resume) is a new W&B run
            state["wandb_id"] = secrets.token_hex(4)  # W&B run ids are short [a-z0-9] strings
            atomic_write_json(state_path, state)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flatdino"), name=run_dir.name,
                              id=state["wandb_id"], resume="allow", dir=str(run_dir), config=config)

    def scalars(self, step: int, row: dict[str, float]) -> None:
        self.run.log(row, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: tuple[str, ...] | list[str], run_dir: Path, config: dict, resume_step: int,
                  is_main: bool) -> list:
    """The trackers asked for, opened on rank 0 (other ranks only check the libraries are there)."""
    check_available(names)
    if not is_main:
        return []
    kinds = {"tensorboard": TensorBoard, "wandb": WandB}
    return [kinds[name](Path(run_dir), config, resume_step) for name in dict.fromkeys(names)]

"""What every train-* command does before its stage runs: the preset with its overrides, the stage
check, the inputs, the run dir and the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flatdino_cli.config_yaml import load_preset
from flatdino_cli.errors import UserError
from flatdino_cli.runtime import setup_runtime
from flatdino_cli.utils import check_out_dir
from flatdino_cli.workspace.paths import run_dir


@dataclass(frozen=True)
class TrainRequest:
    """The options all three train-* commands take (`flatdino train-vae --help`)."""

    preset: str
    out: Path | None = None
    sets: tuple[str, ...] = ()  # --set key=value
    epochs: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    log_to: tuple[str, ...] = ()
    device: str = "auto"
    precision: str = "auto"
    compile: bool | None = None
    resume: bool = True
    new_data: bool = False

    def __post_init__(self):  # the command line gives None or a list for a repeatable option
        object.__setattr__(self, "sets", tuple(self.sets or ()))
        object.__setattr__(self, "log_to", tuple(self.log_to or ()))

    def overrides(self) -> list[str]:
        """--set items, then the shortcut options given (--epochs, --batch-size, --seed, --log-to a --log-to b)."""
        shortcuts = {"train.epochs": self.epochs, "train.batch_size": self.batch_size, "train.seed": self.seed,
                     "train.log_to": f"[{', '.join(self.log_to)}]" if self.log_to else None}
        return [*self.sets, *(f"{k}={v}" for k, v in shortcuts.items() if v is not None)]


def start_training(train: TrainRequest, command: str, stage: str, wanted: str, pick: Callable | None = None,
                   shape: Callable | None = None):
    """The preset with its overrides, the stage check, the inputs `pick(cfg)` resolves (in the
    workspace), the config `shape(cfg, picked)` fits to them (so the workspace resumes the run whose
    recorded config is that), the run dir (--out or the workspace's), the out-dir check, the runtime.
    Returns (cfg, picked, out, rt)."""
    cfg = load_preset(train.preset, train.overrides())
    if cfg.stage != stage:
        raise UserError(f"--preset {train.preset}: is a {cfg.stage} preset; {command} needs {wanted}")
    picked = pick(cfg) if pick is not None else None
    cfg = shape(cfg, picked) if shape is not None else cfg
    out = run_dir(command, train.out, stage, train.preset, cfg)
    check_out_dir(out)
    return cfg, picked, out, setup_runtime(train.device, train.precision, train.compile)

"""What the command groups share: option types used by several groups, and the runtime set-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def ModelOption(help: str):  # noqa: N802 - used as a type, like the aliases below
    """The type of an optional model option (None when not given) with its help text: --dit, --vae,
    --decoder, --guide (a run or a model file, which one_line_errors also resolves from an export folder
    or hf:ORG/NAME) and --stats, declared once for every command that takes one."""
    return Annotated[Optional[Path], typer.Option(help=help)]


SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config value, dotted and type-checked: --set train.lr=1e-4 (repeatable).")]
Device = Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda, cuda:1.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")]
# the measuring commands (sample, reconstruct, ablate-tokens, pca, noise) run in fp32 unless asked, as the
# authors' rFID and our FID protocol do: one default, so no number silently comes from bf16
MeasurePrecision = Annotated[str, typer.Option(help="fp32 (default: what measured numbers assume), bf16 or auto.")]


def runtime(device: str, precision: str, compile: Optional[bool]):
    from flatdino_cli.runtime import setup_runtime  # heavy: torch

    return setup_runtime(device, precision, compile)

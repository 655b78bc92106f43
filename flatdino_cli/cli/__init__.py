"""The `flatdino` command line: the Typer app, its commands in --help order, the error wrapper they share.

One thin function per command (parse -> config -> call), in a module per command group: train (the
three stages), data (toy-data, extract), generate (sample and its measures), analysis (the paper's
analyses), manage (presets, workspace, export, info, quickstart); common holds the options several
groups share. Heavy imports happen inside the commands so that `flatdino --help` is instant.
"""

from __future__ import annotations

import errno
import functools
import os
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from flatdino_cli import __version__, preempt
from flatdino_cli.cli import analysis, data, generate, manage, train
from flatdino_cli.cpu import apply_cpu_defaults
from flatdino_cli.errors import UserError
from flatdino_cli.hub import resolve as resolve_model_ref

app = typer.Typer(
    name="flatdino",
    help="FlatDINO: laminate frozen DINOv2 features into 32 tokens, train flow-matching DiTs on them, "
         "decode to pixels.\n\nFirst run: `flatdino quickstart` (toy data, CPU, minutes). "
         "Every command has --help with an example.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (measured: no start-up cost)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flatdino {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", envvar="FLATDINO_WORKSPACE",
        help="Project folder: where runs/ and stores/ are written and found (default: the current folder).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit. Example: flatdino --version")] = False,
):
    # the environment carries the choice to workspace/paths.root() (and to any process this one starts)
    if workspace is not None:
        os.environ["FLATDINO_WORKSPACE"] = str(workspace)


MODEL_OPTIONS = ("vae", "dit", "decoder", "guide")  # options naming a run: also an export folder or hf:ORG/NAME


_ONE_LINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _warning_line(message, category, *_args, **_kwargs) -> str:
    """Warnings (skipped files, duplicate folders) as one line each, without Python's source echo."""
    return f"flatdino: warning: {message}\n"


def _fail(message: str, code: int) -> None:
    """End the command with `message` on a line of its own (open progress bars closed first)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    typer.echo(message, err=True)
    raise typer.Exit(code) from None


def one_line_errors(fn):
    """`fn` with its UserErrors as one line on stderr and exit code 1 (no traceback), preemption and
    Ctrl-C as the exit codes that say so, and its model options (MODEL_OPTIONS) resolved."""

    @functools.wraps(fn)
    def inner(*a, **k):
        formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line
        try:
            with preempt.handle_signals():
                k = {n: resolve_model_ref(v) if n in MODEL_OPTIONS else v for n, v in k.items()}
                return fn(*a, **k)
        except UserError as e:
            _fail(f"flatdino: error: {e}", 1)
        except preempt.Preempted as e:  # SIGTERM / SIGUSR1: what was finished is saved
            if e.quiet:  # a torchrun rank other than 0: rank 0 says it once
                raise typer.Exit(preempt.PREEMPTED_EXIT) from None
            _fail(e.message, preempt.PREEMPTED_EXIT)
        except KeyboardInterrupt as e:  # a loop that saves as it goes says how far it got (preempt.safe_points)
            _fail(str(e) or "flatdino: interrupted; rerun the same command to resume", preempt.INTERRUPTED_EXIT)
        except OSError as e:  # a full disk or a forbidden folder met by a write no check foresaw
            if e.errno not in _ONE_LINE_ERRNOS:
                raise
            _fail(f"flatdino: error: {e.filename or 'writing'}: {e.strerror}; free some space or fix "
                  "the permissions, then rerun the same command to resume", 1)
        finally:
            warnings.formatwarning = formatwarning

    return inner


# the commands, in the order `flatdino --help` lists them
COMMANDS = {
    "toy-data": data.toy_data,
    "extract": data.extract,
    "train-vae": train.train_vae,
    "train-dit": train.train_dit,
    "flops": analysis.flops,
    "plot": analysis.plot,
    "export": manage.export,
    "info": manage.info,
    "ablate-tokens": analysis.ablate_tokens,
    "pca": analysis.pca,
    "knn": analysis.knn,
    "noise": analysis.noise,
    "redundancy": analysis.redundancy,
    "sample": generate.sample,
    "export-rae": manage.export_rae,
    "reconstruct": generate.reconstruct,
    "train-decoder": train.train_decoder,
    "quickstart": manage.quickstart,
    "fid": generate.fid,
    "eval": generate.eval_,
    "sweep": generate.sweep,
    "compare": manage.compare,
}
for name, fn in COMMANDS.items():
    app.command(name)(one_line_errors(fn))

presets_app = typer.Typer(help="List presets, or show one resolved (`flatdino presets show xl-32x128`).",
                          invoke_without_command=True, rich_markup_mode=None)
app.add_typer(presets_app, name="presets")
workspace_app = typer.Typer(help="List the workspace's runs and stores, or set its defaults.\n\n"
                                 "Example: flatdino workspace; flatdino workspace set decoder rae/model.pt",
                            invoke_without_command=True, rich_markup_mode=None)
app.add_typer(workspace_app, name="workspace")


presets_app.callback()(one_line_errors(manage.presets_list))
presets_app.command("show")(one_line_errors(manage.presets_show))
workspace_app.callback()(one_line_errors(manage.workspace_list))
workspace_app.command("set")(one_line_errors(manage.workspace_set))


def main():  # pragma: no cover - the `flatdino` console script and `python -m flatdino_cli.cli`
    apply_cpu_defaults()  # how OpenMP threads wait (cpu.py): before any command imports torch
    app()

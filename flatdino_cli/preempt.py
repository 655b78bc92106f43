"""Stopping on request: SIGTERM / SIGUSR1 (cluster preemption), Ctrl-C, and the exit code they end with.

Clusters stop a job with SIGTERM (SLURM's `--signal=TERM@120`, Kubernetes, spot instances; SLURM can
be told to send SIGUSR1 instead), then SIGKILL after a grace period. `handle_signals()` (entered
once per command by the CLI) turns them into a `Preempted` exception, raised where the program is,
the way Ctrl-C raises KeyboardInterrupt: finally blocks run and every finished file is kept (all
outputs are written atomically). A loop that can stop cleanly at its own safe points runs inside
`deferred()`: there the signal only sets a flag that the loop reads with `requested()`, finishes what is
in flight, saves, and raises `Preempted` itself: the training loop at a step boundary, and through
`safe_points()` the loops whose finished items are on disk as they go (extract's chunks, sample's
images), which also say how far they got. Every such stop exits with PREEMPTED_EXIT.

A second stop signal while the first one's stop runs is ignored (the save and the clean-up finish; the
cluster's SIGKILL ends it anyway). Ctrl-C keeps its usual behaviour (KeyboardInterrupt, exit 130); a
second Ctrl-C, while the first one's clean-up runs, stops the process at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, state saved; rerun the same command
INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shell's code for Ctrl-C
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class Preempted(BaseException):
    """Stopped by SIGTERM / SIGUSR1. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` swallows it. `message` is the one line to print, starting with the command's name;
    `quiet` for the ranks of a torchrun job other than rank 0 (one line per job, not per process)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.message, self.quiet = message, quiet


class _State:
    signal_name: str | None = None  # the stop signal received, if any (kept for the rest of the process)
    deferring = 0  # > 0 inside deferred(): a stop signal only sets signal_name


_state = _State()


def _on_stop(signum, frame) -> None:
    if _state.signal_name is not None:  # already stopping: let that stop's clean-up finish (torchrun, for
        return  # one, signals the other ranks once a rank has ended, while they still close their logs)
    _state.signal_name = signal.Signals(signum).name
    if not _state.deferring:
        raise Preempted(f"flatdino: stopped by {_state.signal_name}; finished work is kept, rerun the same "
                        "command to continue")


def _hard_exit(signum, frame) -> None:
    os.write(2, b"flatdino: interrupted again; stopped at once\n")
    os._exit(INTERRUPTED_EXIT)


def _on_interrupt(signum, frame) -> None:
    signal.signal(signal.SIGINT, _hard_exit)  # a second Ctrl-C does not wait for the first one's clean-up
    raise KeyboardInterrupt


def worker_ignores_stop(worker_id: int) -> None:
    """DataLoader worker_init_fn: a stop signal sent to every process of the job (SLURM signals the whole
    job step, `kill -TERM -PGID` the process group) is the main process's to act on. Left to torch's own
    worker handler, a SIGTERM from anyone but the parent ends the worker, and the main process's next
    batch fails ("DataLoader worker exited unexpectedly") instead of stopping cleanly. The main process
    still ends its workers as always (they exit on its request, or when it is gone)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def handle_signals():
    """Install the handlers for the duration of one command (and put the previous ones back, so an
    in-process caller such as a test keeps its own). A no-op outside the main thread, where Python
    cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {s: _on_stop for s in STOP_SIGNALS}
    wanted[signal.SIGINT] = _on_interrupt
    previous = {s: signal.signal(s, h) for s, h in wanted.items()}
    _state.signal_name = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.signal_name = None  # the request ended this command; it is not one for the caller's next


@contextlib.contextmanager
def deferred():
    """Inside, SIGTERM / SIGUSR1 only set the flag that `requested()` reads: the loop stops at its next
    safe point. A signal that came before the block is still seen by `requested()`."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


def requested() -> str | None:
    """The stop signal's name (SIGTERM, SIGUSR1) once one has arrived, else None."""
    return _state.signal_name


@contextlib.contextmanager
def safe_points(name: str, total: int, unit: str, done: int = 0):
    """For a loop whose finished items are on disk as it goes: yields `reached(done)`, which the loop calls
    after each item it has saved; there a stop signal (deferred inside the block) raises Preempted, and
    Ctrl-C anywhere in the block becomes a KeyboardInterrupt carrying the same kind of line:
    `NAME: preempted after DONE of TOTAL UNIT, saved; rerun the same command to continue`."""
    at = [done]

    def line(how: str) -> str:
        return f"{name}: {how} after {at[0]:,} of {total:,} {unit}, saved; rerun the same command to continue"

    def reached(n: int) -> None:
        at[0] = n
        if requested() is not None:
            raise Preempted(line("preempted"))

    try:
        with deferred():
            yield reached
    except KeyboardInterrupt as e:
        if e.args:  # an inner block already said how far it got
            raise
        raise KeyboardInterrupt(line("interrupted")) from None

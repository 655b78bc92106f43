"""How many CPU threads a command uses and how they wait: chosen once, when the command starts and
before torch (with it the OpenMP runtime, which reads these variables once) is loaded; a variable the
user set is never changed. Only the `flatdino` entry point (cli.main) applies it: code that imports
flatdino as a library keeps torch's defaults.

- OMP_WAIT_POLICY=PASSIVE: an OpenMP thread that finishes its share of an op sleeps until the next
  one instead of spinning. With libgomp's default spin-wait, a peer descheduled by another busy
  process leaves the others burning their cores for it, and the stage slows many times over.
  Not set where the user chose how threads wait (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME).
- OMP_NUM_THREADS = the idle cores: the usable cores (sched_getaffinity) minus the other runnable
  tasks at start (/proc/loadavg's running count, a snapshot: the 1-minute load average lags a new
  neighbour by a minute and remembers the previous command for as long), at least 1. One thread per
  core that something else keeps busy would run at that process's pace.
  A thread count that follows the load changes float reductions from one run to the next: set
  OMP_NUM_THREADS for CPU runs that must repeat bitwise.

Measured by bench/busy_neighbour.py (one train-vae stage alone and beside a busy process, these
defaults and the old ones in one run); its figures are in the README ("CPU threads").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any one set: the user chose the waiting
CPU_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *WAIT_VARS)  # all the variables that steer torch's CPU threads


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def other_runnable() -> int:
    """Runnable tasks other than this one right now (/proc/loadavg's 4th field, which counts the
    reader too); 0 where the file is missing (not Linux)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    return max(0, running - 1)


def idle_cores(cores: int, busy: int) -> int:
    """Of `cores` usable cores, those that `busy` other runnable tasks leave free: at least 1."""
    return max(1, cores - max(0, busy))


def cpu_defaults(environ: MutableMapping[str, str], cores: int, busy: int) -> dict[str, str]:
    """The variables to add to `environ` (none that it already has): passive waiting unless the user
    chose a wait policy, and one thread per idle core unless OMP_NUM_THREADS is set."""
    add = {}
    if not any(v in environ for v in WAIT_VARS):
        add["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in environ:
        add["OMP_NUM_THREADS"] = str(idle_cores(cores, busy))
    return add


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set cpu_defaults in `environ` (the process's: torch not imported yet); returns what was added."""
    add = cpu_defaults(environ, usable_cores(), other_runnable())
    environ.update(add)
    return add

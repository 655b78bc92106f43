"""How flatdino's CPU threads wait, and how many there are: set when a command starts, before torch
(and with it the OpenMP runtime, which reads these variables once, when it loads) is imported; a
variable the user set is never changed. Only the `flatdino` entry point (cli.main) applies it: code
that imports flatdino as a library keeps torch's defaults.

- OMP_WAIT_POLICY=PASSIVE: an OpenMP thread that has finished its share of an op sleeps until the
  next one instead of spinning. Under libgomp's default (spin 300,000 times first) a peer that a
  busy neighbour process has descheduled keeps the others spinning on their cores, so no core ever
  looks idle to the scheduler, which would otherwise move the waiting peer there: beside one process
  spinning on one of 2 cores a tiny-vae train step went from 0.27 s to 3.3 s. A sleeping thread frees
  its core at once.
  Not set where the user chose how threads wait (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME).
- Threads: torch's default, one per usable core (the process's affinity mask; OMP_NUM_THREADS where
  the user set it). One thread per idle core (the usable cores less the other runnable tasks at
  start) was no faster beside a busy process once waiting is passive (the scheduler moves a waiting
  thread to a core another one left), and a count that followed the load would change float
  reductions from one run to the next.

bench/busy_neighbour.py measures it (a train-vae stage alone and beside a busy process; the old
settings, these defaults and one thread per idle core in one run); its figures are in the README
("Performance").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any one set: the user chose the waiting
CPU_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *WAIT_VARS)  # every variable that steers torch's CPU threads


def cpu_defaults(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ`: passive waiting, unless the user chose how threads wait."""
    return {} if any(v in environ for v in WAIT_VARS) else {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set cpu_defaults in `environ` (the process's, before torch is imported); returns what was added."""
    add = cpu_defaults(environ)
    environ.update(add)
    return add

"""A busy neighbour: one training stage's step time alone and beside a busy process, for the old CPU
settings and today's defaults, side by side in one run.

The stage is `flatdino train-vae` (the quickstart's tiny-vae laminator, fp32, batch 32) on a random
feature store of the tiny encoder's shape (36 patches x 64), run as its own process through the CLI
entry point, so it starts with exactly the thread count and OpenMP wait policy a user's run gets.
Its step time is read off metrics.jsonl (batch / samples_per_s of each logging window, the first
window, which holds the warm-up, dropped; the median of the rest). Each setting runs alone ("quiet")
and beside a neighbour ("loaded": a Python process spinning on one core, like a busy browser tab, or
with --neighbour matmul a one-thread torch matmul loop) that starts 2 s before the stage, a quiet run
and then a loaded one, every setting in turn, --repeats times. Printed per run: the step time, the
threads and wait the stage started with, and how many cores other processes kept busy meanwhile (on a
shared machine "quiet" is only as quiet as that); then per setting the median step times, their
loaded / quiet ratio and the ratio within each repeat.

Settings (flatdino_cli/cpu.py says why the defaults are what they are):
- old:     OMP_NUM_THREADS = the usable cores and GOMP_SPINCOUNT=300000, i.e. torch's own thread
           count and libgomp's spin-wait when OMP_WAIT_POLICY is unset (what flatdino ran with before
           it chose these itself);
- default: nothing set: the choice of cpu.cpu_defaults (passive waiting, one thread per usable core);
- with --more, three other choices: "idle" (passive waiting and one thread per idle core: the usable
  cores less the other runnable tasks when the stage starts), "1-thread" (libgomp's default waiting)
  and "short-spin" (one thread per core spinning 10,000 times before it sleeps).

    python bench/busy_neighbour.py                            # ~10 min on 2 busy shared cores
    python bench/busy_neighbour.py --more --repeats 4         # ~20 min
    python bench/busy_neighbour.py --repeats 1 --steps 8      # smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import g, matmul_peak
from flatdino_cli.data import Store
from flatdino_cli.cpu import CPU_VARS

ROOT = Path(__file__).resolve().parents[1]
BATCH, LOG_EVERY, VAL = 32, 4, 8
NEIGHBOURS = {"spin": "while True: pass",
              "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a"}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: torch's default thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cores() -> int:
    """The usable cores less the other runnable tasks right now (/proc/loadavg's running count, which
    counts the reader too), at least 1."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except OSError:  # not Linux
        return usable_cores()
    return max(1, usable_cores() - max(0, running - 1))


SETTINGS = ("old", "default")
MORE = ("idle", "1-thread", "short-spin")


def setting_env(name: str) -> dict[str, str]:
    """The variables a setting's stage starts with (read when it starts: "idle" follows the load)."""
    return {"old": {"OMP_NUM_THREADS": str(usable_cores()), "GOMP_SPINCOUNT": "300000"}, "default": {},
            "idle": {"OMP_NUM_THREADS": str(idle_cores()), "OMP_WAIT_POLICY": "PASSIVE"},
            "1-thread": {"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "300000"},
            "short-spin": {"GOMP_SPINCOUNT": "10000"}}[name]


def busy_cores() -> tuple[float, float] | None:
    """(busy, total) jiffies of the usable cores so far (/proc/stat); None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    busy = total = 0.0
    for ln in lines:
        f = ln.split()
        if f and f[0] in mine:
            v = [float(x) for x in f[1:8]]
            total += sum(v)
            busy += sum(v) - v[3] - v[4]  # all but idle and iowait
    return busy, total


def make_store(path: Path, steps: int) -> Path:
    n = VAL + BATCH * steps
    s = Store.create(path, "features", (36, 64), n, "float32", {"encoder": "synthetic"}, {},
                     [f"img{i}.png" for i in range(n)], [i % 4 for i in range(n)])
    s.write_rows(np.arange(n), np.random.default_rng(0).standard_normal((n, 36, 64)).astype(np.float32))
    s.mark_done(np.arange(n))
    s.finalize()
    s.close()
    return path


# `python -m flatdino_cli.cli`, which also says what torch's threads start with (after the entry point's
# defaults, before the command: the command's own `import torch` finds it loaded)
ENTRY = ("import os, sys\nfrom flatdino_cli import cli\napp = cli.app\n"
         "def run():\n    import torch\n    print('threads', torch.get_num_threads(), "
         "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), file=sys.stderr)\n    app()\n"
         "cli.app = run\ncli.main()")


def run_stage(store: Path, out: Path, extra_env: dict[str, str]) -> tuple[list[float], str]:
    """(seconds per step of each logging window after the first, the thread count and wait the entry point
    left) of one train-vae process."""
    env = {k: v for k, v in os.environ.items() if k not in CPU_VARS}
    env.update(extra_env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-c", ENTRY, "train-vae", "--features", str(store), "--preset", "tiny-vae",
           "--out", str(out), "--device", "cpu", "--epochs", "1", "--batch-size", str(BATCH),
           "--set", f"val_count={VAL}", "--set", f"train.log_every={LOG_EVERY}", "--set", "train.warmup_epochs=0",
           "--set", "train.schedule=constant", "--set", "train.val_every_epochs=1000",
           "--set", "train.ckpt_every_steps=100000"]
    p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=3600)
    _, threads, policy, spin = next(ln for ln in p.stderr.splitlines() if ln.startswith("threads ")).split()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    wait = f"wait {policy}" if policy != "None" else f"spin {spin}" if spin != "None" else "libgomp default"
    return [BATCH / r for r in rates[1:]], f"{threads} thread{'s' * (threads != '1')}, {wait}"


def children_cpu() -> float:
    """CPU seconds used by this process's finished children (the stages and the neighbours)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="training steps per run (logged in windows of 4)")
    ap.add_argument("--repeats", type=int, default=3, help="quiet + loaded runs of each setting")
    ap.add_argument("--neighbour", choices=sorted(NEIGHBOURS), default="spin")
    ap.add_argument("--more", action="store_true", help="also one thread per idle core, one thread, short spin")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {usable_cores()} usable cores, load average {os.getloadavg()[0]:.2f} "
          f"at start, stage: train-vae tiny-vae, fp32, batch {BATCH}, {args.steps} steps per run, "
          f"neighbour: {args.neighbour}")
    peak0 = matmul_peak(torch.device("cpu"), torch.float32)
    times: dict[tuple[str, str], list[float]] = {}
    names = SETTINGS + MORE * args.more
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", args.steps)
        for r in range(args.repeats):
            for name in names:
                for loaded in (False, True):
                    neighbour = None
                    if loaded:
                        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[args.neighbour]])
                        time.sleep(2.0)
                    cpu0, jiffies0, wall0 = children_cpu(), busy_cores(), time.perf_counter()
                    try:
                        per_step, chosen = run_stage(store, Path(tmp) / f"run-{name}-{int(loaded)}-{r}",
                                                     setting_env(name))
                    finally:
                        if neighbour is not None:
                            neighbour.kill()
                            neighbour.wait()
                    cpu, jiffies, wall = children_cpu() - cpu0, busy_cores(), time.perf_counter() - wall0
                    other = "n/a"
                    if jiffies0 and jiffies:  # busy cores over the run, less the stage's and the neighbour's
                        frac = (jiffies[0] - jiffies0[0]) / max(1.0, jiffies[1] - jiffies0[1])
                        other = f"{max(0.0, frac * usable_cores() - cpu / wall):.2f}"
                    key = (name, "loaded" if loaded else "quiet")
                    times.setdefault(key, []).append(statistics.median(per_step))
                    print(f"  repeat {r + 1}: {name:10s} {key[1]:6s} {statistics.median(per_step):.3f} s/step "
                          f"(windows {', '.join(f'{t:.3f}' for t in per_step)}; {chosen}); other processes kept "
                          f"{other} cores busy", flush=True)
    peak1 = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"measured matmul rate (fp32, {torch.get_num_threads()} threads, no neighbour): {g(peak0)} before, "
          f"{g(peak1)} after")
    print("median s/step of the repeats; loaded/quiet: their ratio, and each repeat's (a quiet run and the loaded "
          "one right after it meet about the same load from other processes)")
    print(f"{'setting':10s} {'environment':40s} {'quiet s/step':>12s} {'loaded s/step':>13s} {'loaded/quiet':>12s}  "
          "per repeat")
    for name in names:
        quiet, loaded = times[(name, "quiet")], times[(name, "loaded")]
        q, lo = statistics.median(quiet), statistics.median(loaded)
        shown = {"old": f"OMP_NUM_THREADS={usable_cores()} GOMP_SPINCOUNT=300000", "default": "(none set)",
                 "idle": "OMP_NUM_THREADS=idle cores, PASSIVE",
                 "1-thread": "OMP_NUM_THREADS=1 GOMP_SPINCOUNT=300000", "short-spin": "GOMP_SPINCOUNT=10000"}[name]
        pairs = ", ".join(f"{b / a:.2f}x" for a, b in zip(quiet, loaded))
        print(f"{name:10s} {shown:40s} {q:12.3f} {lo:13.3f} {lo / q:11.2f}x  {pairs}")


if __name__ == "__main__":
    main()

"""`flatdino quickstart` wall time per stage on this machine, beside its measured matmul rate.

Runs the quickstart exactly as a newcomer would (its defaults, CPU, fp32) in a temporary folder
with a fresh cache, so the toy classifier (the judge) is trained as on a fresh clone, then prints
each stage's seconds, the total, the sample accuracy, and the dense fp32 matmul rate measured
before and after (a loaded or throttled machine shows as a lower "after").

    python bench/quickstart.py                      # the flat quickstart, torch's default threads
    python bench/quickstart.py --threads 1          # one core (the test suite's setting)
    python bench/quickstart.py --laminator fae --set vae:train.epochs=6
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import g, matmul_peak
from flatdino_cli.quickstart import QuickstartPlan, run_quickstart
from flatdino_cli.runtime import setup_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--laminator", choices=["flat", "fae"], default="flat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:key=value",
                    help="a quickstart stage override, as `flatdino quickstart --set` takes")
    ap.add_argument("--out", type=Path, default=None, help="keep the quickstart's folder here (default: a "
                                                            "temporary one, deleted at the end)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime("cpu", "fp32", False)
    dev, dtype = torch.device("cpu"), torch.float32
    plan = QuickstartPlan(laminator=args.laminator, seed=args.seed, overrides=tuple(args.sets))
    print(f"quickstart bench: laminator {args.laminator}, seed {args.seed}, device cpu, dtype fp32, "
          f"torch threads {torch.get_num_threads()}, overrides {list(args.sets) or 'none'}")
    before = matmul_peak(dev, dtype)
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # the judge is trained, as on a fresh clone
        t0 = time.perf_counter()
        summary = run_quickstart(args.out or Path(tmp) / "qs", rt, plan)
        wall = time.perf_counter() - t0
    after = matmul_peak(dev, dtype)
    print(f"measured matmul rate (fp32, 1024^2): {g(before)} before, {g(after)} after")
    for s in summary["stages"]:
        print(f"  {s['stage']:16s} {s.get('seconds', 0):7.1f} s")
    cls = next((s for s in summary["stages"] if s["stage"] == "classifier"), {})
    print(f"total {wall:.0f} s ({wall / 60:.2f} min); sample accuracy {cls.get('sample_accuracy', float('nan')):.3f} "
          f"(judge on real test images {cls.get('real_test_accuracy', float('nan')):.3f})")
    print(json.dumps({"seconds": round(wall, 1), "stages": {s["stage"]: s.get("seconds") for s in summary["stages"]},
                      "matmul_flops": [before, after], "sample_accuracy": cls.get("sample_accuracy")}))


if __name__ == "__main__":
    main()

"""Wall time of `flatdino compare` in toy mode (the equal-FLOPs comparison on toy data), stage by stage,
with this machine's fp32 matmul rate measured before and after (a load that comes and goes shows as a
change between the two).

    python bench/compare.py                 # the whole toy comparison: ~13 minutes on 2 quiet cores
    python bench/compare.py --out DIR       # keep its runs, table and figure in DIR (resumes there)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import matmul_peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="comparison folder (default: a temporary one)")
    ap.add_argument("--budget", type=float, default=0.0, help="training FLOPs per generator (0: the toy default)")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    before = matmul_peak(cpu, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "compare"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flatdino_cli.cli", "compare", "--out", str(out), "--device", "cpu",
                        "--precision", "fp32", "--budget", str(args.budget)], check=True)
        wall = time.perf_counter() - t0
        stages = {p.stem: json.loads(p.read_text()).get("seconds", 0.0) for p in sorted((out / ".stages").glob("*.json"),
                                                                                        key=lambda p: p.stat().st_mtime)}
        report = json.loads((out / "compare.json").read_text())
    after = matmul_peak(cpu, torch.float32)
    print(f"\nflatdino compare, toy mode: fp32, {torch.get_num_threads()} threads, matmul {before / 1e9:.0f} GFLOP/s "
          f"before / {after / 1e9:.0f} after; budget {report['budget']:.3g} training FLOPs per generator")
    for name, seconds in stages.items():
        print(f"  {name:22s} {seconds:7.1f} s")
    print(f"  {'whole command':22s} {wall:7.1f} s ({wall / 60:.1f} min; stages done by an earlier run in --out keep their old seconds)")
    for m, r in report["methods"].items():
        print(f"  {m:9s} {r['steps']:5d} steps x {r['flops_per_step']:.3g} FLOPs, fd_rep {r['final']:.4g}, "
              f"{r['samples_per_s']:.3g} samples/s")


if __name__ == "__main__":
    main()

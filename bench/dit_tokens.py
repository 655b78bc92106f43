"""Forward throughput of one DiT size on FlatDINO's 32 tokens x 128 vs RAE's 256 tokens x 768.

Same width/depth/heads on both; only the token count and the input/output width differ (RAE: the
16x16 grid of raw DINOv2 features, 2-D positions). Prints, from one run, the measured speedup next
to the analytic forward-FLOPs ratio of analysis/flops.py, with the dtype and this machine's measured
matmul rate beside each figure (FLOP convention: bench/_common.py).

    python bench/dit_tokens.py                      # CPU: DiT-B, fp32, batch 4  (~1-2 min)
    python bench/dit_tokens.py --device cuda        # CUDA: DiT-XL, bf16, batch 64
"""

from __future__ import annotations

import argparse

import torch

from _common import (DTYPES, FLOPS_PER_MAC, SIZES, count_forward_macs, g, matmul_peak, peak_memory,
                     reset_peak_memory, size_overrides)
from flatdino_cli.analysis.flops import dit_forward_flops, measure_throughput
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.models.dit import DiT
from flatdino_cli.runtime import resolve_device

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", choices=list(SIZES), default=None, help="default: XL on CUDA, B on CPU")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    ap.add_argument("--seconds", type=float, default=None, help="timing budget per model (default 5 CUDA, 3 CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); on a busy shared CPU 1 can beat 2")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("XL" if cuda else "B")
    dtype = DTYPES[args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")]
    batch = args.batch or (64 if cuda else 4)
    seconds = args.seconds if args.seconds is not None else (5.0 if cuda else 3.0)
    dname = str(dtype).removeprefix("torch.")

    peak0 = matmul_peak(device, dtype)
    print(f"device {device}, dtype {dname}, torch threads {torch.get_num_threads()}, DiT-{size}, batch {batch}")
    print(f"measured matmul rate before: {g(peak0)} ({dname})")
    rows = []
    for label, preset in (("FlatDINO 32 x 128", "xl-32x128"), ("RAE 256 x 768", "rae-xl-256x768")):
        m = load_preset(preset, size_overrides(size)).model
        reset_peak_memory(device)
        (res,) = measure_throughput(lambda: DiT(m), [batch], m.tokens, m.in_dim, device, dtype, seconds,
                                    warmup=2 if cuda else 1)
        if res.get("oom"):
            raise SystemExit(f"{label}: out of memory at batch {batch}; lower --batch")
        counted = count_forward_macs(lambda: DiT(m), lambda: (torch.randn(1, m.tokens, m.in_dim), torch.rand(1),
                                                              torch.zeros(1, dtype=torch.long)))
        res["memory"] = peak_memory(device)
        rows.append((label, m, res, dit_forward_flops(m), counted))
    peak1 = matmul_peak(device, dtype)
    peak = 0.5 * (peak0 + peak1)
    print(f"measured matmul rate after : {g(peak1)} ({dname}); fractions below use the mean {g(peak)}")
    for label, m, res, paper, counted in rows:
        sps = res["samples_per_s"]
        a_paper, a_count = (sps * FLOPS_PER_MAC * f for f in (paper, counted))
        print(f"{label:18s}: {sps:9.2f} samples/s ({res['ms_per_forward']:.0f} ms/forward, {res['iters']} timed, "
              f"{dname}); achieved {g(a_paper)} paper / {g(a_count)} counted = "
              f"{a_paper / peak:.0%} / {a_count / peak:.0%} of the {dname} matmul rate {g(peak)}; {res['memory']}")
    (fl, _, rf, pf, cf), (rl, _, rr, pr, cr) = rows
    print(f"measured speedup (samples/s, {fl} over {rl}) : {rf['samples_per_s'] / rr['samples_per_s']:.2f}x ({dname})")
    print(f"analytic forward FLOPs ratio (analysis/flops.py)  : {pr / pf:.2f}x "
          f"({pr / 1e9:.1f} / {pf / 1e9:.2f} GFLOPs, paper convention 1 MAC = 1 FLOP)")
    print(f"counted MACs ratio (every Linear + attention)     : {cr / cf:.2f}x ({cr / 1e9:.1f} / {cf / 1e9:.2f} GMACs)")


if __name__ == "__main__":
    main()

"""Helpers shared by the bench/ scripts (run them as `python bench/<name>.py`; this file is imported
from the same folder).

FLOP convention of every bench: 1 multiply-add (MAC) = 2 FLOPs, the same count as
`runtime.measure_matmul_flops` (2 n^3 per n x n matmul), so "achieved / peak" compares like with like.
Two numerators are printed:
- "paper": the analytic count of analysis/flops.py (Appendix H: per layer 2·S·D·(6D + S) MACs,
  embeddings, norms, adaLN and heads ignored), times 2;
- "counted": every nn.Linear of the real model (rows x in x out) plus the two attention matmuls
  (2·S²·D per layer), read off one batch-1 forward on the meta device, times 2.
A training step is 3 x forward (backward ~ 2 x forward). Time spent outside matmuls (norms,
elementwise, the optimizer, Python) is in the denominator, so the fractions are lower bounds on the
matmul units' utilisation.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
from torch import nn

from flatdino_cli.nn.attention import Attention
from flatdino_cli.runtime import measure_matmul_flops
from flatdino_cli.runtime import synchronize as sync  # the bench scripts' name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAIN_FACTOR = 3  # forward + backward ~ 3 x forward
FLOPS_PER_MAC = 2
# DiT sizes (width, depth, heads, SwiGLU hidden) for --size: a preset's model at another size
SIZES = {"S": (384, 12, 6, 1024), "B": (768, 12, 12, 2048), "L": (1024, 24, 16, 2731), "XL": (1152, 28, 16, 3072),
         "tiny": (64, 2, 4, 171)}  # tiny: smoke runs (bench/gpu.sh --cpu-smoke)


def size_overrides(size: str) -> list[str]:
    w, d, h, m = SIZES[size]
    return [f"model.width={w}", f"model.depth={d}", f"model.heads={h}", f"model.mlp_hidden={m}"]


def count_forward_macs(build: Callable[[], nn.Module], inputs: Callable[[], tuple]) -> int:
    """MACs of one forward of build()(*inputs()) (batch 1): all Linear layers + attention matmuls.

    Built and run on the meta device: no memory, no compute, instant even for XL.
    """
    total = 0

    def linear_hook(mod: nn.Linear, args, out):
        nonlocal total
        total += out.numel() // mod.out_features * mod.in_features * mod.out_features

    def attn_hook(mod: Attention, args, out):
        nonlocal total
        B, N, C = args[0].shape
        total += 2 * B * N * N * C  # q k^T and attn v

    with torch.device("meta"):
        model = build()
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(linear_hook)
            elif isinstance(m, Attention):
                m.register_forward_hook(attn_hook)
        with torch.no_grad():
            model(*inputs())
    return total


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float | None = None) -> float:
    """This machine's measured dense matmul rate (FLOP/s) in `dtype`: 1024^2 on CPU, 4096^2 on CUDA;
    timed for `seconds` (default 2, or $BENCH_PEAK_SECONDS: smoke runs shorten it)."""
    seconds = seconds if seconds is not None else float(os.environ.get("BENCH_PEAK_SECONDS", "2"))
    return measure_matmul_flops(device, dtype, n=4096 if device.type == "cuda" else 1024, seconds=seconds)


def timed(fn: Callable[[], object], device: torch.device, seconds: float, warmup: int = 1) -> tuple[int, float]:
    """(calls, elapsed seconds): `warmup` untimed calls, then calls until `seconds` pass (at least one)."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n, elapsed


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """Peak device memory since the last reset_peak_memory (CUDA), for printing beside a figure."""
    if device.type != "cuda":
        return "peak memory n/a on CPU"
    return f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def g(flops: float) -> str:
    return f"{flops / 1e9:.1f} GFLOP/s"


def report_train_step(header: str, dname: str, peaks: tuple[float, float], elapsed: float, steps: int, batch: int,
                      macs_per_sample: dict[str, float], train_factor: int, flops_per_mac: int) -> None:
    """Print one training-step benchmark: time, samples/s, achieved FLOP/s per MAC count vs the matmul peak."""
    peak = 0.5 * (peaks[0] + peaks[1])
    sps = steps * batch / elapsed
    print(header)
    print(f"measured matmul rate ({dname}): {g(peaks[0])} before, {g(peaks[1])} after; mean {g(peak)}")
    print(f"training step: {1e3 * elapsed / steps:.0f} ms/step, {sps:.3f} samples/s ({steps} timed steps, {dname})")
    width = max(len(k) for k in macs_per_sample)
    for name, macs in macs_per_sample.items():
        achieved = sps * train_factor * flops_per_mac * macs
        print(f"  {name:{width}s}: {train_factor} x {macs / 1e9:.2f} GMAC x {flops_per_mac} per sample -> achieved "
              f"{g(achieved)}: MFU {achieved / peak:.1%} of the measured {dname} matmul rate {g(peak)}")


def step_header(device: torch.device, dtype_name: str, rt, preset: str, model: nn.Module, batch: int) -> str:
    """The line that says what a training-step figure was measured on."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"device {device}, dtype {dtype_name} ({'autocast' if rt.precision == 'bf16' else 'plain fp32'}), "
            f"torch threads {torch.get_num_threads()}, preset {preset} ({params / 1e6:.1f}M trainable), "
            f"batch {batch}, compile {rt.compile}")


def add_step_options(ap) -> None:
    """The options every training-step bench takes (besides --preset and --batch)."""
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seconds", type=float, default=10.0, help="timing budget after one warm-up step")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as training does on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); on a busy shared CPU 1 can beat 2")


def step_runtime(args):
    """(runtime, dtype, dtype name) from add_step_options' arguments."""
    from flatdino_cli.runtime import setup_runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime(args.device, "auto" if args.dtype == "auto" else args.dtype, args.compile)
    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
    return rt, dtype, str(dtype).removeprefix("torch.")

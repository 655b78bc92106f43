"""DiT training-step throughput and achieved FLOP/s as a fraction of this machine's matmul rate.

One step = what `fit` does for train-dit: flow-matching loss forward + backward (under the runtime's
autocast), grad-norm clip, AdamW, EMA update, on random latents of the preset's shape. Achieved
FLOP/s = samples/s x 3 x forward MACs x 2 (FLOP convention and the two MAC counts: bench/_common.py),
divided by the measured dense matmul rate in the same dtype, measured in the same run.

    python bench/dit_step.py                        # CPU: b-32x128, fp32, batch 8 (~1 min)
    python bench/dit_step.py --device cuda          # CUDA: xl-32x128, bf16 autocast, batch 256
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import (FLOPS_PER_MAC, TRAIN_FACTOR, add_step_options, count_forward_macs, matmul_peak, peak_memory,
                     report_train_step, reset_peak_memory, step_header, step_runtime, sync, timed)
from flatdino_cli.analysis.flops import dit_forward_flops
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.flow import flow_loss
from flatdino_cli.models import build_model
from flatdino_cli.steps import ema_update, param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a DiT preset (default: xl-32x128 on CUDA, b-32x128 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    add_step_options(ap)
    args = ap.parse_args()
    rt, dtype, dname = step_runtime(args)
    dev, cuda = rt.device, rt.is_cuda
    cfg = load_preset(args.preset or ("xl-32x128" if cuda else "b-32x128"))
    m, tc = cfg.model, cfg.train
    batch = args.batch or (256 if cuda else 8)

    peak0 = matmul_peak(dev, dtype)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    ema = build_model(cfg).to(dev).requires_grad_(False) if tc.ema > 0 else None
    if ema is not None:
        ema.load_state_dict(model.state_dict())
    opt = rt.adamw(param_groups(model, tc.weight_decay, tc.decay_2d_only), tc.lr, tc.betas, tc.eps)
    net = rt.maybe_compile(model).train()
    z = torch.randn(batch, m.tokens, m.in_dim, device=dev)  # (B, N, d)
    y = torch.randint(0, m.num_classes, (batch,), device=dev)

    def step() -> None:
        with rt.autocast():
            loss, _, _ = flow_loss(net, z, y, cfg.flow)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, model, tc.ema)

    reset_peak_memory(dev)
    t0 = time.perf_counter()
    step()  # the first step compiles when --compile
    sync(dev)
    first = time.perf_counter() - t0
    n, elapsed = timed(step, dev, args.seconds, warmup=1)
    memory = peak_memory(dev)
    peak1 = matmul_peak(dev, dtype)
    paper = dit_forward_flops(m)
    counted = count_forward_macs(lambda: build_model(cfg), lambda: (torch.randn(1, m.tokens, m.in_dim), torch.rand(1),
                                                                    torch.zeros(1, dtype=torch.long)))
    header = step_header(dev, dname, rt, args.preset or ("xl-32x128" if cuda else "b-32x128"), model, batch)
    report_train_step(header, dname, (peak0, peak1), elapsed, n, batch,
                      {"paper (flops.py, 1 MAC = 1 FLOP there)": paper, "counted (every Linear + attention)": counted},
                      TRAIN_FACTOR, FLOPS_PER_MAC)
    print(f"first step {first:.1f} s ({'with' if rt.compile else 'no'} compilation); {memory} (batch {batch}, {dname})")


if __name__ == "__main__":
    main()

"""Laminator (VAE) training-step throughput and achieved FLOP/s as a fraction of the matmul rate.

One step = what `fit` does for train-vae on a feature store: VAE forward (reparameterised sample),
Huber + beta KL loss, backward, grad-norm clip, AdamW, on random (B, 256, 768) features. Achieved
FLOP/s = samples/s x 3 x forward MACs x 2 (FLOP convention and MAC counts: bench/_common.py; the
"paper" count is the encoder's Appendix-H cost + the decoder's under the same per-layer formula,
which assumes an MLP of 8 D^2 MACs per token where the laminator's SwiGLU with hidden 4 D costs 12 D^2,
so "counted" is the one to trust here), over the dense matmul rate measured in the same dtype.

    python bench/vae_step.py                        # CPU: vae-32x128, fp32, batch 1 (~1-2 min)
    python bench/vae_step.py --device cuda          # CUDA: bf16 autocast, batch 64
"""

from __future__ import annotations

import argparse

import torch

from _common import (FLOPS_PER_MAC, TRAIN_FACTOR, add_step_options, count_forward_macs, matmul_peak,
                     report_train_step, step_header, step_runtime, timed)
from flatdino_cli.analysis.flops import layer_flops, vae_encoder_flops
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.models import build_model
from flatdino_cli.models.vae import vae_loss
from flatdino_cli.steps import param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vae-32x128")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 1 on CPU")
    add_step_options(ap)
    args = ap.parse_args()
    rt, dtype, dname = step_runtime(args)
    dev = rt.device
    cfg = load_preset(args.preset)
    m, tc = cfg.model, cfg.train
    batch = args.batch or (64 if rt.is_cuda else 1)

    peak0 = matmul_peak(dev, dtype)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    opt = rt.adamw(param_groups(model, tc.weight_decay, tc.decay_2d_only), tc.lr, tc.betas, tc.eps)
    net = rt.maybe_compile(model).train()
    feats = torch.randn(batch, m.num_patches, m.feature_dim, device=dev)  # (B, P, C)

    def step() -> None:
        with rt.autocast():
            recon, mu, logvar = net(feats)
            loss, _ = vae_loss(recon, feats, mu, logvar, cfg.beta(), cfg.loss.loss, cfg.loss.huber_delta,
                               cfg.loss.free_bits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    n, elapsed = timed(step, dev, args.seconds, warmup=1)
    peak1 = matmul_peak(dev, dtype)
    S = m.num_patches + m.tokens
    paper = vae_encoder_flops(m) + m.dec_depth * layer_flops(S, m.dec_width)
    counted = count_forward_macs(lambda: build_model(cfg), lambda: (torch.randn(1, m.num_patches, m.feature_dim),))
    header = step_header(dev, dname, rt, args.preset, model, batch)
    report_train_step(header, dname, (peak0, peak1), elapsed, n, batch,
                      {"paper formula (enc + dec layers)": paper, "counted (every Linear + attention)": counted},
                      TRAIN_FACTOR, FLOPS_PER_MAC)


if __name__ == "__main__":
    main()

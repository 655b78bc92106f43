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

from _common import DTYPES, FLOPS_PER_MAC, TRAIN_FACTOR, count_forward_macs, matmul_peak, report_train_step, timed
from flatdino_cli.analysis.flops import layer_flops, vae_encoder_flops
from flatdino_cli.config import load_preset
from flatdino_cli.models import build_model
from flatdino_cli.models.vae import vae_loss
from flatdino_cli.runtime import setup_runtime
from flatdino_cli.train import param_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vae-32x128")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 1 on CPU")
    ap.add_argument("--seconds", type=float, default=10.0, help="timing budget after one warm-up step")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); on a busy shared CPU 1 can beat 2")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = setup_runtime(args.device, "auto" if args.dtype == "auto" else args.dtype, args.compile)
    dev = rt.device
    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
    dname = str(dtype).removeprefix("torch.")
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
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    header = (f"device {dev}, dtype {dname} ({'autocast' if rt.precision == 'bf16' else 'plain fp32'}), torch threads "
              f"{torch.get_num_threads()}, preset {args.preset} ({params / 1e6:.1f}M trainable), batch {batch}, "
              f"compile {rt.compile}")
    report_train_step(header, dname, (peak0, peak1), elapsed, n, batch,
                      {"paper formula (enc + dec layers)": paper, "counted (every Linear + attention)": counted},
                      TRAIN_FACTOR, FLOPS_PER_MAC)


if __name__ == "__main__":
    main()

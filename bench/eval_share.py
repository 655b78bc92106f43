"""The cost of train-dit's fd_rep evaluations (eval.*) as a share of the training run, at the defaults.

GPU presets, analytic (analysis/flops.py): one evaluation costs eval.samples x (network evaluations of
the preset's sampler, guided, + those of the unguided pass when eval.nocfg) DiT forwards, plus the VAE
decoder's forward per sample; the run trains total steps x global batch x 3 DiT forwards (the latents'
encoding is left out, which makes the share an upper bound). Evaluations per run: eval.count, plus the
last step.

CPU tiny presets, measured: a short train-dit of each (toy data at the quickstart's image size, a
briefly trained tiny VAE: the DiT's speed does not depend on its quality) evaluated twice at the
preset's eval settings; the measured seconds per training step and per evaluation are projected onto
the preset's whole run on the quickstart's data (its steps, its evaluations).

    python bench/eval_share.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from _common import DTYPES, matmul_peak
from flatdino_cli.analysis.flops import dit_forward_flops, vae_decoder_flops
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.evaluate import CPU_SAMPLES, CUDA_SAMPLES, eval_every_steps, unguided
from flatdino_cli.flow import network_evaluations
from flatdino_cli.quickstart import QuickstartPlan

IMAGENET_TRAIN = 1_281_167
GPU_PRESETS = ("xl-32x128", "dh-xl-32x128", "rae-xl-256x768", "fae-xl-16x16x32")
TINY = {"tiny-dit": "latents", "tiny-rae-dit": "features"}  # preset -> the store it trains on


def evaluations(cfg, total: int, spe: int) -> int:
    every = eval_every_steps(cfg.eval.every, cfg.eval.unit, cfg.eval.count, total, spe)
    return 0 if every == 0 else total // every + (total % every != 0)


def forwards_per_sample(cfg) -> int:
    return network_evaluations(cfg.flow) + (network_evaluations(unguided(cfg.flow)) if cfg.eval.nocfg else 0)


def analytic(name: str) -> str:
    cfg = load_preset(name)
    spe = math.ceil(IMAGENET_TRAIN / cfg.train.batch_size)
    total = int(cfg.train.max_steps or cfg.train.epochs * spe)
    fwd = dit_forward_flops(cfg)
    n = cfg.eval.samples or CUDA_SAMPLES
    laminator = {"xl-32x128": "vae-32x128", "dh-xl-32x128": "vae-32x128", "fae-xl-16x16x32": "fae-16x16x32"}
    decode = vae_decoder_flops(load_preset(laminator[name])) if name in laminator else 0.0  # RAE: no decoder
    k = evaluations(cfg, total, spe)
    ev = k * n * (forwards_per_sample(cfg) * fwd + decode)
    train = total * cfg.train.batch_size * 3 * fwd
    return (f"{name:<18} {total:>9,} steps  {k:>3} evals x {n:,} samples x {forwards_per_sample(cfg)} forwards  "
            f"eval / run = {100 * ev / (train + ev):.2f}%")


def measured(name: str, work: Path, rt, steps: int) -> str:
    from flatdino_cli.quickstart import run_quickstart
    from flatdino_cli.stages.dit import train_dit
    from flatdino_cli.rundir import read_metrics

    plan = QuickstartPlan(per_class=40, overrides=("vae:train.max_steps=2", "vae:train.epochs=0"),
                          until="extract-latents")
    if not (work / "latents" / "manifest.json").is_file():
        run_quickstart(work, rt, plan)
    cfg = load_preset(name, [f"train.max_steps={steps}", "train.epochs=0", f"eval.every={steps // 2}",
                             "train.log_every=1"])
    out = work / f"dit-{name}"
    train_dit(cfg, out, rt, work / TINY[name], resume=False)
    rows = read_metrics(out)
    ev = [r["eval_seconds"] for r in rows if "eval_seconds" in r]
    step_s = sorted(cfg.train.batch_size / r["samples_per_s"] for r in rows if "samples_per_s" in r)
    t_step, t_eval = step_s[len(step_s) // 2], sum(ev) / len(ev)
    full = load_preset(name)  # the preset's own run on the quickstart's data
    n_train = 12 * QuickstartPlan().per_class - QuickstartPlan().held_out()
    spe = math.ceil(n_train / full.train.batch_size)
    total = int(full.train.max_steps or full.train.epochs * spe)
    k = evaluations(full, total, spe)
    share = k * t_eval / (total * t_step + k * t_eval)
    return (f"{name:<18} {t_step * 1e3:7.1f} ms/step  {t_eval:6.2f} s/eval ({full.eval.samples or CPU_SAMPLES} "
            f"samples x {forwards_per_sample(full)} forwards)  run: {total:,} steps, {k} evals  "
            f"eval / run = {100 * share:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps of each measured tiny run")
    args = ap.parse_args()
    from flatdino_cli.runtime import setup_runtime

    print("GPU presets (analytic, fd_rep at the defaults: eval.count evaluations of eval.samples)")
    for name in GPU_PRESETS:
        print("  " + analytic(name))
    rt = setup_runtime("cpu", "fp32", False)
    peak = matmul_peak(rt.device, DTYPES["fp32"])
    print(f"CPU tiny presets (measured; fp32, {torch.get_num_threads()} threads, matmul {peak / 1e9:.1f} GFLOP/s)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in TINY:
            print("  " + measured(name, Path(tmp), rt, args.steps))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

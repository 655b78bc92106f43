"""Sample-pipeline throughput: FlatDINO vs the RAE baseline through the same `sample` code, in one run.

Both pipelines are built with random weights at one DiT size (nothing is loaded) and run through
sample.write_sample_set, the code behind `flatdino sample`: seeded noise, the Euler sampler with
CFG on its interval (guided and unguided halves in one forward), the VAE decoder (FlatDINO only; RAE
de-normalises its 256 x 768 features), the pixel decoder, uint8 rounding, PNGs on the writer thread,
the part and final ADM .npz files and the grid. Printed: images/s of each, the measured speedup next
to the analytic pipeline FLOPs ratio (analysis/flops.sample_flops, paper convention), and where the
time goes: DiT sampler (forwards + Euler updates) / VAE decoder / pixel decoder / the rest (noise,
uint8, file writing, waiting for the PNG thread). `--compile` also runs each pipeline with the DiT
torch.compile'd and prints the compile time and the steady-state speedup.

    python bench/sample.py                          # CPU: DiT-B, decoder-b, fp32, 8 images, 8 steps (~3 min)
    python bench/sample.py --device cuda            # CUDA: DiT-XL, decoder-xl, bf16, 512 images, 50 steps
    python bench/sample.py --device cuda --dtype fp32
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import DTYPES, SIZES, g, matmul_peak, peak_memory, reset_peak_memory, size_overrides, sync
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.pipeline import generate as P
from flatdino_cli import sample as S
from flatdino_cli.analysis.flops import sample_flops
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.flow import network_evaluations
from flatdino_cli.models import build_model
from flatdino_cli.runtime import setup_runtime
from flatdino_cli.models.stats import LatentStats
from flatdino_cli.viz import save_png

STAGES = ("dit", "vae_decoder", "pixel_decoder")


def presets(size: str, decoder: str, tiny: bool) -> dict:
    """Configs of the FlatDINO DiT, its VAE, the RAE DiT and the pixel decoder; tiny: the quickstart's
    sizes (tiny encoder: 36 patches x 64; the smoke run of bench/gpu.sh)."""
    if not tiny:
        return {"dit": load_preset("xl-32x128", size_overrides(size)), "vae": load_preset("vae-32x128"),
                "rae": load_preset("rae-xl-256x768", size_overrides(size)), "decoder": load_preset(decoder)}
    dit = load_preset("tiny-dit")
    rae = load_preset("rae-xl-256x768")
    rae = dataclasses.replace(rae, model=dataclasses.replace(dit.model, tokens=36, grid=(6, 6), in_dim=64,
                                                             pos_embed=rae.model.pos_embed, rope=rae.model.rope))
    return {"dit": dit, "vae": load_preset("tiny-vae", ["model.feature_dim=64", "model.num_patches=36"]),
            "rae": rae, "decoder": load_preset("tiny-decoder")}


def build_pipeline(kind: str, spec: dict, device: torch.device) -> Pipeline:
    """FlatDINO (DiT on 32 x 128 latents + the VAE decoder) or RAE (DiT on 256 x 768 features + their
    statistics), both with the same pixel decoder; random weights, eval mode."""
    dec = build_model(spec["decoder"]).to(device).eval()
    if kind == "flatdino":
        cfg = spec["dit"]
        vae = build_model(spec["vae"]).to(device).eval()
        return Pipeline(cfg, build_model(cfg).to(device).eval(), dec, vae=vae)
    cfg = spec["rae"]
    m = cfg.model
    stats = LatentStats(torch.randn(m.tokens, m.in_dim), torch.rand(m.tokens, m.in_dim) + 0.5).to(device)
    return Pipeline(cfg, build_model(cfg).to(device).eval(), dec, stats=stats)


@contextlib.contextmanager
def stage_clock(pipe: Pipeline, device: torch.device):
    """Seconds per stage of everything run inside the block: the sampler loop (P.sample: DiT forwards
    and the Euler updates), the VAE decoder and the pixel decoder (each timed between device syncs)."""
    spent = dict.fromkeys(STAGES, 0.0)

    def clocked(stage, fn):
        def run(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            spent[stage] += time.perf_counter() - t0
            return out
        return run

    real_sample, real_dec = P.sample, pipe.decoder.forward
    P.sample = clocked("dit", real_sample)
    pipe.decoder.forward = clocked("pixel_decoder", real_dec)
    if pipe.vae is not None:
        pipe.vae.decode = clocked("vae_decoder", pipe.vae.decode)
    try:
        yield spent
    finally:
        P.sample = real_sample
        del pipe.decoder.forward
        if pipe.vae is not None:
            del pipe.vae.decode


def warm_up(pipe: Pipeline, flow, batch: int, rt) -> float:
    """Seconds of one unguided and one guided single-step call (both batch shapes the sampler uses:
    a torch.compile'd DiT compiles here)."""
    t0 = time.perf_counter()
    for f in (dataclasses.replace(flow, steps=1, cfg_scale=1.0),
              dataclasses.replace(flow, steps=1, cfg_interval=(0.0, 1.0), cfg_interval_inclusive=True)):
        P.generate(pipe, [0] * batch, list(range(batch)), 0, f, batch, rt)
    sync(rt.device)
    return time.perf_counter() - t0


def run_pipeline(pipe: Pipeline, labels: list[int], flow, batch: int, rt, work: Path) -> dict:
    """One timed write_sample_set into a fresh folder: images/s and seconds per stage."""
    out = Path(tempfile.mkdtemp(dir=work))
    with stage_clock(pipe, rt.device) as spent:
        t0 = time.perf_counter()
        S.write_sample_set(pipe, labels, out, seed=0, flow=flow, batch_size=batch, rt=rt, progress=False)
        total = time.perf_counter() - t0
    with np.load(next(out.glob("samples_*.npz"))) as z:
        images = z["arr_0"][:batch]
    t0 = time.perf_counter()  # what the writer thread takes off the critical path
    for k, img in enumerate(images):
        save_png(img, out / f"probe_{k}.png")
    png_per_image = (time.perf_counter() - t0) / len(images)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": total, "images_per_s": len(labels) / total, "stages": dict(spent),
            "other": total - sum(spent.values()), "png_per_image": png_per_image}


def print_run(name: str, r: dict, n: int, dname: str) -> None:
    total = r["seconds"]
    parts = ", ".join(f"{k} {v / total:.1%}" for k, v in r["stages"].items() if v)
    print(f"{name}: {r['images_per_s']:.3f} images/s ({n} images in {total:.1f} s, {dname}); time: {parts}, "
          f"other (noise, uint8, files, PNG-thread waits) {r['other'] / total:.1%}; a PNG on the critical path "
          f"would add {r['png_per_image'] * n / total:.1%} ({1e3 * r['png_per_image']:.1f} ms/image)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", choices=list(SIZES), default=None, help="DiT size (default: XL on CUDA, B on CPU)")
    ap.add_argument("--decoder", default=None, help="pixel decoder preset (default: decoder-xl on CUDA, decoder-b "
                                                    "on CPU)")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--images", type=int, default=None, help="images per pipeline (default: 512 CUDA, 8 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="sampler batch (default: 128 CUDA; CPU uses 8)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: 50 CUDA, 8 CPU)")
    ap.add_argument("--cfg", type=float, default=4.5, help="guidance scale (on the interval 0.225 < t < 1)")
    ap.add_argument("--compile", action="store_true", help="also run each pipeline with the DiT torch.compile'd")
    ap.add_argument("--only", choices=["flatdino", "rae"], default=None, help="one pipeline only (no ratio)")
    ap.add_argument("--tiny", action="store_true", help="the quickstart's tiny models (a smoke run, seconds)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = setup_runtime(args.device, "auto" if args.dtype == "auto" else args.dtype, False)
    cuda = rt.is_cuda
    size = args.size or ("XL" if cuda else "B")
    decoder = args.decoder or ("decoder-xl" if cuda else "decoder-b")
    n = args.images or (512 if cuda else 8)
    batch = P.sampler_batch(args.batch or (128 if cuda else P.CPU_CHUNK), rt.device)
    steps = args.steps or (50 if cuda else 8)
    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
    dname = str(dtype).removeprefix("torch.")
    spec = presets(size, decoder, args.tiny)
    vae_cfg, dec_cfg = spec["vae"], spec["decoder"]

    peak0 = matmul_peak(rt.device, dtype)
    what = "tiny models" if args.tiny else f"DiT-{size}, pixel decoder {decoder}"
    print(f"device {rt.device}, dtype {dname}, torch threads {torch.get_num_threads()}, {what}, {n} images per "
          f"pipeline, sampler batch {batch}, euler {steps} steps, CFG {args.cfg} on 0.225 < t < 1; random weights. "
          "On a machine shared with other jobs, compare only ratios of one run.")
    print(f"measured matmul rate before: {g(peak0)} ({dname})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="flatdino-bench-sample-"))
    results = {}
    try:
        for kind in [args.only] if args.only else ["flatdino", "rae"]:
            pipe = build_pipeline(kind, spec, rt.device)
            flow = dataclasses.replace(pipe.cfg.flow, steps=steps, sampler="euler", cfg_scale=args.cfg,
                                       cfg_interval=(0.225, 1.0), cfg_interval_inclusive=False)
            flops = sample_flops(pipe.cfg, flow, dec_cfg, vae_cfg if kind == "flatdino" else None)
            labels = [i % pipe.cfg.model.num_classes for i in range(n)]
            for compiled in [False, True] if args.compile else [False]:
                mode_rt = dataclasses.replace(rt, compile=compiled)
                reset_peak_memory(rt.device)
                first = warm_up(pipe, flow, batch, mode_rt)
                r = run_pipeline(pipe, labels, flow, batch, mode_rt, work)
                results[(kind, compiled)] = r
                name = f"{'FlatDINO' if kind == 'flatdino' else 'RAE'} {' x '.join(map(str, pipe.latent_shape))}"
                print_run(f"{name}{' compiled' if compiled else ''}", r, n, dname)
                achieved = r["images_per_s"] * 2 * flops["total"]  # paper FLOPs count a MAC once, the rate twice
                print(f"    analytic {flops['total'] / 1e9:.1f} GFLOPs/image (DiT {network_evaluations(flow)} network "
                      f"evaluations at shift {flow.shift:.2f}, a guided one counted 2: {flops['dit'] / 1e9:.1f}, "
                      f"VAE decoder {flops['vae_decoder'] / 1e9:.1f}, pixel decoder {flops['pixel_decoder'] / 1e9:.1f}); achieved "
                      f"{g(achieved)} = {achieved / peak0:.0%} of the {dname} matmul rate before; "
                      f"{peak_memory(rt.device)}", flush=True)
                if compiled:
                    eager = results[(kind, False)]
                    print(f"    torch.compile: first calls {first:.1f} s (eager {eager['warm_up']:.1f} s), steady "
                          f"state {r['images_per_s'] / eager['images_per_s']:.2f}x eager", flush=True)
                r.update(flops=flops, warm_up=first)
            pipe = None  # free before building the next one
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"measured matmul rate after : {g(matmul_peak(rt.device, dtype))} ({dname})")
    if ("flatdino", False) in results and ("rae", False) in results:
        a, b = results[("flatdino", False)], results[("rae", False)]
        measured, analytic = a["images_per_s"] / b["images_per_s"], b["flops"]["total"] / a["flops"]["total"]
        print(f"measured speedup (images/s, FlatDINO over RAE): {measured:.2f}x ({dname}); analytic pipeline FLOPs "
              f"ratio {analytic:.2f}x; measured / analytic = {measured / analytic:.2f}")


if __name__ == "__main__":
    main()

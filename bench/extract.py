"""Extract throughput: encoder-only images/s vs end-to-end `extract` images/s on the same images, for
the tiny encoder and the real DINOv2-B/14-reg4 architecture (random weights: nothing is downloaded),
plus the JPEG decode + ADM crop rate per CPU core and on the device.

The end-to-end number includes reading and decoding the JPEGs, the ADM crop + resize, DataLoader
collation, the encoder forward and the store writes; the ratio says how much of the encoder's speed
the pipeline keeps. The images are ImageNet-sized JPEGs (500 x 375 by default) written here. On CUDA,
extract decodes JPEGs on the GPU (nvJPEG, batched) and the figure to compare with the encoder is the
device decode rate; on the CPU it is the per-core Pillow rate times the loader workers.

    python bench/extract.py                                  # CPU: tiny + DINOv2-B, fp32 (~3 min)
    python bench/extract.py --device cuda --images 4096      # CUDA: + nvJPEG decode rate
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import g, matmul_peak, peak_memory, reset_peak_memory, sync
from flatdino_cli import encoders
from flatdino_cli.config import ExtractConfig
from flatdino_cli.data import (DeviceJpegDataset, EncoderTransform, ImageList, collate_device_jpegs,
                               crops_on_device, list_images, load_rgb)
from flatdino_cli.encoders import default_crop_size
from flatdino_cli.encoders.specs import EncoderSpec, get_spec
from flatdino_cli.extract import extract_features
from flatdino_cli.runtime import setup_runtime

ENCODERS = ("tiny", "dinov2-b-reg4")


def random_weights(name, weights=None, device="cpu"):
    """load_encoder with the named architecture's fixed-seed random init (no weight files here)."""
    spec = name if isinstance(name, EncoderSpec) else get_spec(name)
    return real_load_encoder(dataclasses.replace(spec, hub_repos=()), None, device)


real_load_encoder = encoders.load_encoder


def write_jpegs(folder: Path, n: int, width: int, height: int) -> None:
    """n photo-like JPEGs (smooth random fields, quality 90, 4:2:0) in 12 class folders."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    for i in range(n):
        d = folder / f"class_{i % 12:02d}"
        d.mkdir(parents=True, exist_ok=True)
        small = np.roll(base, i, axis=(0, 1)) ^ np.uint8(i % 256)
        img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        img.save(d / f"{i:06d}.jpg", quality=90)


def decode_rates(images: ImageList, crop: int, device: torch.device, batch: int) -> tuple[float, float]:
    """(Pillow decode + ADM crop images/s on one thread, batched decode_jpeg + tensor crop images/s on
    `device`: the two paths of extract)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tf = EncoderTransform(crop, crop)
    t0 = time.perf_counter()
    for p in images.paths:
        tf.pixels(load_rgb(p))
    cpu_rate = len(images) / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    ds = DeviceJpegDataset(images, tf.pixels)
    batches = [collate_device_jpegs([ds[i] for i in range(lo, min(lo + batch, len(ds)))])
               for lo in range(0, len(ds), batch)]  # file bytes read up front: decode + crop only
    crops_on_device(batches[0], crop, device)  # warm-up (nvJPEG handles, weight tables)
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        crops_on_device(b, crop, device)
    sync(device)
    return cpu_rate, len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", choices=[*ENCODERS, "both"], default="both")
    ap.add_argument("--images", type=int, default=None,
                    help="JPEGs per encoder (default: CUDA 2048; CPU 600 tiny, 32 DINOv2-B)")
    ap.add_argument("--jpeg-size", default="500x375", help="WxH of the JPEGs (ImageNet's typical size)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader workers (on 2 CPU cores they only take cycles from the encoder)")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA (extract --tf32)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = setup_runtime(args.device, "fp32", False)
    cuda = rt.is_cuda
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    batch = args.batch_size or (256 if cuda else 16)
    names = ENCODERS if args.encoder == "both" else (args.encoder,)
    dname = "tf32" if cuda and args.tf32 else "float32"
    peak0 = matmul_peak(rt.device, torch.float32)
    print(f"device {rt.device}, dtype {dname} (extract runs the encoder without autocast), torch threads "
          f"{torch.get_num_threads()}, workers {args.workers}, batch {batch}, {width}x{height} JPEGs; random "
          f"weights. On a machine shared with other jobs, compare only ratios of one run.")
    print(f"measured matmul rate before: {g(peak0)} (float32)")
    encoders.load_encoder = random_weights  # extract_features loads by name
    work = Path(tempfile.mkdtemp(prefix="flatdino-bench-extract-"))
    rows = []
    try:
        for name in names:
            enc = random_weights(name, device=rt.device)
            n = args.images or (2048 if cuda else 600 if name == "tiny" else 32)
            src = work / f"jpegs-{name}"
            write_jpegs(src, n, width, height)
            images = list_images(src)
            crop = default_crop_size(enc)
            tf = EncoderTransform(crop, enc.spec.image_size, "bicubic")
            x = torch.stack([tf(load_rgb(p)) for p in images.paths[:batch]]).to(rt.device)
            if cuda and args.tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
            enc(x)  # warm-up
            sync(rt.device)
            t0, done = time.perf_counter(), 0
            while done < n:  # the same batch over and over, as many images as the extract run encodes
                enc(x)
                done += len(x)
            sync(rt.device)
            enc_rate = done / (time.perf_counter() - t0)
            cfg = ExtractConfig(encoder=name, batch_size=batch, workers=args.workers, tf32=args.tf32)
            reset_peak_memory(rt.device)
            t0 = time.perf_counter()
            extract_features(src, work / f"store-{name}", cfg, rt)
            sync(rt.device)
            e2e_rate = n / (time.perf_counter() - t0)
            memory = peak_memory(rt.device)
            per_core, on_device = decode_rates(images.subset(range(min(n, 256))), crop, rt.device, min(batch, 64))
            rows.append((name, enc_rate, e2e_rate, per_core, on_device, n, crop, memory))
            shutil.rmtree(src, ignore_errors=True)
    finally:
        encoders.load_encoder = real_load_encoder
        shutil.rmtree(work, ignore_errors=True)
    peak1 = matmul_peak(rt.device, torch.float32)
    print(f"measured matmul rate after : {g(peak1)} (float32)")
    for name, enc_rate, e2e_rate, per_core, on_device, n, crop, memory in rows:
        path = "JPEGs decoded on the GPU" if rt.decode_jpeg_on_device else "JPEGs decoded by Pillow"
        print(f"{name:14s}: encoder only {enc_rate:9.1f} images/s; extract end to end {e2e_rate:9.1f} images/s "
              f"({n} images, {path}); ratio {e2e_rate / enc_rate:.3f} ({dname}); extract {memory}")
        print(f"{'':14s}  decode + ADM crop to {crop}: {per_core:.1f} images/s per CPU core (Pillow), "
              f"{on_device:.1f} images/s batched on {rt.device} (decode_jpeg + tensor crop); CPU cores to keep "
              f"this encoder fed: {enc_rate / per_core:.1f}")
    if len(rows) == 2:
        print(f"DINOv2-B over tiny encoder cost (encoder-only images/s ratio): {rows[0][1] / rows[1][1]:.1f}x; "
              f"DINOv2-B extract end to end keeps {rows[1][2] / rows[1][1]:.0%} of its encoder's rate")


if __name__ == "__main__":
    main()

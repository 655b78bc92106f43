"""Extract throughput: encoder-only images/s vs end-to-end `extract` images/s on the same images.

The end-to-end number includes decoding PNG/JPEG files, the ADM crop + resize, DataLoader
collation, the encoder forward and the store writes; the ratio says how much of the encoder's speed
the pipeline keeps (target >= 0.85 with the tiny encoder on CPU when loading overlaps compute).

    python bench/extract.py --images 4800 --workers 0 --encoder tiny
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flatdino_cli.config import ExtractConfig
from flatdino_cli.data import EncoderTransform, list_images, load_rgb
from flatdino_cli.encoders import load_encoder
from flatdino_cli.extract import default_crop_size, extract_features
from flatdino_cli.runtime import measure_matmul_flops, setup_runtime
from flatdino_cli.toydata import write_toy_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4800, help="number of toy images (enough to amortise start-up)")
    ap.add_argument("--encoder", default="tiny")
    ap.add_argument("--encoder-weights", default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader workers (on 2 CPU cores they only take cycles from the encoder)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    rt = setup_runtime(args.device, "fp32", False)
    work = Path(tempfile.mkdtemp(prefix="flatdino-bench-extract-"))
    try:
        enc = load_encoder(args.encoder, args.encoder_weights, rt.device)
        per_class = max(1, args.images // 12)
        write_toy_dataset(work / "images", per_class=per_class, size=enc.spec.image_size, seed=0, progress=False)
        images = list_images(work / "images")
        n = len(images)
        tf = EncoderTransform(default_crop_size(enc), enc.spec.image_size, "bicubic")
        batch = torch.stack([tf(load_rgb(p)) for p in images.paths[: args.batch_size]]).to(rt.device)

        # encoder only: the same batch over and over, as many images as the extract run processes
        with torch.no_grad():
            enc(batch)
            t0 = time.perf_counter()
            done = 0
            while done < n:
                enc(batch)
                done += len(batch)
            if rt.is_cuda:
                torch.cuda.synchronize()
        enc_rate = done / (time.perf_counter() - t0)

        cfg = ExtractConfig(encoder=args.encoder, encoder_weights=args.encoder_weights,
                            batch_size=args.batch_size, workers=args.workers)
        t0 = time.perf_counter()
        extract_features(work / "images", work / "store", cfg, rt)
        e2e_rate = n / (time.perf_counter() - t0)

        peak = measure_matmul_flops(rt.device, torch.float32)
        print(f"device {rt.device}, dtype float32, measured matmul peak {peak / 1e9:.1f} GFLOP/s, "
              f"torch threads {torch.get_num_threads()}, workers {args.workers}")
        print(f"encoder only : {enc_rate:9.1f} images/s  ({args.encoder}, batch {args.batch_size})")
        print(f"extract e2e  : {e2e_rate:9.1f} images/s  ({n} images, decode + crop + encode + store)")
        print(f"ratio        : {e2e_rate / enc_rate:9.3f}   (target >= 0.85)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""One lever of the quickstart's sample quality, measured against a finished quickstart folder.

Retrains what the lever touches with the rest of that quickstart held fixed, samples 50 images a
class (600) for each sampling seed, and prints the share the quickstart's judge (the toy classifier,
trained on real toy images only) names right, in all and per class, beside the training time, the
dtype and this machine's measured matmul rate. What it retrains follows the flags:

- --dit-set: the DiT only, on the quickstart's latents; sampled with its VAE and pixel decoder;
- --vae-set: the whole chain (VAE, latents, DiT, the pixel decoder on the new VAE's outputs);
- --decoder-set: the pixel decoder only (on the quickstart's VAE outputs), sampled with its DiT;
- none of them: the quickstart's own models, e.g. with --sample options only.

Everything lands in QS/levers/NAME (a rerun reuses what is there). Each row of the README's table of
DiT and chain changes is one call (its cells were measured with an earlier form of this script), e.g.:

    python bench/quickstart_levers.py runs/quickstart --name seed1 --dit-set train.seed=1
    python bench/quickstart_levers.py runs/quickstart --name lr2e-3 --dit-set train.lr=2e-3
    python bench/quickstart_levers.py runs/quickstart --name vae-beta10 --vae-set loss.beta=2e-5
    python bench/quickstart_levers.py runs/quickstart --name decoder12 --decoder-set train.epochs=12
    python bench/quickstart_levers.py runs/quickstart --name shift2 --sample="--shift 2"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import g, matmul_peak
from flatdino_cli.analysis.toy_classifier import cached_toy_classifier, named_right
from flatdino_cli.extract import extract_latents
from flatdino_cli.runtime import setup_runtime
from flatdino_cli.toydata import CLASS_NAMES

CLI = [sys.executable, "-m", "flatdino_cli.cli"]


def sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def train(stage: str, out: Path, args: list[str]) -> float:
    """`flatdino train-STAGE ... --out out` unless out already finished; its seconds (0 if reused)."""
    if (out / "finished.json").exists():
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([*CLI, f"train-{stage}", *args, "--out", str(out), "--device", "cpu"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("qs", type=Path, help="a finished `flatdino quickstart --out` folder (flat laminator)")
    ap.add_argument("--name", required=True, help="this lever's folder under QS/levers")
    ap.add_argument("--dit-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--vae-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--decoder-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sample", default="", help="extra `flatdino sample` options, e.g. --sample='--shift 2'")
    ap.add_argument("--seeds", default="0,1", help="sampling seeds (default 0,1)")
    ap.add_argument("--per-class", type=int, default=50)
    args = ap.parse_args()
    qs, out = args.qs, args.qs / "levers" / args.name
    if not (qs / ".stages" / "sample.json").exists():
        raise SystemExit(f"{qs}: not a finished quickstart folder (run `flatdino quickstart --out {qs}` first)")
    rt = setup_runtime("cpu", "fp32", False)
    rate = matmul_peak(torch.device("cpu"), torch.float32)
    vae, latents, decoded, dit, decoder = (qs / k for k in ("vae", "latents", "vae-features", "dit", "decoder"))
    seconds = {}
    if args.vae_set:  # a new VAE: everything downstream of it is retrained on its outputs
        vae, latents, decoded = out / "vae", out / "latents", out / "vae-features"
        seconds["vae"] = train("vae", vae, ["--preset", "tiny-vae", "--features", str(qs / "features"),
                                            *sets(args.vae_set)])
        for dest, as_features in ((latents, False), (decoded, True)):
            if not dest.exists():
                extract_latents(qs / "features", vae, dest, rt, decoded=as_features)
    if args.vae_set or args.dit_set:
        dit = out / "dit"
        seconds["dit"] = train("dit", dit, ["--preset", "tiny-dit", "--latents", str(latents), *sets(args.dit_set)])
    if args.vae_set or args.decoder_set:
        decoder = out / "decoder"
        seconds["decoder"] = train("decoder", decoder, ["--preset", "tiny-decoder", "--images", str(qs / "toy"),
                                                        "--encoder", "tiny", "--features", str(decoded),
                                                        *sets(args.decoder_set)])
    judge, _ = cached_toy_classifier(size=48, seed=0)
    print(f"quickstart lever {args.name}: vae {args.vae_set or '-'}, dit {args.dit_set or '-'}, decoder "
          f"{args.decoder_set or '-'}, sample {args.sample or '-'}; cpu fp32, {torch.get_num_threads()} threads, "
          f"matmul {g(rate)}; trained " + (", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) or "nothing"))
    results = {"name": args.name, "seconds": seconds, "matmul": rate, "seeds": {}}
    for seed in args.seeds.split(","):
        so = out / f"samples-seed{seed}"
        if not so.exists():
            subprocess.run([*CLI, "sample", "--dit", str(dit), "--vae", str(vae), "--decoder", str(decoder),
                            "--classes", "all", "--per-class", str(args.per_class), "--seed", seed, "--out", str(so),
                            "--batch-size", "64", *shlex.split(args.sample)], check=True, stdout=subprocess.DEVNULL)
        data = np.load(next(so.glob("*.npz")))
        accuracy, per_class = named_right(judge, data["arr_0"], data["arr_1"])
        results["seeds"][seed] = {"accuracy": accuracy, "per_class": per_class}
        print(f"  seed {seed}: {accuracy:.1%} named right; per class "
              + " ".join(f"{CLASS_NAMES[c].split('_', 1)[1]} {a:.0%}" for c, a in per_class.items()))
    (out / "result.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

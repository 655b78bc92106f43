"""examples/imagenet.sh end to end, the script itself: an ImageNet-layout tree of a few images, the
`tiny` encoder, tiny presets, one epoch each, one CPU process under torchrun, a random-weight
Inception in clean-fid's file format. Every step runs its real code path; the numbers mean nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flatdino_cli.data import Store
from test_reconstruct import mixed_val_folder, tiny_decoder_run, write_inception

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _imagenet(root: Path, per_class: int = 4) -> Path:
    """train/nXXXXXXXX/*.JPEG (mixed sizes) and a val/ with mixed sizes, CMYK and greyscale files."""
    rng = np.random.default_rng(0)
    for c in range(2):
        d = root / "train" / f"n0000000{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = (56 + 4 * i, 48 + 6 * (i % 3))
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            a[..., c] = 255 - a[..., c] // 4  # a class colour: something for the models to pick up
            Image.fromarray(a).save(d / f"n0000000{c}_{i}.JPEG", quality=90)
    mixed_val_folder(root / "val")  # one synset folder: n00000000
    return root


def _presets(root: Path) -> tuple[Path, Path]:
    vae = {"stage": "vae", "model": {"kind": "flat", "tokens": 4, "latent_dim": 8, "enc_width": 32, "enc_depth": 1,
                                     "enc_heads": 2, "dec_width": 32, "dec_depth": 1, "dec_heads": 2,
                                     "mlp_ratio": 2.0},
           "train": {"batch_size": 4, "lr": 1e-3, "schedule": "wsd", "decay_epochs": 0.5, "weight_decay": 0.02,
                     "log_every": 1}}
    dit = {"stage": "dit", "model": {"tokens": 4, "in_dim": 8, "width": 32, "depth": 1, "heads": 2, "mlp_hidden": 64,
                                     "num_classes": 2},
           "flow": {"shift": 1.0, "steps": 4, "paper_steps": 4, "cfg_scale": 4.5, "cfg_interval": [0.225, 1.0]},
           "train": {"batch_size": 4, "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 1e-4,
                     "decay_2d_only": False, "grad_clip": 1.0, "ema": 0.9, "log_every": 1}}
    (root / "vae.yaml").write_text(yaml.safe_dump(vae))
    (root / "dit.yaml").write_text(yaml.safe_dump(dit))
    return root / "vae.yaml", root / "dit.yaml"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun on PATH (comes with torch)")
def test_imagenet_sh_runs_every_step(tmp_path):
    data = _imagenet(tmp_path / "imagenet")
    vae_preset, dit_preset = _presets(tmp_path)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(1).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8))
    out = tmp_path / "out"
    env = {**os.environ, "IMAGENET": str(data), "GPUS": "1", "OUT": str(out), "ENCODER": "tiny",
           "RAE_DECODER": str(tiny_decoder_run(tmp_path / "decoder")), "REF": str(ref),
           "INCEPTION": str(write_inception(tmp_path / "inception-2015-12-05.pt")),
           "VAE_PRESET": str(vae_preset), "DIT_PRESET": str(dit_preset), "VAE_EPOCHS": "1", "DIT_EPOCHS": "1",
           "PER_CLASS": "2", "BATCH": "8", "WORKERS": "0", "SAMPLE_BATCH": "4", "RECON_BATCH": "8",
           "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(_free_port()), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run(["bash", str(ROOT / "examples/imagenet.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

    feats = Store.open(out / "features-train")
    assert feats.count == 8 and feats.views == 2  # the crop and its mirror image
    assert Store.open(out / "features-val").manifest["preprocessing"]["interp"] == "bilinear"
    inputs = json.loads((out / "vae/inputs.json").read_text())
    assert inputs["images"]["augmentation"]["crop"] == "random_resized_crop_flip" and "val_features" in inputs
    assert Store.open(out / "latents-train").views == 2
    assert (out / "dit/checkpoints/latest/model.safetensors").is_file()
    for cfg in ("1.0", "4.5"):
        assert len(list((out / f"samples-cfg{cfg}/images").glob("*.png"))) == 4  # 2 per class x 2 classes
        assert json.loads((out / f"samples-cfg{cfg}/samples.json").read_text())["paper_sampler"]  # the paper's numbers
        assert np.isfinite(json.loads((out / f"gfid-cfg{cfg}.json").read_text())["fid"])
    assert len(list((out / "recon-val/originals").glob("*.png"))) == 5
    assert np.isfinite(json.loads((out / "rfid.json").read_text())["fid"])

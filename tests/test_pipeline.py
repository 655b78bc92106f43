"""The sampling pipeline (pipeline/): loaded from tiny random run dirs, generate() equals the decode
path computed by hand, a compiled DiT keeps the images and their batch invariance, each image's seed
and noise are its own, and pixels round to uint8 as PNGs store them. The `sample` command on the same
runs: test_sample.py."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from flatdino_cli import reconstruct as R
from flatdino_cli import viz
from flatdino_cli.flow import make_velocity_fn
from flatdino_cli.flow import sample as flow_sample
from flatdino_cli.pipeline import generate as PL
from flatdino_cli.pipeline.load import load_pipeline
from flatdino_cli.runtime import CPU
from test_sample import D, FLOW, NAMES, T, one_thread, padded, w  # noqa: F401 (fixtures: tiny runs, one thread)


def test_decode_path_matches_a_direct_computation(w):
    """latents -> VAE decoder -> pixel decoder -> round, by hand, equals generate()."""
    pipe = load_pipeline(w["dit"], w["vae"], w["dec"])
    labels, idx = [0, 2, 1], [0, 1, 2]
    got = PL.generate(pipe, labels, idx, seed=7, batch_size=2)
    noise = PL.image_noise(7, padded(idx), (T, D))
    with torch.no_grad():
        x = flow_sample(make_velocity_fn(pipe.dit, torch.tensor(padded(labels)), FLOW, len(NAMES)), noise, 3, 2.0)
        pix = pipe.decoder(pipe.vae.decode(x))[:3]
    want = (pix.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(got, want)


def test_compiled_sampling_dit_keeps_images_and_batch_invariance(w):
    """--compile: the DiT is torch.compile'd once per pipeline (static shapes: a chunk and its guided
    double) and gives the eager images up to one grey level, still independent of the batch."""
    pipe = load_pipeline(w["dit"], w["vae"], w["dec"])
    rt = dataclasses.replace(CPU, compile=True)
    eager = PL.generate(pipe, [0, 1, 2], [0, 1, 2], 0)
    compiled = PL.generate(pipe, [0, 1, 2], [0, 1, 2], 0, rt=rt)
    wrapper = pipe.compiled[1]
    assert wrapper is not pipe.dit and PL.sampling_dit(pipe, rt) is wrapper and PL.sampling_dit(pipe, CPU) is pipe.dit
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1
    assert np.array_equal(PL.generate(pipe, [2, 1, 0, 1], [2, 1, 0, 5], 0, rt=rt)[:3], compiled[::-1])


def test_seeds_and_uint8_rounding():
    assert PL.image_seed(0, 1) != PL.image_seed(1, 0) and PL.image_seed(2, 5) == PL.image_seed(2, 5)
    a = PL.image_noise(3, [4, 5], (2, 3))
    assert torch.equal(a[1], PL.image_noise(3, [5], (2, 3))[0])
    px = torch.tensor([0.5 / 255 - 1e-6, 0.5 / 255 + 1e-6, 1.2, -0.3]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert viz.to_uint8(px)[0, :, :, 0].tolist() == [[0, 1], [255, 0]]
    with pytest.raises(ValueError):
        viz.make_grid(np.zeros((2, 4, 4, 3), np.uint8), 2, labels=["a"])
    assert math.isclose(R.PSNR_CAP, 100.0)

"""`flatdino export DIT_RUN OUT --format diffusers`: the DiT, its VAE (none for an RAE grid), the pixel
decoder and a scheduler config as a diffusers pipeline with custom components; DiffusionPipeline loads it
with trust_remote_code and makes the pixels `flatdino sample` makes for the same labels and seed."""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from conftest import run_cli
from test_sample import C, D, NAMES, P, T, dec_cfg, dit_cfg, make_run, make_store, vae_cfg

from flatdino_cli.encoders import load_encoder
from flatdino_cli.models.stats import save_stats
from flatdino_cli.utils import sha256_file



@pytest.fixture(scope="module", autouse=True)
def code_cache(tmp_path_factory):
    """diffusers copies a folder's code into HF_MODULES_CACHE (read when diffusers is imported): a temporary
    one here, not the user's ~/.cache."""
    from diffusers.utils import dynamic_modules_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    torch.set_num_threads(1)
    feats = make_store(root / "feats", "features", (P, C), {"encoder": "tiny", "weights": load_encoder("tiny").weights_id,
                                                            "num_patches": P, "dim": C}, [0, 1, 2, 0], {"class_names": NAMES})
    vae = make_run(root / "vae", vae_cfg(), 1, inputs={"features": {"path": str(feats), "manifest_sha256": "x"}}, scale=0.3)
    ident = {"vae_run": str(vae.resolve()), "vae_checkpoint_sha256": sha256_file(vae / "checkpoints/latest/model.safetensors")}
    lat = make_store(root / "latents", "latents", (T, D), ident, [0, 1, 2, 0], {"class_names": NAMES})
    dit = make_run(root / "dit", dit_cfg(), 2, ema=True, inputs={"latents": {"path": str(lat), "kind": "latents",
                                                                             "identity": ident}})
    rae = make_run(root / "rae", dit_cfg(P, C, grid=(6, 6), normalize=True), 3, ema=True,
                   inputs={"latents": {"path": str(feats), "kind": "features"}})
    g = torch.Generator().manual_seed(0)
    save_stats(rae / "stats.pt", torch.randn(P, C, generator=g), torch.rand(P, C, generator=g) + 0.5, (6, 6))
    uncond_cfg = dit_cfg()
    uncond_cfg = dataclasses.replace(uncond_cfg, model=dataclasses.replace(uncond_cfg.model, num_classes=0),
                                     flow=dataclasses.replace(uncond_cfg.flow, cfg_scale=1.0))
    uncond = make_run(root / "uncond", uncond_cfg, 5, ema=True,
                      inputs={"latents": {"path": str(lat), "kind": "latents", "identity": ident}})
    return {"root": root, "vae": vae, "dit": dit, "rae": rae, "uncond": uncond,
            "dec": make_run(root / "dec", dec_cfg(), 4, ema=True)}


def flatdino_sample(out, *args):
    run_cli("sample", *args, "--out", out, "--steps", "3")
    with np.load(next(out.glob("samples_*.npz"))) as z:
        return z["arr_0"]


def test_flat_dit_pipeline_makes_flatdino_samples_pixels(runs, tmp_path):
    out = tmp_path / "pipe"
    run_cli("export", runs["dit"], out, "--format", "diffusers", "--vae", runs["vae"], "--decoder", runs["dec"])
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "transformer", "vae", "decoder", "scheduler",
                                                "pipeline_flatdino.py", "README.md"}
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    want = flatdino_sample(tmp_path / "s", "--dit", runs["dit"], "--vae", runs["vae"], "--decoder", runs["dec"],
                           "-c", "1", "-n", "3", "--seed", "5")
    got = pipe(class_labels=["blue square"] * 3, seed=5, num_inference_steps=3, output_type="np").images
    assert got.dtype == np.uint8 and got.shape == want.shape == (3, 48, 48, 3)
    assert np.array_equal(got, want)  # guided (the run's w = 2), same seeds, same pixels
    unguided = flatdino_sample(tmp_path / "s1", "--dit", runs["dit"], "--vae", runs["vae"], "--decoder", runs["dec"],
                               "-c", "1", "-n", "3", "--seed", "5", "--cfg", "1")
    assert not np.array_equal(unguided, want)
    assert np.array_equal(pipe(class_labels=[1, 1, 1], seed=5, num_inference_steps=3, guidance_scale=1.0,
                               output_type="np").images, unguided)
    pil = pipe(class_labels=[1], seed=5, num_inference_steps=3).images
    assert np.array_equal(np.asarray(pil[0]), want[0])
    import json

    facts = json.loads(run_cli("info", out, "--json").stdout)
    assert "diffusers pipeline" in facts["what"] and facts["components"] == "decoder, scheduler, transformer, vae"
    assert facts["generates"] == f"{T} x {D}, {len(NAMES)} classes"


def test_rae_grid_pipeline_has_no_vae_and_keeps_the_statistics(runs, tmp_path):
    out = tmp_path / "pipe"
    run_cli("export", runs["rae"], out, "--format", "diffusers", "--decoder", runs["dec"])
    assert not (out / "vae").exists()
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert pipe.vae is None and pipe.transformer.stats is not None
    want = flatdino_sample(tmp_path / "s", "--dit", runs["rae"], "--decoder", runs["dec"], "-c", "2", "-n", "2")
    assert np.array_equal(pipe(class_labels=[2, 2], num_inference_steps=3, output_type="np").images, want)


def test_unconditional_pipeline_takes_no_labels(runs, tmp_path):
    from flatdino_cli.errors import UserError

    out = tmp_path / "pipe"
    run_cli("export", runs["uncond"], out, "--format", "diffusers", "--vae", runs["vae"], "--decoder", runs["dec"])
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    want = flatdino_sample(tmp_path / "s", "--dit", runs["uncond"], "--vae", runs["vae"], "--decoder", runs["dec"],
                           "-n", "2", "--seed", "1")
    assert np.array_equal(pipe(num_images=2, seed=1, num_inference_steps=3, output_type="np").images, want)
    with pytest.raises(UserError, match="unconditional"):
        pipe(num_images=2, guidance_scale=3.0)


def test_pipeline_export_needs_a_decoder(runs, tmp_path):
    p = run_cli("export", runs["dit"], tmp_path / "x", "--format", "diffusers", "--vae", runs["vae"], check=False)
    assert p.returncode == 1 and "--decoder" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr

"""`flatdino plot` (analysis/curves.py): several runs overlaid on steps or on the FLOPs module's training
compute, the panels each kind of run has data for, and one-line errors. The runs are folders the
test writes (config.yaml from the tiny presets, metrics.jsonl with made-up curves, inputs.json)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flatdino_cli.analysis import flops as F
from flatdino_cli.analysis.curves import flops_per_step, plot_runs, smooth
from flatdino_cli.config_yaml import load_preset, save_config
from flatdino_cli.errors import UserError
from flatdino_cli.stages.dit import T_BUCKETS


TINY_STORE = ["model.num_patches=36", "model.feature_dim=64"]  # what train-vae records for tiny-encoder features


def preset(name: str):
    return load_preset(name, TINY_STORE if "vae" in name or name == "tiny-fae" else [])


def write_run(path: Path, name: str, rows: list[dict], inputs: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_config(preset(name), path / "config.yaml")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')  # a cut line
    (path / "inputs.json").write_text(json.dumps(inputs or {}))
    return path


def dit_rows(steps: int, scale: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(10, steps + 1, 10):
        base = scale * (0.4 + 1.0 / math.sqrt(s))
        row = {"step": s, "epoch": s / 50, "loss": base * (1 + 0.15 * rng.standard_normal()),
               "lr": 1e-3 * min(1.0, s / 100), "grad_norm": 1.0, "samples_per_s": 500.0}
        for lo, hi in zip(T_BUCKETS[:-1], T_BUCKETS[1:]):
            row[f"loss_t{lo:.2f}-{hi:.2f}"] = base * (2.0 - 1.5 * lo) * (1 + 0.1 * rng.standard_normal())
        out.append(row)
    return out


@pytest.fixture
def runs(tmp_path):
    """A flat and an FAE DiT run on their VAEs' latents (the quickstart pair), and a VAE run with validation."""
    vae = write_run(tmp_path / "vae", "tiny-vae",
                    [{"step": s, "loss": 1 / s, "lr": 1e-3} for s in range(1, 41)]
                    + [{"step": s, "val/loss": 2 / s, "val/cosine": 1 - 1 / s, "val/huber": 1 / s} for s in (20, 40)])
    fae = write_run(tmp_path / "fae", "tiny-fae", [{"step": 1, "loss": 1.0, "lr": 1e-3}])
    flat = write_run(tmp_path / "flat" / "dit", "tiny-dit", dit_rows(600, 1.0, 0),
                     {"latents": {"kind": "latents", "identity": {"vae_run": str(vae)}}})
    grid = write_run(tmp_path / "fae" / "dit", "tiny-fae-dit", dit_rows(500, 1.2, 1),
                     {"latents": {"kind": "latents", "identity": {"vae_run": str(fae)}}})
    return {"vae": vae, "flat": flat, "fae": grid}


def test_flops_axis_counts_each_dit_with_its_own_laminator(runs):
    for name, dit_preset, vae_preset in (("flat", "tiny-dit", "tiny-vae"), ("fae", "tiny-fae-dit", "tiny-fae")):
        dit, vae = preset(dit_preset), preset(vae_preset)
        # tiny encoder features (not 256 x 768): no DINOv2-B cost, the laminator's encoder is counted
        want = dit.train.batch_size * (3 * F.dit_forward_flops(dit) + F.vae_encoder_flops(vae))
        assert flops_per_step(runs[name], dit) == pytest.approx(want)
    rae = load_preset("rae-xl-256x768")  # raw DINOv2-B features: the DINOv2 encoding, no laminator
    rae_run = runs["vae"].parent / "rae"
    rae_run.mkdir()
    (rae_run / "inputs.json").write_text(json.dumps({"latents": {"kind": "features"}}))
    assert flops_per_step(rae_run, rae) == pytest.approx(
        rae.train.batch_size * (3 * F.dit_forward_flops(rae) + F.dinov2_flops()))


def test_plot_overlays_runs_on_steps_and_flops(runs, tmp_path):
    r = plot_runs([runs["flat"], runs["fae"]], tmp_path / "steps.png", labels=["flat", "FAE"])
    assert r["panels"] == ["loss", "buckets", "lr"] and r["runs"] == ["flat", "FAE"]
    r = plot_runs([runs["flat"], runs["fae"]], tmp_path / "flops.png", axis="flops", title="quickstart")
    assert r["runs"] == ["flat/dit", "fae/dit"]  # folder names repeat: their parents tell them apart
    for name in ("steps.png", "flops.png"):
        img = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        assert img.shape[1] > 1500 and img.std() > 10  # three readable panels at 200 dpi, not blank
    r = plot_runs([runs["vae"]], tmp_path / "vae.png")
    assert r["panels"] == ["loss", "lr", "val/loss", "val/cosine", "val/huber"]


def test_smoothing_is_debiased_ema():
    assert smooth([2.0, 2.0, 2.0], 0.9).tolist() == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    assert smooth([1.0, 3.0], 0.0).tolist() == [1.0, 3.0]
    assert smooth([0.0, 10.0], 0.5)[1] == pytest.approx(10 * 0.5 / 0.75)


def test_plot_errors_are_one_line(runs, tmp_path):
    with pytest.raises(UserError, match="a vae run; --x flops is for train-dit runs"):
        plot_runs([runs["vae"]], tmp_path / "x.png", axis="flops")
    with pytest.raises(UserError, match="not a flatdino run directory"):
        plot_runs([tmp_path / "nothing"], tmp_path / "x.png")
    with pytest.raises(UserError, match="--label given 1 times for 2 runs"):
        plot_runs([runs["flat"], runs["fae"]], tmp_path / "x.png", labels=["a"])
    (runs["flat"] / "inputs.json").write_text(json.dumps({"latents": {"kind": "latents", "identity": {
        "vae_run": str(tmp_path / "moved")}}}))
    with pytest.raises(UserError, match="needs the VAE run its latents came from"):
        plot_runs([runs["flat"]], tmp_path / "x.png", axis="flops")
    assert not (tmp_path / "x.png").exists()

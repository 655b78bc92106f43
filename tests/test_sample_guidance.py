"""`flatdino sample`'s guidance and solver options on RAE-layout checkpoints (built in
test_interop_rae.py): AutoGuidance with a weak DiT exactly as the formula says and its mismatches
refused in one line, the SDE sampler batch-invariant, and CFG schedules recorded in samples.json."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from flatdino_cli.checkpoint import save_checkpoint
from flatdino_cli.config import DiTModelConfig, DiTStageConfig
from flatdino_cli.config_yaml import save_config
from flatdino_cli.flow import FlowConfig, time_grid
from flatdino_cli.models import build_model
from flatdino_cli.pipeline import generate as P
from flatdino_cli.pipeline.load import load_pipeline
from flatdino_cli.pipeline.options import sampling_flow
from flatdino_cli.utils import atomic_write_json
from test_interop_rae import K, cli, one_line_error, w, write_stats  # noqa: F401 (fixture: RAE checkpoints)


# ----------------------------------------------------------------------------- AutoGuidance, SDE, CFG schedule
def test_guide_changes_samples_exactly_as_the_formula_says(w, tmp_path):
    flow = FlowConfig(steps=4, shift=2.0, cfg_scale=1.7, cfg_interval=(0.0, 1.0), cfg_interval_inclusive=True)
    pipe = load_pipeline(w["root"] / "ddt", decoder=w["decoder"], guide=w["root"] / "weak")
    assert pipe.identity["guide"]["format"] == "rae" and pipe.guide is not None
    labels, idx = [0, 3], [0, 1]
    got = P.generate(pipe, labels, idx, seed=0, flow=flow)
    # the formula by hand: Euler on v = v_weak + w (v_main - v_weak), 4 steps to t = 1
    pad = [0, 3] + [3] * (P.CPU_CHUNK - 2)
    x = P.image_noise(0, [0, 1] + [1] * (P.CPU_CHUNK - 2), pipe.latent_shape)
    y = torch.tensor(pad)
    ts = time_grid(4, 2.0).tolist()
    with torch.no_grad():
        for i in range(4):
            t = torch.full((len(pad),), ts[i])
            vm, vg = pipe.dit(x, t, y), pipe.guide(x, t, y)
            x = x + (ts[i + 1] - ts[i]) * (vg + 1.7 * (vm - vg))
    want = pipe.decode(x)[:2]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    plain = P.generate(load_pipeline(w["root"] / "ddt", decoder=w["decoder"]), labels, idx, seed=0, flow=flow)
    cfg = P.generate(pipe.__class__(**{**pipe.__dict__, "guide": None}), labels, idx, seed=0, flow=flow)
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 1  # guidance changed the samples
    assert np.abs(got.astype(int) - cfg.astype(int)).mean() > 1  # and it is not CFG
    # through the command line: the manifest records the guide and the weight
    r = cli("sample", "--dit", w["root"] / "ddt", "--decoder", w["decoder"], "--guide", w["root"] / "weak",
            "--guide-scale", "1.42", "-c", "0", "-n", "2", "--steps", "3", "--out", tmp_path / "ag")
    assert "autoguidance 1.42" in r.output
    m = json.loads((tmp_path / "ag" / "samples.json").read_text())["identity"]
    assert m["guide"]["path"].endswith("weak") and m["flow"]["cfg_scale"] == 1.42 and m["flow"]["grid"] == "rae"


def test_guide_mismatches_are_one_line_errors(w, tmp_path):
    base = ("sample", "--dit", w["root"] / "ddt", "--decoder", w["decoder"], "-c", "0", "-n", "1", "--steps", "2",
            "--out", tmp_path / "o")
    other = tmp_path / "classes"
    other.mkdir()
    sd = dict(w["weak"])
    sd["y_embedder.embedding_table.weight"] = torch.zeros(K + 3, 16)
    torch.save(sd, other / "stage2_model.pt")
    assert "classes" in one_line_error(cli(*base, "--guide", other, "--guide-scale", "1.5", ok=False))
    stats = tmp_path / "stats"
    stats.mkdir()
    torch.save(w["weak"], stats / "stage2_model.pt")
    write_stats(stats / "stat.pt", seed=9)
    assert "other statistics" in one_line_error(cli(*base, "--guide", stats, "--guide-scale", "1.5", ok=False))
    assert "--guide-scale" in one_line_error(cli(*base, "--guide", w["root"] / "weak", ok=False))
    assert "pass one" in one_line_error(cli(*base, "--guide", w["root"] / "weak", "--guide-scale", "1.5",
                                            "--cfg", "2", ok=False))
    flat = tmp_path / "flat"
    flat.mkdir()
    cfg = DiTStageConfig(model=DiTModelConfig(tokens=4, in_dim=8, width=16, depth=1, heads=2, mlp_hidden=32,
                                              num_classes=K))
    save_config(cfg, flat / "config.yaml")
    save_checkpoint(flat, "latest", build_model(cfg), None, {"step": 1})
    atomic_write_json(flat / "inputs.json", {})
    assert "latent shape" in one_line_error(cli(*base, "--guide", flat, "--guide-scale", "1.5", ok=False))


def test_sde_and_schedule_through_sample(w, tmp_path):
    """`sample --sampler sde`: per-step noise from each image's own generator, so a seed gives the same
    images at any batch size; it differs from the ODE; samples.json records the SDE and the schedule."""
    pipe = load_pipeline(w["root"] / "ddt", decoder=w["decoder"])
    sde = sampling_flow(pipe.cfg.flow, cfg_scale=1.0, steps=5, sampler="sde")
    assert sde.grid == "ours"  # an RAE checkpoint's ODE grid does not carry over to the SDE
    labels, idx = [0, 1, 2, 3, 4, 0, 1, 2, 3], list(range(9))
    whole = P.generate(pipe, labels, idx, seed=3, flow=sde, batch_size=16)
    one = np.concatenate([P.generate(pipe, [c], [i], seed=3, flow=sde, batch_size=1) for c, i in zip(labels, idx)])
    assert np.array_equal(whole, one)
    ode = P.generate(pipe, labels, idx, seed=3, flow=dataclasses.replace(sde, sampler="euler"))
    assert np.abs(whole.astype(int) - ode.astype(int)).mean() > 1
    r = cli("sample", "--dit", w["root"] / "ddt", "--decoder", w["decoder"], "-c", "0", "-n", "2", "--steps", "4",
            "--sampler", "sde", "--cfg-schedule", "0-0.5:0.9,0.5-1:2", "--out", tmp_path / "s")
    assert "cfg 0.9 on [0, 0.5) / 2 on [0.5, 1)" in r.output and "sde 4 steps" in r.output
    flow = json.loads((tmp_path / "s" / "samples.json").read_text())["identity"]["flow"]
    assert flow["cfg_schedule"] == [[0.0, 0.5, 0.9], [0.5, 1.0, 2.0]] and flow["sampler"] == "sde"
    assert (flow["sde_diffusion"], flow["sde_last_step"]) == (1.0, 0.04) and "grid" not in flow
    assert flow["shift"] == pytest.approx(math.sqrt(16 * 8 / 4096))  # the checkpoint's own shift, sqrt(T d / 4096)
    r = cli("sample", "--dit", w["root"] / "ddt", "--decoder", w["decoder"], "-c", "0", "-n", "1", "--steps", "3",
            "--sampler", "sde", "--shift", "1", "--out", tmp_path / "s1")  # SiT's uniform SDE grid
    assert json.loads((tmp_path / "s1" / "samples.json").read_text())["identity"]["flow"]["shift"] == 1.0
    base = ("sample", "--dit", w["root"] / "ddt", "--decoder", w["decoder"], "-c", "0", "-n", "1", "--out",
            tmp_path / "bad")
    assert "--cfg-schedule" in one_line_error(cli(*base, "--cfg-schedule", "0-1", ok=False))
    assert "cfg_schedule" in one_line_error(cli(*base, "--cfg-schedule", "0-0.6:2,0.5-1:2", ok=False))
    assert "without --cfg" in one_line_error(cli(*base, "--cfg-schedule", "0-1:2", "--cfg", "3", ok=False))
    assert "grid must be ours" in one_line_error(cli(*base, "--sampler", "sde", "--grid", "rae", ok=False))

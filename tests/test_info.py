"""`flatdino info PATH` (info.py) on a run, its export, a store, a sample set, and RAE's released file
formats (decoder model.pt with RAE's key names, stat.pt), written here from tiny random models."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatdino_cli.cli import app
from flatdino_cli.data import Store
from flatdino_cli.info import describe
from flatdino_cli.models import build_model
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.models.pixel_decoder import ours_to_rae_state_dict
from flatdino_cli.models.stats import save_rae_stats
from flatdino_cli.errors import UserError

from test_hub import TINY_STORE, make_run
from test_sample import w  # noqa: F401 (fixture: tiny dit, vae and decoder runs)


def facts(path) -> dict:
    return dict(describe(path))


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    s = Store.create(path, "features", (36, 64), 10, "float16", {"encoder": "tiny", "weights": None}, {},
                     [f"img{i}.png" for i in range(10)], [i % 2 for i in range(10)])
    s.write_rows(np.arange(8), np.zeros((8, 36, 64), np.float16))
    s.mark_done(np.arange(8))
    s.close()
    return path


def test_info_on_a_run_and_its_export(tmp_path, store):
    vae = make_run(tmp_path / "vae", "tiny-vae", TINY_STORE, {"features": {"path": str(store)}})
    f = facts(vae)
    assert f["what"] == "vae run" and f["preset"] == "tiny-vae"
    assert f["latents"] == "16 tokens x 16 (flat) from 36 x 64 features"
    assert f["parameters"].startswith("total ") and "M" in f["parameters"]
    assert f["data"] == f"features {store}, encoder tiny, 10 items"
    assert f["steps"] == "7 / 10 (batch 32)" and f["best val"] == "val/loss 0.5 (step 7)"
    assert f["checkpoint"].endswith("checkpoints/latest") and f["weights read"].endswith("model.safetensors")
    assert f["disk"].endswith("KB") or f["disk"].endswith("MB")
    dit = make_run(tmp_path / "dit", "tiny-dit", ["model.depth=2"])
    assert facts(dit)["preset"].startswith("custom") and facts(dit)["data"] == "not recorded"
    grouped = make_run(tmp_path / "vae-grouped", "tiny-vae", [*TINY_STORE, "model.patch_group=2"])
    assert facts(grouped)["preset"] == "tiny-vae with model.patch_group=2"  # the quickstart's VAE on tiny-p4

    out = tmp_path / "export"
    assert CliRunner().invoke(app, ["export", str(vae), str(out)]).exit_code == 0
    f = facts(out)
    assert f["what"] == "exported vae run" and f["steps"] == "7 / 10" and f["best val"] == "val/loss 0.5 (step 7)"
    assert f["weights"].endswith("model.safetensors (checkpoints/latest/model.safetensors of the run)")


def test_info_on_a_store(store):
    f = facts(store)
    assert f["what"] == "features store" and f["items"] == "10 x (36, 64) float16"
    assert f["progress"] == "8 done, 0 unreadable, 2 pending" and f["made by"].startswith("encoder tiny")


def test_info_on_rae_release_files_and_cli_output(tmp_path):
    cfg = load_preset("tiny-decoder")
    dec = build_model(cfg)
    rae_dir = tmp_path / "ViTXL_n08"
    rae_dir.mkdir()
    torch.save(ours_to_rae_state_dict(dec.state_dict()), rae_dir / "model.pt")
    f = facts(rae_dir)  # RAE's release folder -> its model.pt
    assert f["what"].startswith("RAE's pixel decoder") and "--decoder" in f["what"]
    assert f["contents"] == "ViT width 128, depth 3: 36 x 64 features -> 48 px images"
    save_rae_stats(tmp_path / "stat.pt", torch.zeros(768, 16, 16), torch.ones(768, 16, 16))
    f = facts(tmp_path / "stat.pt")
    assert f["what"].startswith("RAE's latent statistics") and f["contents"] == "mean (768, 16, 16), var (768, 16, 16)"

    r = CliRunner().invoke(app, ["info", str(tmp_path / "stat.pt"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["contents"].startswith("mean")
    r = CliRunner().invoke(app, ["info", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and r.output.strip() == f"flatdino: error: {tmp_path / 'nothing'}: not found"
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a file flatdino recognises"):
        describe(tmp_path / "other.pt")


def test_info_on_a_sample_set_shows_the_solver_and_its_evaluations(w, tmp_path):
    """A real `sample` folder (test_sample's tiny runs): info reads samples.json."""
    from flatdino_cli.flow import FlowConfig, network_evaluations

    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["sample", "--dit", str(w["dit"]), "--vae", str(w["vae"]), "--decoder", str(w["dec"]),
                                 "--out", str(out), "--device", "cpu", "--class", "1", "-n", "2", "--sampler", "heun",
                                 "--steps", "3", "--cfg", "2.0"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "samples.json").read_text())
    f = facts(out)
    assert f["what"] == "sample set (complete)"
    assert f["images"].startswith("2 at 48 px, 1 classes, seed 0")
    assert f["solver"].startswith("heun, 3 steps, shift ")
    assert f["guidance"].startswith("CFG w 2.0 on t in [")
    flow = m["identity"]["flow"]
    want = network_evaluations(FlowConfig(sampler="heun", steps=3, cfg_scale=2.0, shift=flow["shift"],
                                          cfg_interval=tuple(flow["cfg_interval"]),
                                          cfg_interval_inclusive=flow["cfg_interval_inclusive"]))
    assert want > 5  # 5 velocity evaluations (heun, 3 steps), the guided ones counted twice
    assert f["evaluations"] == f"{want} network evaluations per image (a guided one counts 2)"
    assert str(w["dit"].resolve()) in f["made by"] and str(w["dec"].resolve()) in f["made by"]

    m["complete"], m["network_evaluations"] = False, None  # cut short / an older set without the count
    (out / "samples.json").write_text(json.dumps(m))
    f = facts(out)
    assert f["what"].startswith("sample set (incomplete") and f["evaluations"] == "not recorded"
    (out / "samples.json").write_text("{}")
    with pytest.raises(UserError, match="samples.json: unreadable or without an identity"):
        describe(out)


def test_info_shows_the_evaluations_dopri5_used(w, tmp_path):
    """An adaptive solver's count, recorded after sampling (flow.adaptive_tally), is what info shows."""
    pytest.importorskip("torchdiffeq")  # the ode extra (installed with the test extra)
    out = tmp_path / "ode"
    r = CliRunner().invoke(app, ["sample", "--dit", str(w["dit"]), "--vae", str(w["vae"]), "--decoder", str(w["dec"]),
                                 "--out", str(out), "--device", "cpu", "--class", "1", "-n", "2", "--sampler", "dopri5"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "samples.json").read_text())
    nfe, tally = m["network_evaluations"], m["adaptive_evaluations"]
    assert nfe >= 6 and f"{nfe:g} network evaluations per image" in r.output
    f = facts(out)
    assert f["solver"].startswith("dopri5, ")
    assert f["evaluations"] == (f"{nfe:g} network evaluations per image (a guided one counts 2); adaptive: mean "
                                f"over 2 images, {tally['min']}-{tally['max']} per chunk")

"""The DiT's class count comes from the data: train-dit takes it from the latent store's labels (the
preset's value is only the ImageNet default), a resumed run keeps its label table and refuses a store
with more classes, and a store without labels trains an unconditional model that samples without
--class and refuses guidance."""

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_sample import dec_cfg, make_run, make_store, vae_cfg

from flatdino_cli.config_yaml import load_preset
from flatdino_cli.rundir import run_config
from flatdino_cli.data import Store, with_store_shape
from flatdino_cli.utils import sha256_file

T, D = 4, 8  # test_sample's tiny latents (vae_cfg)
SMALL = ["model.width=16", "model.depth=1", "model.heads=2", "model.mlp_hidden=32", "train.max_steps=2",
         "train.batch_size=4", "train.ckpt_every_steps=1000"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A VAE run and a pixel decoder (random, tiny) and latent stores said to come from that VAE."""
    root = tmp_path_factory.mktemp("classes")
    vae = make_run(root / "vae", vae_cfg(), 1, scale=0.3)
    ident = {"vae_run": str(vae.resolve()), "vae_checkpoint_sha256": sha256_file(vae / "checkpoints/latest/model.safetensors")}

    def latents(name, labels, names=None):
        extra = {"class_names": names} if names is not None else {}
        return make_store(root / name, "latents", (T, D), ident, labels, extra)

    return {"root": root, "vae": vae, "dec": make_run(root / "dec", dec_cfg(), 4, ema=True), "latents": latents}


def train(out, latents, *extra, check=True):
    sets = [a for s in SMALL for a in ("--set", s)]
    return run_cli("train-dit", "--preset", "tiny-dit", "--latents", latents, "--out", out, "--device", "cpu",
                   *sets, *extra, check=check)


def one_line(p, *words):
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_store_class_count(tmp_path):
    def store(labels, extra):
        path = make_store(tmp_path / f"s{len(list(tmp_path.iterdir()))}", "latents", (T, D), {"t": 1}, labels, extra)
        return Store.open(path)

    assert store([0, 4, 1], {}).num_classes == 5  # largest label + 1
    assert store([0, 1], {"class_names": [f"c{i}" for i in range(37)]}).num_classes == 37  # the folder's classes
    assert store([-1, -1], {}).num_classes == 0  # an unlabelled folder
    cfg = with_store_shape(load_preset("xl-32x128"), store([0, 36, 2], {}), "here")
    assert cfg.model.num_classes == 37 and cfg.flow.cfg_scale == load_preset("xl-32x128").flow.cfg_scale
    uncond = with_store_shape(load_preset("tiny-dit"), store([-1, -1, -1], {}), "here")
    assert uncond.model.num_classes == 0 and uncond.flow.cfg_scale == 1.0


def test_train_dit_takes_the_class_count_from_the_store(runs, tmp_path):
    lat = runs["latents"]("lat37", list(range(37)) * 2, [f"class {i}" for i in range(37)])
    train(tmp_path / "run", lat)  # tiny-dit says 12 classes; the store has 37: no --set needed
    assert run_config(tmp_path / "run").model.num_classes == 37
    assert load_preset("tiny-dit").model.num_classes == 12

    fewer = runs["latents"]("lat5", [0, 1, 2, 3, 4] * 2)
    train(tmp_path / "run", fewer, "--new-data", "--set", "train.max_steps=3")  # resumed: the 37-row label table stays
    assert run_config(tmp_path / "run").model.num_classes == 37

    more = runs["latents"]("lat40", list(range(40)))
    one_line(train(tmp_path / "run", more, "--new-data", "--set", "train.max_steps=4", check=False), "40 classes", "37 classes",
             "--no-resume")
    unlabelled = runs["latents"]("lat_none", [-1] * 6)
    train(tmp_path / "run", unlabelled, "--new-data", "--set", "train.max_steps=4")  # trained as the null class
    cfg = run_config(tmp_path / "run")
    assert cfg.model.num_classes == 37 and cfg.flow.cfg_scale == load_preset("tiny-dit").flow.cfg_scale


def test_unlabelled_store_trains_an_unconditional_model(runs, tmp_path):
    lat = runs["latents"]("unlabelled", [-1] * 8)
    train(tmp_path / "dit", lat)
    cfg = run_config(tmp_path / "dit")
    assert cfg.model.num_classes == 0 and cfg.flow.cfg_scale == 1.0  # tiny-dit's w = 6 would guide nothing

    base = ["sample", "--dit", tmp_path / "dit", "--vae", runs["vae"], "--decoder", runs["dec"], "--steps", "2"]
    run_cli(*base, "-n", "3", "--out", tmp_path / "s", "--batch-size", "2")  # no --class
    with np.load(tmp_path / "s" / "samples_3x48x48x3.npz") as z:
        assert z["arr_0"].shape == (3, 48, 48, 3) and (z["arr_1"] == 0).all()
        assert z["arr_0"][0].std() > 0 and not np.array_equal(z["arr_0"][0], z["arr_0"][1])  # seeds differ
    run_cli(*base, "-n", "1", "--cfg", "1", "--out", tmp_path / "s1")  # w = 1 is no guidance: accepted
    one_line(run_cli(*base, "--cfg", "2", "--out", tmp_path / "s2", check=False), "unconditional", "--cfg")
    one_line(run_cli(*base, "--class", "0", "--out", tmp_path / "s3", check=False), "unconditional", "--class")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()



def test_info_says_unconditional(runs, tmp_path):
    import json

    train(tmp_path / "dit", runs["latents"]("unlabelled2", [-1] * 4))
    facts = json.loads(run_cli("info", tmp_path / "dit", "--json").stdout)
    assert facts["generates"] == f"{T} x {D}, unconditional (trained without labels)"

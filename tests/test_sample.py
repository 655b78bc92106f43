"""`flatdino sample`: tiny random run dirs (VAE, DiT, pixel decoder, stores) built here (the fixture `w`,
which other test files import), then the command end to end: outputs, seeds vs batch size, class
names, one-line refusals of mismatched runs, the RAE-mode path, a killed sharded run resumed, PNGs
written off the sampling thread, the grid and its row labels. The pipeline under it:
test_pipeline.py; reconstruct: test_reconstruct.py; guidance options: test_sample_guidance.py."""

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flatdino_cli import classes
from flatdino_cli.pipeline import generate as PL
from flatdino_cli import sample as S
from flatdino_cli import viz
from flatdino_cli.stages import dit as dit_stage
from flatdino_cli.checkpoint import save_checkpoint
from flatdino_cli.cli import app
from flatdino_cli.config import (DecoderModelConfig, DecoderStageConfig, DiTModelConfig, DiTStageConfig, VAEModelConfig,
                                 VAEStageConfig)
from flatdino_cli.config_yaml import save_config
from flatdino_cli.data import EncoderTransform, Store
from flatdino_cli.encoders import load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig, adaptive_tally, make_velocity_fn, network_evaluations
from flatdino_cli.flow import sample as flow_sample
from flatdino_cli.models import build_model
from flatdino_cli.models.stats import load_stats, save_stats
from flatdino_cli.pipeline.load import load_pipeline
from flatdino_cli.runtime import CPU
from flatdino_cli.utils import atomic_write_json, sha256_file

P, C = 36, 64  # the `tiny` encoder: 48 px, patch 8 -> 6 x 6 patches of width 64
T, D = 4, 8  # tiny "32 x 128"
NAMES = ["red circle", "blue square", "green triangle"]
FLOW = FlowConfig(steps=3, shift=2.0, cfg_scale=2.0, cfg_interval=(0.0, 1.0))


def vae_cfg(latent: int = D) -> VAEStageConfig:
    return VAEStageConfig(model=VAEModelConfig(tokens=T, latent_dim=latent, feature_dim=C, num_patches=P,
                                               enc_width=16, enc_depth=1, enc_heads=2, dec_width=16, dec_depth=1,
                                               dec_heads=2))


def dit_cfg(tokens: int = T, in_dim: int = D, grid=None, normalize: bool = False) -> DiTStageConfig:
    return DiTStageConfig(model=DiTModelConfig(tokens=tokens, in_dim=in_dim, grid=grid, width=16, depth=1, heads=2,
                                               mlp_hidden=32, num_classes=len(NAMES)), flow=FLOW, normalize=normalize)


def dec_cfg(in_dim: int = C) -> DecoderStageConfig:
    return DecoderStageConfig(model=DecoderModelConfig(in_dim=in_dim, num_patches=P, patch_size=8, width=16, depth=1,
                                                       heads=2, mlp_hidden=32))


def make_run(path, cfg, seed: int, ema: bool = False, inputs: dict | None = None, scale: float = 0.1):
    """A run dir as the trainers leave it; weights perturbed (N(0, scale)) so that zero-initialised
    layers do something and the images depend on the latents."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    ema_model = None
    if ema:
        ema_model = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema_model.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn_like(p))
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    save_checkpoint(path, "latest", model, ema_model, {"step": 1})
    atomic_write_json(path / "inputs.json", inputs or {})
    return path


def make_store(path, kind, shape, identity, labels, extra):
    store = Store.create(path, kind, shape, len(labels), "float32", identity=identity,
                         preprocessing=EncoderTransform(48, 48, "bicubic").spec(),
                         paths=[f"/x/{i}.png" for i in range(len(labels))], labels=labels, extra=extra)
    store.write_rows(np.arange(len(labels)), np.random.default_rng(0).normal(size=(len(labels), *shape)))
    store.mark_done(np.arange(len(labels)))
    store.finalize()
    store.close()
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes
    each tiny matmul ~10x slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    feats = make_store(root / "feats", "features", (P, C),
                       {"encoder": "tiny", "weights": load_encoder("tiny").weights_id, "num_patches": P,
                        "dim": C}, [0, 1, 2, 0], {"class_names": NAMES})
    vae = make_run(root / "vae", vae_cfg(), 1, inputs={"features": {"path": str(feats), "manifest_sha256": "x"}},
                   scale=0.3)
    vae_sha = sha256_file(vae / "checkpoints/latest/model.safetensors")
    lat_ident = {"vae_run": str(vae.resolve()), "vae_checkpoint_sha256": vae_sha}
    lat = make_store(root / "latents", "latents", (T, D), lat_ident, [0, 1, 2, 0], {"class_names": NAMES})
    dit = make_run(root / "dit", dit_cfg(), 2, ema=True,
                   inputs={"latents": {"path": str(lat), "kind": "latents", "identity": lat_ident}})
    rae = make_run(root / "rae", dit_cfg(P, C, grid=(6, 6), normalize=True), 3, ema=True,
                   inputs={"latents": {"path": str(feats), "kind": "features"}})
    g = torch.Generator().manual_seed(0)
    save_stats(rae / "stats.pt", torch.randn(P, C, generator=g), torch.rand(P, C, generator=g) + 0.5, (6, 6))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, wd) in enumerate([(60, 50), (48, 48), (40, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return {"root": root, "vae": vae, "dit": dit, "rae": rae, "dec": make_run(root / "dec", dec_cfg(), 4, ema=True),
            "vae16": make_run(root / "vae16", vae_cfg(latent=16), 5),
            "dec32": make_run(root / "dec32", dec_cfg(in_dim=32), 6), "imgs": imgs, "lat": lat}


def cli(*args, ok: bool = True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    return r


def one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flatdino: error: "), r.stderr
    return lines[0]


def base(w, out, *extra):
    return ["sample", "--dit", w["dit"], "--vae", w["vae"], "--decoder", w["dec"], "--out", out, "--device", "cpu",
            *extra]


def padded(rows: list[int]) -> list[int]:
    """rows padded to PL.CPU_CHUNK with copies of the last, as generate() pads on the CPU: by-hand
    references must run the networks on the same batch shape to match it bit for bit."""
    return rows + rows[-1:] * (PL.CPU_CHUNK - len(rows))


def npz_of(out):
    [f] = list(out.glob("samples_*.npz"))
    with np.load(f) as z:
        return z["arr_0"], z["arr_1"]


# ----------------------------------------------------------------------------- sample
def test_sample_writes_pngs_grid_npz_and_manifest(w, tmp_path):
    out = tmp_path / "s"
    cli(*base(w, out, "--class", "1", "-n", "5", "--batch-size", "2", "--shard-size", "3"))
    arr, labels = npz_of(out)
    assert arr.shape == (5, 48, 48, 3) and arr.dtype == np.uint8 and labels.tolist() == [1] * 5
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"001_{i:06d}.png" for i in range(5)]
    for i, p in enumerate(pngs):
        assert np.array_equal(viz.load_png(p), arr[i])
    assert len({a.tobytes() for a in arr}) == 5  # every image has its own noise
    assert (out / "grid.png").is_file() and not (out / "parts").exists()  # parts go once the npz exists
    m = json.loads((out / "samples.json").read_text())
    assert m["complete"] and m["identity"]["seed"] == 0 and m["identity"]["flow"]["cfg_scale"] == 2.0
    flow = FlowConfig(**{**dataclasses.asdict(FlowConfig()), **{k: m["identity"]["flow"][k] for k in (
        "cfg_scale", "steps", "sampler", "shift", "cfg_interval_inclusive")},
        "cfg_interval": tuple(m["identity"]["flow"]["cfg_interval"])})
    assert m["network_evaluations"] == network_evaluations(flow) > flow.steps  # guided steps count twice
    assert m["identity"]["dit"]["ema"] and m["identity"]["dit"]["sha256"] == sha256_file(
        w["dit"] / "checkpoints/latest/ema.safetensors")
    assert m["identity"]["vae"]["sha256"] == sha256_file(w["vae"] / "checkpoints/latest/model.safetensors")
    assert m["identity"]["decoder"]["sha256"] == sha256_file(w["dec"] / "checkpoints/latest/ema.safetensors")
    assert m["identity"]["decoder"]["path"] == str(w["dec"].resolve())


def test_same_seed_same_images_for_any_batch_size(w, tmp_path, monkeypatch):
    """One seed gives bit-identical images at any batch size and at any place in a batch. The noise of
    image i is its own, and on the CPU generate() runs every forward on PL.CPU_CHUNK images (the last
    chunk padded with copies): torch's CPU kernels round differently for other batch shapes (the
    DiT's adaLN GEMMs have one row per image), which made batch 1 and batch 8 differ in the last bits
    and now and then by a grey level. The float pixels before rounding are checked too: the uint8
    images of these tiny models rarely show such a difference."""
    assert torch.equal(PL.image_noise(3, range(8), (T, D))[5], PL.image_noise(3, [5], (T, D))[0])
    for bs in (1, 3, 8, 16):
        cli(*base(w, tmp_path / f"b{bs}", "-c", "0", "-c", "2", "-n", "11", "--seed", "3", "--batch-size", bs))
    cli(*base(w, tmp_path / "s4", "-c", "0", "-c", "2", "-n", "11", "--seed", "4", "--batch-size", "8"))
    (a, la), (c, _) = npz_of(tmp_path / "b1"), npz_of(tmp_path / "s4")
    assert la.tolist() == [0] * 6 + [2] * 5
    for bs in (3, 8, 16):
        b, lb = npz_of(tmp_path / f"b{bs}")
        assert np.array_equal(la, lb) and np.array_equal(a, b), bs
    # float pixels of all at once, each image alone, in threes, backwards: other neighbours, other places
    # decode() stops before rounding
    monkeypatch.setattr("flatdino_cli.pipeline.to_uint8", lambda px: px.permute(0, 2, 3, 1).numpy())
    pipe, lab, idx = load_pipeline(w["dit"], w["vae"], w["dec"]), la.tolist(), list(range(11))
    ref = PL.generate(pipe, lab, idx, 3)
    assert ref.dtype == np.float32 and np.array_equal(a, viz.to_uint8(torch.from_numpy(ref).permute(0, 3, 1, 2)))
    alone = np.concatenate([PL.generate(pipe, [lab[i]], [i], 3) for i in idx])
    threes = np.concatenate([PL.generate(pipe, lab[i: i + 3], idx[i: i + 3], 3) for i in range(0, 11, 3)])
    backwards = PL.generate(pipe, lab[::-1], idx[::-1], 3)[::-1]
    assert np.array_equal(ref, alone) and np.array_equal(ref, threes) and np.array_equal(ref, backwards)
    assert (np.abs(a.astype(int) - c.astype(int)) > 1).mean() > 0.3  # another seed: other images


def test_no_ema_cfg_and_steps_overrides_change_images(w, tmp_path):
    cli(*base(w, tmp_path / "ema", "-c", "1", "-n", "2"))
    cli(*base(w, tmp_path / "raw", "-c", "1", "-n", "2", "--no-ema"))
    cli(*base(w, tmp_path / "cfg", "-c", "1", "-n", "2", "--cfg", "1", "--steps", "2", "--sampler", "heun",
              "--interval", "0.1,0.9"))
    ema, raw, cfg1 = (npz_of(tmp_path / d)[0] for d in ("ema", "raw", "cfg"))
    assert not np.array_equal(ema, raw) and not np.array_equal(ema, cfg1)
    m = json.loads((tmp_path / "cfg" / "samples.json").read_text())["identity"]
    assert m["flow"] == {**m["flow"], "cfg_scale": 1.0, "steps": 2, "sampler": "heun", "cfg_interval": [0.1, 0.9]}
    assert json.loads((tmp_path / "raw" / "samples.json").read_text())["identity"]["dit"]["ema"] is False


def test_class_by_name_and_unknown_name(w, tmp_path):
    cli(*base(w, tmp_path / "n", "-c", "Green_Triangle", "--classes", "blue square", "-n", "2"))
    assert npz_of(tmp_path / "n")[1].tolist() == [2, 1]
    line = one_line_error(cli(*base(w, tmp_path / "x", "-c", "gren triangle"), ok=False))
    assert "'green triangle'" in line and "unknown class name" in line
    line = one_line_error(cli(*base(w, tmp_path / "x", "-c", "purple"), ok=False))
    assert "'red circle', 'blue square', 'green triangle'" in line
    assert classes.resolve_classes(["goldfinch", "Golden Retriever", "207", "Cardigan", "cardigan"], 1000) == \
        [11, 207, 207, 264, 474]
    with pytest.raises(UserError, match="'golden retriever'"):
        classes.resolve_classes(["golden retreiver"], 1000)
    with pytest.raises(UserError, match="out of range"):
        classes.resolve_classes(["3"], 3)


def test_vae_default_from_inputs_and_provenance_warning(w, tmp_path):
    cli("sample", "--dit", w["dit"], "--decoder", w["dec"], "-c", "0", "-n", "1", "--out", tmp_path / "d",
        "--device", "cpu")
    assert json.loads((tmp_path / "d" / "samples.json").read_text())["identity"]["vae"]["path"] == \
        str(w["vae"].resolve())
    copy_ = shutil.copytree(w["vae"], tmp_path / "vae-copy")
    with pytest.warns(UserWarning, match="trained on latents of VAE"):
        load_pipeline(w["dit"], copy_, w["dec"])


def test_mismatched_vae_and_decoder_are_one_line_errors(w, tmp_path):
    line = one_line_error(cli("sample", "--dit", w["dit"], "--vae", w["vae16"], "--decoder", w["dec"], "-c", "0",
                              "--out", tmp_path / "x", "--device", "cpu", ok=False))
    assert "4 x 16 latents" in line and "4 x 8" in line
    line = one_line_error(cli("sample", "--dit", w["dit"], "--vae", w["vae"], "--decoder", w["dec32"], "-c", "0",
                              "--out", tmp_path / "y", "--device", "cpu", ok=False))
    assert "pixel decoder expects 36 x 32" in line and "36 x 64" in line
    line = one_line_error(cli("sample", "--dit", w["rae"], "--vae", w["vae"], "--decoder", w["dec"], "-c", "0",
                              "--out", tmp_path / "z", "--device", "cpu", ok=False))
    assert "RAE-mode" in line and "drop --vae" in line
    line = one_line_error(cli("sample", "--dit", w["rae"], "--decoder", w["dec32"], "-c", "0",
                              "--out", tmp_path / "z", "--device", "cpu", ok=False))
    assert "pixel decoder expects" in line


def test_rae_mode_decodes_denormalised_features(w, tmp_path):
    out = tmp_path / "rae"
    cli("sample", "--dit", w["rae"], "--decoder", w["dec"], "-c", "red circle", "-n", "3", "--out", out,
        "--device", "cpu", "--batch-size", "2")
    arr, labels = npz_of(out)
    assert arr.shape == (3, 48, 48, 3) and labels.tolist() == [0, 0, 0]
    pipe = load_pipeline(w["rae"], None, w["dec"])
    assert pipe.vae is None and pipe.stats is not None
    stats = load_stats(w["rae"] / "stats.pt", (6, 6))
    noise = PL.image_noise(0, padded([0, 1, 2]), (P, C))
    with torch.no_grad():
        x = flow_sample(make_velocity_fn(pipe.dit, torch.zeros(PL.CPU_CHUNK, dtype=torch.long), FLOW, len(NAMES)),
                        noise, 3, 2.0)
        pix = pipe.decoder(x * stats.std + stats.mean)[:3]
    assert np.array_equal(arr, viz.to_uint8(pix))


def test_sharded_fid_set_resumes_after_a_kill(w, tmp_path, monkeypatch):
    # --batch-size 1 becomes PL.CPU_CHUNK = 8 on the CPU: each shard of 9 is made in batches of 8 and 1
    args = ("--classes", "all", "--per-class", "6", "--shard-size", "9", "--batch-size", "1")
    cli(*base(w, tmp_path / "ref", *args))
    ref, ref_labels = npz_of(tmp_path / "ref")
    assert ref.shape == (18, 48, 48, 3) and ref_labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6

    out = tmp_path / "run"
    real, calls = S.generate, []

    def dying(*a, **k):  # the 4th batch never finishes: a kill in the middle of shard 2
        calls.append(len(a[1]))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "generate", dying)
    r = cli(*base(w, out, *args), ok=False)
    assert r.exit_code == 130 and calls == [8, 1, 8, 1]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["part_0000000-0000009.npz"]
    assert len(list((out / "images").glob("*.png"))) == 17 and not list(out.glob("samples_*.npz"))

    calls.clear()
    monkeypatch.setattr(S, "generate", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    cli(*base(w, out, *args))
    assert calls == [1]  # only the image that was missing
    arr, labels = npz_of(out)
    assert np.array_equal(arr, ref) and np.array_equal(labels, ref_labels)

    # final file and one image lost: rebuilt from the other PNGs, one image generated again
    next(out.glob("samples_*.npz")).unlink()
    (out / "images" / "001_000007.png").unlink()
    calls.clear()
    cli(*base(w, out, *args))
    assert sum(calls) == 1 and np.array_equal(npz_of(out)[0], ref)
    # other settings in the same folder are refused
    line = one_line_error(cli(*base(w, out, *args, "--seed", "1"), ok=False))
    assert "seed" in line and "other settings" in line


def test_pngs_are_written_off_the_sampling_thread_and_write_errors_surface(w, tmp_path, monkeypatch):
    """PNG encoding runs on the writer thread while the next batch is generated: every PNG is written
    there, not on the thread that runs the networks, and the images equal the .npz. A failed write
    (disk full) is not lost in the thread: the command fails with it."""
    import threading

    real, threads = S.save_png, set()
    monkeypatch.setattr(S, "save_png", lambda img, path: (threads.add(threading.current_thread().name),
                                                          real(img, path)))
    cli(*base(w, tmp_path / "s", "-c", "0", "-n", "17", "--batch-size", "8"))
    assert len(threads) == 1 and threading.current_thread().name not in threads
    arr, _ = npz_of(tmp_path / "s")
    assert all(np.array_equal(viz.load_png(p), arr[int(p.stem.split("_")[1])])
               for p in (tmp_path / "s" / "images").glob("*.png"))

    def full(img, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "save_png", full)
    with pytest.raises(OSError, match="No space left"):
        S.write_sample_set(load_pipeline(w["dit"], w["vae"], w["dec"]), [0] * 9, tmp_path / "f", 0, FLOW,
                           progress=False)


def test_grid_plan_one_row_per_class():
    idx, nrow = S._grid_plan([0] * 3 + [1] * 3 + [2] * 3)
    assert nrow == 3 and idx == list(range(9))
    idx, nrow = S._grid_plan([5] * 20)
    assert nrow == 5 and idx == list(range(20))
    idx, nrow = S._grid_plan([c for c in range(40) for _ in range(50)])
    assert nrow == S.GRID_COLS and len(idx) == S.GRID_ROWS * S.GRID_COLS


def test_sample_grid_names_each_row_in_full(tmp_path):
    from PIL import ImageDraw

    from flatdino_cli.toydata import CLASS_NAMES
    from flatdino_cli.viz import _font, make_grid

    tiles = np.full((12 * 3, 48, 48, 3), 128, np.uint8)
    labels = [f"{c} {n}" for c, n in enumerate(CLASS_NAMES)]
    grid = make_grid(tiles, 3, row_labels=labels)
    plain = make_grid(tiles, 3)
    column = grid[:, : grid.shape[1] - plain.shape[1]]
    longest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=_font(16)) for t in labels)
    assert column.shape[1] >= longest * 10 / 16  # wide enough for the longest name at the smallest size
    assert np.array_equal(grid[:, column.shape[1]:], plain)
    for r in range(12):  # dark text beside every row
        band = column[2 + r * 50: 2 + r * 50 + 48]
        assert (band < 100).any(), r


def test_class_label_shows_the_id_once():
    # a folder name that starts with its own id is not prefixed again; other names and ids are
    assert classes.class_label(0, ["00_red_circle", "01_blue_square"], 2) == "00_red_circle"
    assert classes.class_label(1, ["00_red_circle", "01_blue_square"], 2) == "01_blue_square"
    assert classes.class_label(1, ["cat", "7_dog"], 2) == "1 7_dog"
    assert classes.class_label(0, ["cat"], 1) == "0 cat"
    assert classes.class_label(3, [], 12) == "3"


def test_training_grid_hook(w, tmp_path):
    from flatdino_cli.runs import load_run

    cfg, model, _ = load_run(w["dit"], "dit")
    cfg = dataclasses.replace(cfg, sample_every=2)
    hook = dit_stage.training_grid_hook(cfg, tmp_path, w["vae"], w["dec"], CPU)
    model.train()
    assert hook(1, model, None) is None
    assert not (tmp_path / "samples").exists()
    assert hook(2, model, None) == tmp_path / "samples" / "step_0000002.png"  # handed to the trackers
    assert model.training  # the mode is restored
    img = viz.load_png(tmp_path / "samples" / "step_0000002.png")
    assert img.shape == (2 + 50, 2 + 3 * 50, 3)  # one row, one image (48 px + 2 px padding) per class
    with pytest.raises(UserError, match="4 x 16 latents"):
        dit_stage.training_grid_hook(cfg, tmp_path, w["vae16"], w["dec"], CPU)


# ----------------------------------------------------------------------------- the paper's sampler, one flag away
def test_paper_sampler_flag_samples_with_the_papers_setting_and_records_it(w, tmp_path):
    """The DiT's flow section samples by default (here euler, 3 steps); --paper-sampler takes
    flow.paper_sampler / flow.paper_steps (Euler 50) instead and says so in samples.json; with
    --sampler or --steps it is a one-line error (the two would contradict each other)."""
    cli(*base(w, tmp_path / "default", "-c", "1", "-n", "2"))
    cli(*base(w, tmp_path / "paper", "-c", "1", "-n", "2", "--paper-sampler"))
    default, paper = (json.loads((tmp_path / d / "samples.json").read_text()) for d in ("default", "paper"))
    assert (default["identity"]["flow"]["sampler"], default["identity"]["flow"]["steps"]) == ("euler", FLOW.steps)
    assert (paper["identity"]["flow"]["sampler"], paper["identity"]["flow"]["steps"]) == ("euler", 50)
    assert paper["paper_sampler"] is True and default["paper_sampler"] is False
    assert paper["network_evaluations"] == network_evaluations(dataclasses.replace(FLOW, steps=50)) > 50
    assert not np.array_equal(npz_of(tmp_path / "default")[0], npz_of(tmp_path / "paper")[0])
    for extra in (("--sampler", "ab2"), ("--steps", "7")):
        r = cli(*base(w, tmp_path / "both", "-c", "1", "-n", "2", "--paper-sampler", *extra), ok=False)
        assert r.exit_code == 1 and "--paper-sampler sets the sampler and its steps" in r.output
        assert "Traceback" not in r.output


def test_dopri5_records_the_evaluations_it_used(w, tmp_path):
    """dopri5's count is known only after sampling: samples.json records the mean per image over the
    chunks it integrated (each chunk's count from the times it evaluated at, guided ones twice), with
    the tally a resumed set adds to."""
    pytest.importorskip("torchdiffeq")  # the ode extra (installed with the test extra)
    out = tmp_path / "ode"
    cli(*base(w, out, "-c", "0", "-c", "2", "-n", "10", "--sampler", "dopri5", "--batch-size", "8"))
    m = json.loads((out / "samples.json").read_text())
    tally = m["adaptive_evaluations"]
    assert tally["images"] == 10 and m["network_evaluations"] == round(tally["total"] / 10, 1)
    assert 6 <= tally["min"] <= tally["max"] and tally["min"] * 10 <= tally["total"] <= tally["max"] * 10
    # by hand: the same two chunks (8 images, then 2 padded to 8), each counted from its evaluation times
    pipe = load_pipeline(w["dit"], w["vae"], w["dec"])
    counts: list = []
    list(PL.sample_chunks(pipe, [0] * 5 + [2] * 5, list(range(10)), 0, dataclasses.replace(FLOW, sampler="dopri5"),
                          evaluations=counts))
    assert [k for k, _ in counts] == [8, 2] and adaptive_tally(counts) == tally
    assert adaptive_tally([(2, 20)], {"images": 8, "total": 100, "min": 12, "max": 13}) == {
        "images": 10, "total": 140, "min": 12, "max": 20}  # a resumed set: the earlier images kept

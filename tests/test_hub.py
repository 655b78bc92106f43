"""Runs that travel (hub.py): `flatdino export` writes a Hugging Face model folder; `--vae/--dit/--decoder`
take that folder or `hf:ORG/NAME[@REV]` from a Hugging Face cache the test lays out, and sample the same
images as the run directories; a repository missing from the cache fails at once naming `hf download`.

The runs are tiny random-init models saved as checkpoints (no training); sampling is 2 Euler steps.
"""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flatdino_cli.checkpoint import save_checkpoint
from flatdino_cli.cli import app
from flatdino_cli.config_yaml import load_preset, save_config
from flatdino_cli.hub import is_export, parse_ref, resolve
from flatdino_cli.errors import UserError
from flatdino_cli.info import describe
from flatdino_cli.models import build_model

TINY_STORE = ["model.num_patches=36", "model.feature_dim=64"]  # the tiny encoder's features
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_run(path: Path, preset: str, sets=(), inputs: dict | None = None, step: int = 7) -> Path:
    """A run directory as train-* leaves it: config.yaml, inputs.json, metrics.jsonl, checkpoints/latest."""
    cfg = load_preset(preset, list(sets))
    torch.manual_seed(len(preset))
    model = build_model(cfg)
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    (path / "inputs.json").write_text(json.dumps(inputs or {}))
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, step + 1)] + [{"step": step, "val/loss": 0.5}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ema = build_model(cfg)  # EMA weights differ from the raw ones: the export must pick the right file
    save_checkpoint(path, "latest", model, ema if cfg.train.ema > 0 else None,
                    {"step": step, "total_steps": 10, "best_val": 0.5})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    vae = make_run(root / "vae", "tiny-vae", TINY_STORE, {"features": {"path": "/data/toy-feats"}})
    dit = make_run(root / "dit", "tiny-dit", ["flow.steps=2"],
                   {"latents": {"kind": "latents", "path": "/data/lat", "identity": {"vae_run": str(vae)}}})
    dec = make_run(root / "decoder", "tiny-decoder", (), {"images": "/data/toy"})
    return {"vae": vae, "dit": dit, "decoder": dec}


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def sample_npz(dit, vae, decoder, out: Path) -> np.ndarray:
    code, output = cli("sample", "--dit", dit, "--vae", vae, "--decoder", decoder, "-c", "0", "-c", "3", "-n", "2",
                       "--device", "cpu", "--out", out)
    assert code == 0, output
    return np.load(next(out.glob("*.npz")))["arr_0"]


def lay_out_cache(cache: Path, repo: str, folder: Path, refs=("main",)) -> Path:
    """The Hugging Face cache layout: models--ORG--NAME/{refs/<ref> = commit, snapshots/<commit>/files}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / COMMIT)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(COMMIT)
    return base


def test_export_writes_a_hugging_face_model_folder(runs, tmp_path):
    code, output = cli("export", runs["dit"], tmp_path / "dit-export")
    assert code == 0, output
    out = tmp_path / "dit-export"
    assert {"model.safetensors", "config.json", "README.md", "config.yaml", "inputs.json"} <= {
        p.name for p in out.iterdir()} and is_export(out)
    ema = runs["dit"] / "checkpoints" / "latest" / "ema.safetensors"
    assert (out / "model.safetensors").read_bytes() == ema.read_bytes()  # the DiT is read from its EMA
    meta = json.loads((out / "config.json").read_text())
    assert meta["library_name"] == "flatdino" and meta["stage"] == "dit" and meta["architecture"]
    assert meta["config"]["model"]["width"] == 128 and meta["parameters"]["total"] > 0
    assert meta["step"] == 7 and meta["planned_steps"] == 10 and meta["weights"]["ema"] is True
    assert meta["metrics"]["last_train"]["step"] == 7
    assert "/data/lat" not in (out / "inputs.json").read_text()  # no paths of the training machine
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: flatdino") and "flatdino train-dit --preset config.yaml --latents " \
        "/data/lat --out RUN" in card and "--dit hf:ORG/NAME" in card
    # an existing folder is never replaced unless asked, and then only an earlier export
    code, output = cli("export", runs["dit"], out)
    assert code == 1 and "exists" in output and "--overwrite" in output
    code, output = cli("export", runs["dit"], runs["vae"], "--overwrite")
    assert code == 1 and (runs["vae"] / "config.yaml").is_file()
    assert cli("export", runs["dit"], out, "--overwrite")[0] == 0
    assert not list(tmp_path.glob(".*tmp*"))  # built aside, renamed into place


def test_export_folder_and_hf_cache_entry_sample_like_the_runs(runs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    exports = {k: tmp_path / f"{k}-export" for k in runs}
    for k in runs:
        assert cli("export", runs[k], exports[k])[0] == 0
    cache = tmp_path / "hf-cache"
    for k in runs:
        lay_out_cache(cache, f"me/tiny-{k}", exports[k])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    ref = sample_npz(runs["dit"], runs["vae"], runs["decoder"], tmp_path / "s-runs")
    by_folder = sample_npz(exports["dit"], exports["vae"], exports["decoder"], tmp_path / "s-folders")
    by_hub = sample_npz("hf:me/tiny-dit", f"hf:me/tiny-vae@{COMMIT}", "hf:me/tiny-decoder@main", tmp_path / "s-hub")
    assert ref.shape == (2, 48, 48, 3) and ref.std() > 0
    np.testing.assert_array_equal(by_folder, ref)
    np.testing.assert_array_equal(by_hub, ref)
    assert dict(describe("hf:me/tiny-vae"))["what"] == "exported vae run"  # `flatdino info hf:...` too
    # the exported weights are the ones the run is read from (VAE: best, else latest model weights)
    sd = load_file(str(exports["vae"] / "model.safetensors"))
    assert all(torch.equal(v, load_file(str(runs["vae"] / "checkpoints/latest/model.safetensors"))[k])
               for k, v in sd.items())


def test_hf_reference_missing_from_cache_fails_fast_naming_the_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.monotonic()
    code, output = cli("sample", "--dit", "hf:me/nothing@v2", "--decoder", "x.pt", "--device", "cpu")
    assert code == 1 and output.count("\n") == 1
    assert "hf:me/nothing@v2: not in the local Hugging Face cache" in output
    assert "`hf download me/nothing --revision v2`" in output
    assert time.monotonic() - t0 < 120  # never a network round-trip (generous bound for a loaded machine)
    # a cached repository that is not a flatdino export
    lay_out_cache(tmp_path / "empty-cache", "me/other", _plain_folder(tmp_path / "plain"))
    with pytest.raises(UserError, match="is not a flatdino export"):
        resolve("hf:me/other")


def _plain_folder(path: Path) -> Path:
    path.mkdir()
    (path / "README.md").write_text("not a model")
    return path


def test_parse_ref():
    assert parse_ref("hf:org/name") == ("org/name", None)
    assert parse_ref("hf:org/name@v1.0") == ("org/name", "v1.0")
    assert parse_ref("runs/vae") is None and resolve(Path("runs/vae")) == Path("runs/vae")
    for bad in ("hf:name", "hf:a/b/c", "hf:/b"):
        with pytest.raises(UserError, match="expected hf:ORG/NAME"):
            parse_ref(bad)

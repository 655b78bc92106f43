"""The command lines users type work as typed: a workspace (cwd, --workspace or FLATDINO_WORKSPACE)
holds runs/<stage>-<preset> and stores/<name>, an index that is only a cache of the folders, and
commands without an input pick it from there and say what they picked.

One tiny pipeline (toy data, tiny presets shrunk with --set) is trained through the CLI in a temporary
workspace, then the short forms run exactly as typed there."""

import json
import os
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flatdino_cli.cli import app
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.workspace.index import INDEX_FILE
from flatdino_cli.workspace.listing import listing
from flatdino_cli.workspace.paths import ENV_VAR, run_dir
from flatdino_cli.workspace.pick import pick_sample
from flatdino_cli.workspace.settings import SETTINGS_FILE

SHORT = ["--set", "train.epochs=1", "--device", "cpu"]  # the DiTs also sample in 4 steps (--set flow.steps=4)


@contextmanager
def inside(folder: Path, env: dict | None = None):
    """In `folder`, with `env` and no workspace variable; the environment is restored whole on the way
    out, including what a command set itself (`--workspace` sets the variable for the process)."""
    saved = dict(os.environ)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            mp.delenv(ENV_VAR, raising=False)
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def typed(line: str, check: bool = True):
    """Run a command line as a user types it (`flatdino ...`) in the current folder."""
    args = shlex.split(line)
    assert args[0] == "flatdino"
    r = CliRunner().invoke(app, args[1:])
    if check and r.exit_code != 0:
        raise AssertionError(f"{line} failed ({r.exit_code}): {r.output}\n{r.exception!r}")
    return r


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with a finished tiny pipeline, trained through the CLI with default output folders."""
    ws = tmp_path_factory.mktemp("ws")
    with inside(ws):
        typed("flatdino toy-data toy --per-class 14")
        r = typed("flatdino extract toy --encoder tiny --val-split 24 --device cpu")
        assert "stores/toy-tiny" in r.output
        typed("flatdino train-vae --preset tiny-vae " + " ".join(SHORT))  # finds the store
        typed("flatdino extract stores/toy-tiny --vae runs/vae-tiny-vae --device cpu")
        typed("flatdino extract stores/toy-tiny --vae runs/vae-tiny-vae --decoded --device cpu")
        typed("flatdino train-decoder --preset tiny-decoder --images toy --encoder tiny "
              "--features stores/toy-tiny-decoded-vae-tiny-vae " + " ".join(SHORT))
        typed("flatdino train-dit --preset tiny-dit --set train.epochs=2 --set flow.steps=4 --device cpu")
    return ws


def test_pipeline_defaults_land_in_the_workspace(ws):
    for d in ("stores/toy-tiny/val", "stores/toy-tiny-latents-vae-tiny-vae/val", "runs/vae-tiny-vae",
              "runs/dit-tiny-dit", "runs/decoder-tiny-decoder"):
        assert (ws / d).is_dir(), d
    inputs = json.loads((ws / "runs/dit-tiny-dit/inputs.json").read_text())
    assert inputs["latents"]["path"] == str(ws / "stores/toy-tiny-latents-vae-tiny-vae")  # found, not typed
    assert json.loads((ws / "runs/dit-tiny-dit/run.json").read_text())["preset"] == "tiny-dit"


def test_the_mission_lines_run_as_typed(ws):
    with inside(ws):
        r = typed("flatdino sample --class 3 --cfg 4.5")
        assert "sample: dit runs/dit-tiny-dit (step" in r.output
        assert "vae " + str(ws / "runs/vae-tiny-vae") in r.output or "vae runs/vae-tiny-vae" in r.output
        assert "decoder runs/decoder-tiny-decoder" in r.output
        npz = list((ws / "runs/dit-tiny-dit/samples").glob("*/samples_*.npz"))
        assert len(npz) == 1 and set(np.load(npz[0])["arr_1"].tolist()) == {3}

        r = typed("flatdino ablate-tokens")
        assert "ablate-tokens: vae runs/vae-tiny-vae" in r.output and "features stores/toy-tiny/val" in r.output
        heat = np.load(ws / "runs/vae-tiny-vae/analysis/ablation/heatmaps.npy")
        assert heat.shape == (16, 36) and np.isfinite(heat).all()

        r = typed("flatdino train-dit --preset tiny-dit --set train.epochs=1 --set flow.steps=4 --device cpu")
        assert "train-dit: latents stores/toy-tiny-latents-vae-tiny-vae" in r.output
        assert "new run runs/dit-tiny-dit-2" in r.output  # another config: never mixed into the first run
        assert (ws / "runs/dit-tiny-dit-2/finished.json").is_file()
        r = typed("flatdino train-dit --preset tiny-dit --set train.epochs=1 --set flow.steps=4 --device cpu")
        assert "resuming runs/dit-tiny-dit-2" in r.output  # the same config again: that run, resumed

        # an explicit option always wins over the workspace's pick
        r = typed("flatdino sample --dit runs/dit-tiny-dit --class 3 --cfg 4.5 -n 8")
        assert "dit runs" not in r.output and "decoder runs/decoder-tiny-decoder" in r.output
        # now the newest finished DiT is the one-epoch run, and the line names it
        r = typed("flatdino sample --class 3 -n 8")
        assert "dit runs/dit-tiny-dit-2" in r.output


def test_workspace_listing_and_settings(ws, tmp_path):
    with inside(ws):
        out = typed("flatdino workspace").output
        rows = {line.split()[0]: line for line in out.splitlines()[2:]}
        assert rows["runs/dit-tiny-dit"].split()[1:4] == ["dit", "tiny-dit", "done"]
        assert "stores/toy-tiny-latents-vae-tiny-vae" in rows["runs/dit-tiny-dit"]  # lineage
        assert "stores/toy-tiny + runs/vae-tiny-vae" in rows["stores/toy-tiny-latents-vae-tiny-vae"]
        assert "val loss" in rows["runs/vae-tiny-vae"]
        assert "fd_rep" in rows["runs/dit-tiny-dit"]  # train-dit's evaluations: the latest (and best) value

        # a configured decoder wins over the workspace's train-decoder run
        shutil.copytree(ws / "runs/decoder-tiny-decoder", tmp_path / "my-decoder")
        typed(f"flatdino workspace set decoder {tmp_path / 'my-decoder'}")
        try:
            r = typed(f"flatdino sample --class 3 -n 8 --out {tmp_path / 's'}")
            assert f"decoder {tmp_path / 'my-decoder'} (workspace setting)" in r.output
            assert json.loads((tmp_path / "s/samples.json").read_text())["identity"]["decoder"]["path"] == str(tmp_path / "my-decoder")
        finally:
            typed("flatdino workspace set decoder none")
        r = typed("flatdino workspace set colour red", check=False)
        assert r.exit_code == 1 and "unknown key" in r.output


def test_index_removal_or_corruption_loses_nothing(ws):
    with inside(ws):
        typed("flatdino workspace")
        index = ws / INDEX_FILE
        before = json.loads(index.read_text())["entries"]
        assert {"runs/vae-tiny-vae", "runs/dit-tiny-dit", "stores/toy-tiny"} <= set(before)
        for damage in (lambda: index.unlink(), lambda: index.write_text('{"version": 1, "entr'),
                       lambda: index.write_text(json.dumps({"version": 1, "workspace": str(ws), "entries": {
                           "runs/gone": {"stage": "dit", "time": 9e9, "finished": "2999-01-01"}}}))):
            damage()
            typed("flatdino workspace")  # the next command rebuilds it
            after = json.loads(index.read_text())["entries"]
            assert after.keys() == before.keys() and "runs/gone" not in after
            assert {k: {**v, "size": 0} for k, v in after.items()} == {k: {**v, "size": 0} for k, v in before.items()}


def test_two_workspaces_never_see_each_other(ws, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for env, where in (({}, other), ({ENV_VAR: str(other)}, ws)):
        with inside(where, env):
            r = typed("flatdino sample --class 3", check=False)
            assert r.exit_code == 1
            assert f"no finished DiT run in workspace {other}; run first: flatdino train-dit" in r.output
            assert "nothing yet" in typed("flatdino workspace").output
    with inside(ws):
        r = typed(f"flatdino --workspace {other} ablate-tokens", check=False)
        assert r.exit_code == 1 and "run first: flatdino train-vae" in r.output
        r = typed(f"flatdino --workspace {other} train-dit --preset tiny-dit", check=False)
        assert r.exit_code == 1 and "no finished latents store" in r.output
    assert not (other / "runs").exists()


def test_default_run_dir_suffix_and_resume(tmp_path):
    with inside(tmp_path):
        a = load_preset("tiny-dit")
        first = run_dir("train-dit", None, "dit", "tiny-dit", a)
        assert first == tmp_path / "runs/dit-tiny-dit"
        first.mkdir(parents=True)
        (first / "config.yaml").write_text(__import__("yaml").safe_dump(
            __import__("flatdino_cli.config_yaml", fromlist=["to_dict"]).to_dict(a), sort_keys=False))
        assert run_dir("train-dit", None, "dit", "tiny-dit", a) == first  # same config: resumed
        b = load_preset("tiny-dit", ["train.lr=0.01"])
        assert run_dir("train-dit", None, "dit", "tiny-dit", b) == tmp_path / "runs/dit-tiny-dit-2"
        assert run_dir("train-dit", tmp_path / "mine", "dit", "tiny-dit", b) == tmp_path / "mine"
        assert run_dir("x", None, "vae", "my presets/v.yaml", b).name == "vae-v"
        # a run written by an older version, before keys with defaults were added, is still this config
        import yaml

        old = yaml.safe_load((first / "config.yaml").read_text())
        del old["flow"]["cfg_schedule"], old["flow"]["sde_last_step"], old["train"]["decay_until_epoch"]
        (first / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
        assert run_dir("train-dit", None, "dit", "tiny-dit", a) == first


def _fake_run(d: Path, stage: str, preset: str, finished: bool = True) -> None:
    """A run folder as train.fit leaves it (config.yaml, finished.json) without training anything."""
    import yaml

    from flatdino_cli.config_yaml import to_dict

    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(load_preset(preset))))
    (d / "run.json").write_text(json.dumps({"stage": stage, "preset": preset}))
    if finished:
        (d / "finished.json").write_text(json.dumps({"step": 7, "finished": "2026-11-29T06:00:00Z"}))


def test_ambiguous_pick_is_resolved_by_recency_and_named(tmp_path, capsys):
    _fake_run(tmp_path / "runs/dit-xl-32x128", "dit", "xl-32x128")
    _fake_run(tmp_path / "runs/dit-tiny-dit", "dit", "tiny-dit")
    _fake_run(tmp_path / "runs/dit-s-32x128", "dit", "s-32x128", finished=False)  # newest, but unfinished
    os.utime(tmp_path / "runs/dit-xl-32x128/finished.json", (1e9, 1e9))
    _fake_run(tmp_path / "runs/decoder-tiny-decoder", "decoder", "tiny-decoder")
    with inside(tmp_path):
        dit, vae, decoder = pick_sample(None, None, None)
    assert (dit, vae, decoder) == (tmp_path / "runs/dit-tiny-dit", None, tmp_path / "runs/decoder-tiny-decoder")
    line = capsys.readouterr().out.strip()
    assert line == ("sample: dit runs/dit-tiny-dit (step 7, 2026-11-29); newest of 2 finished, --dit to choose, "
                    "decoder runs/decoder-tiny-decoder (step 7, 2026-11-29)")
    with inside(tmp_path):
        listed = listing()
    rows = {line.split()[0]: line.split()[1:4] for line in listed.splitlines()[2:]}
    assert rows["runs/dit-s-32x128"] == ["dit", "s-32x128", "0%"]  # listed, never picked
    assert list(rows)[-1] == "runs/dit-xl-32x128"  # the oldest last


def test_workspace_settings_feed_fid_and_extract(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "inception.pt").write_bytes(b"not a model")
    (tmp_path / "dinov2.safetensors").write_bytes(b"not weights")
    with inside(tmp_path):
        r = typed("flatdino fid s.npz", check=False)
        assert r.exit_code == 1 and "workspace set reference-batch" in r.output
        typed("flatdino workspace set reference-batch ref.npz")
        typed("flatdino workspace set inception-weights inception.pt")
        r = typed("flatdino fid s.npz --device cpu", check=False)  # both settings used: it reaches the weights
        assert r.exit_code == 1 and f"{tmp_path / 'inception.pt'}: cannot load" in r.output
        typed("flatdino workspace set encoder-weights dinov2.safetensors")
        typed("flatdino toy-data toy --per-class 1")
        r = typed("flatdino extract toy --device cpu", check=False)
        assert r.exit_code == 1 and str(tmp_path / "dinov2.safetensors") in r.output
        r = typed("flatdino workspace set decoder missing.pt", check=False)
        assert r.exit_code == 1 and "no such file" in r.output
        assert set(json.loads((tmp_path / SETTINGS_FILE).read_text())) == {
            "reference-batch", "inception-weights", "encoder-weights"}

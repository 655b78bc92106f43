"""`flatdino quickstart`'s quick checks: too few images refused before anything is written, and the
summary's full paths. The end-to-end runs are in test_quickstart.py."""

import subprocess
import sys
from pathlib import Path

import pytest
from quickstart_jobs import wait


def test_quickstart_refuses_too_few_images_up_front_and_prints_full_paths(cli, tmp_path):
    from flatdino_cli.quickstart import format_summary

    p = cli("quickstart", "--out", tmp_path / "qs", "--per-class", "6", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--per-class 7" in p.stderr
    assert not (tmp_path / "qs").exists()
    text = format_summary({"out": "runs/qs", "minutes": 1, "stage_minutes": 1, "stages": [
        {"stage": "sample", "grid": "grid.png"}, {"stage": "ablate-tokens", "figure": "token_ablation.png"}]})
    assert str((Path("runs/qs") / "samples" / "grid.png").resolve()) in text
    assert str((Path("runs/qs") / "ablate" / "token_ablation.png").resolve()) in text


def test_waiting_for_the_background_quickstarts_ends_when_their_driver_dies(tmp_path):
    """A driver killed before it wrote jobs.json (SIGKILL, the OOM killer) is noticed at once, with its
    log, instead of the quickstart tests waiting out the hour."""
    (tmp_path / "jobs.log").write_text("Killed\n")
    driver = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
    with pytest.raises(AssertionError, match=r"driver exited \(9\) without jobs.json:\nKilled"):
        wait(tmp_path, driver, timeout=300)
    (tmp_path / "jobs.json").write_text('{"flat_rc": 0}')
    assert wait(tmp_path, driver) == {"flat_rc": 0}


def test_the_reconstruction_grid_shows_every_class(tmp_path):
    """The held-out list runs class by class: the quickstart's 24 reconstructions are spread over it."""
    from flatdino_cli.quickstart import _spread

    listed = tmp_path / "paths.txt"
    listed.write_text("".join(f"toy/{c:02d}/{i}.png\n" for c in range(12) for i in range(25)))
    picked = _spread(listed, 24, tmp_path / "picked.txt").read_text().split()
    assert [p.split("/")[1] for p in picked] == [f"{c:02d}" for c in range(12) for _ in range(2)]
    assert _spread(listed, 500, tmp_path / "all.txt").read_text().split() == listed.read_text().split()


def test_the_patch4_encoder_gives_its_grid_to_the_features_and_the_decoder_and_a_folder_keeps_its_encoder(cli, tmp_path):
    """tiny-p4, the flat quickstart's default: 12 x 12 features, a pixel decoder of patch 4 (12 x 4 = the toy
    images' 48 px) and a VAE that takes 2 x 2 blocks of patches as one token (6 x 6, as on tiny); the FAE
    stays on tiny. Rerunning the folder with the other encoder is refused in one line instead of mixing
    two feature sets."""
    import json

    from flatdino_cli.errors import UserError
    from flatdino_cli.quickstart import QuickstartPlan, run_quickstart
    from flatdino_cli.runtime import setup_runtime

    plan = QuickstartPlan(per_class=7, until="extract", overrides=("decoder:train.epochs=1", "vae:model.patch_group=1"))
    assert plan.encoder == "tiny-p4" and plan.sets("decoder") == ["model.patch_size=4", "train.epochs=1"]
    assert plan.sets("vae") == ["model.patch_group=2", "model.patch_group=1"]  # the user's --set comes last
    assert plan.sets("dit") == []
    tiny = QuickstartPlan(encoder="tiny")
    assert tiny.sets("decoder") == ["model.patch_size=8"] and tiny.sets("vae") == ["model.patch_group=1"]
    fae = QuickstartPlan(laminator="fae")
    assert fae.encoder == "tiny" and fae.sets("vae") == []
    with pytest.raises(UserError, match="--encoder tiny-p8: use tiny or tiny-p4"):
        QuickstartPlan(encoder="tiny-p8")
    run_quickstart(tmp_path / "qs", setup_runtime("cpu", "fp32", False), plan)
    manifest = json.loads((tmp_path / "qs" / "features" / "manifest.json").read_text())
    assert manifest["extra"]["grid"] == [12, 12] and manifest["identity"]["encoder"] == "tiny-p4"
    p = cli("quickstart", "--out", tmp_path / "qs", "--per-class", "7", "--encoder", "tiny", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--encoder tiny: " in p.stderr and "made with --encoder tiny-p4" in p.stderr

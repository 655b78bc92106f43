"""`flatdino quickstart`'s quick checks: too few images refused before anything is written, and the
summary's full paths. The end-to-end runs are in test_quickstart.py."""

from pathlib import Path


def test_quickstart_refuses_too_few_images_up_front_and_prints_full_paths(cli, tmp_path):
    from flatdino_cli.quickstart import format_summary

    p = cli("quickstart", "--out", tmp_path / "qs", "--per-class", "6", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--per-class 7" in p.stderr
    assert not (tmp_path / "qs").exists()
    text = format_summary({"out": "runs/qs", "minutes": 1, "stage_minutes": 1, "stages": [
        {"stage": "sample", "grid": "grid.png"}, {"stage": "ablate-tokens", "figure": "token_ablation.png"}]})
    assert str((Path("runs/qs") / "samples" / "grid.png").resolve()) in text
    assert str((Path("runs/qs") / "ablate" / "token_ablation.png").resolve()) in text

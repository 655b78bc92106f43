"""`flatdino compare`: the equal-FLOPs plan, the report, and a shrunk toy comparison end to end (a rerun
recomputes nothing; a folder compared with other settings is refused)."""

import pytest
import yaml

from flatdino_cli.compare import (FD_REP, CompareConfig, format_report, plot_compare, quality_level, run_compare,
                                  write_table)
from flatdino_cli.errors import UserError
from flatdino_cli.runtime import CPU


def test_sets_reach_their_runs():
    cfg = CompareConfig(sets=("train.lr=1e-3", "dit-rae:train.batch_size=64", "vae-fae:train.epochs=1",
                              "dit:eval.seed=3"))
    assert cfg.sets_for("dit-rae") == ["train.lr=1e-3", "train.batch_size=64", "eval.seed=3"]
    assert cfg.sets_for("dit-flatdino") == ["train.lr=1e-3", "eval.seed=3"]
    assert cfg.sets_for("vae-fae") == ["train.epochs=1"]
    assert cfg.sets_for("vae-flatdino") == []
    with pytest.raises(UserError, match="unknown target 'dti-rae'"):
        CompareConfig(sets=("dti-rae:train.lr=1",))


def test_imagenet_mode_asks_for_what_it_cannot_make():
    with pytest.raises(UserError, match="--budget"):
        CompareConfig(features="stores/in1k", vae="runs/vae", fae="runs/fae")
    with pytest.raises(UserError, match="--fae"):
        CompareConfig(features="stores/in1k", vae="runs/vae", budget=1e20)
    with pytest.raises(UserError, match="--methods"):
        CompareConfig(methods=("flatdino", "dit"))
    with pytest.raises(UserError, match="need --features"):
        CompareConfig(vae="runs/vae")
    ok = CompareConfig(features="stores/in1k", vae="runs/vae", budget=1e20, methods=("flatdino", "rae"))
    assert ok.preset("rae") == "rae-xl-256x768" and CompareConfig().preset("rae") == "tiny-rae-dit"


def _method(label, flops, values, speed=10.0):
    evals = [{"step": i + 1, "flops": f, FD_REP: v} for i, (f, v) in enumerate(zip(flops, values))]
    return {"label": label, "tokens": 16, "steps": len(evals), "flops_per_step": flops[0], "evals": evals,
            "final": values[-1], "best": min(values), "samples_per_s": speed, "nfe": 20,
            "sample_dit_flops": 1e9}


def test_level_is_the_worst_best_and_each_method_its_first_flops(tmp_path):
    res = {"flatdino": _method("F", [1, 2, 3], [5.0, 2.0, 1.0]),
           "rae": _method("R", [1, 2, 3], [9.0, 6.0, 4.0]),
           "fae": _method("A", [1, 2, 3], [7.0, 3.5, 3.0])}
    report = {"budget": 3.0, "toy": True, "methods": res, **quality_level(res)}
    assert report["level"] == 4.0
    assert [res[m]["flops_to_level"] for m in ("flatdino", "rae", "fae")] == [2, 3, 2]
    table = write_table(tmp_path / "compare.md", report).read_text()
    assert "| R | 16 | 3 |" in table and "(1.5x)" in table  # RAE needed 1.5x FlatDINO's FLOPs
    assert plot_compare(tmp_path / "compare.png", report).stat().st_size > 0


def test_toy_compare_end_to_end_and_resumed(tmp_path):
    # shrunk: 14 toy images a class, one laminator epoch, batch 32, a few generator steps each
    cfg = CompareConfig(per_class=14, budget=4e10, evals=2, eval_samples=12,
                        sets=("vae-flatdino:train.epochs=1", "vae-fae:train.epochs=1", "train.batch_size=32"))
    out = tmp_path / "cmp"
    report = run_compare(out, cfg, CPU)
    for m in ("flatdino", "rae", "fae"):
        r = report["methods"][m]
        assert abs(r["steps"] * r["flops_per_step"] - 4e10) <= r["flops_per_step"] / 2  # the same budget
        assert len(r["evals"]) >= 2 and r["evals"][-1]["step"] == r["steps"]
        assert all(e["flops"] == e["step"] * r["flops_per_step"] for e in r["evals"])
        assert r["samples_per_s"] > 0 and r["nfe"] == 20  # ab2 at 20 steps, unguided
        recorded = yaml.safe_load((out / f"dit-{m}" / "config.yaml").read_text())
        assert recorded["train"]["max_steps"] == r["steps"] and recorded["eval"]["count"] == 2
    per_step = {m: report["methods"][m]["flops_per_step"] for m in report["methods"]}
    assert per_step["rae"] > 3 * per_step["flatdino"]  # 144 grid tokens against 16 flat ones
    assert {m: r["tokens"] for m, r in report["methods"].items()} == {"flatdino": 16, "rae": 144, "fae": 36}
    assert report["methods"]["rae"]["steps"] < report["methods"]["flatdino"]["steps"]
    dit_flops = {m: r["sample_dit_flops"] for m, r in report["methods"].items()}
    assert dit_flops["rae"] > 8 * dit_flops["flatdino"]  # a sample's 20 forwards over 144 tokens, not 16
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()
    assert "FlatDINO" in format_report(report)

    metrics = {m: (out / f"dit-{m}" / "metrics.jsonl").read_bytes() for m in report["methods"]}
    again = run_compare(out, cfg, CPU)  # every stage has its marker: nothing is trained or scored again
    assert {m: (out / f"dit-{m}" / "metrics.jsonl").read_bytes() for m in report["methods"]} == metrics
    assert again["methods"]["rae"]["evals"] == report["methods"]["rae"]["evals"]

    with pytest.raises(UserError, match="settings.json: this folder compared with other budget"):
        run_compare(out, CompareConfig(per_class=14, budget=8e10, evals=2, eval_samples=12, sets=cfg.sets), CPU)

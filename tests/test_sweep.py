"""The sampler-knob sweep (sweep.py): a resumable grid, and `flatdino sweep` end to end on a tiny DiT."""

import json

import pytest

from flatdino_cli.flow import FlowConfig
from flatdino_cli.sweep import grid_points, parse_grid, run_points


def test_sweep_2x2_resumes_without_recomputing(tmp_path):
    points = grid_points(parse_grid(cfg="1,4", steps="2,4"), FlowConfig())
    assert len(points) == 4
    calls = []

    def score(flow):
        calls.append(flow)
        return {"fd_rep": float(flow.steps * flow.cfg_scale)}

    table = run_points(tmp_path, points, score, images=8)
    assert len(calls) == 4 and len(table) == 4
    # guided forwards counted twice: cfg 4 with 2 Euler steps, guided where 0.225 < t < 1
    row = next(r for r in table.values() if r["cfg"] == 4 and r["steps"] == 2)
    assert row["nfe"] == 3.0 and row["fd_rep"] == 8.0
    table = run_points(tmp_path, points + grid_points(parse_grid(cfg="2", steps="2"), FlowConfig()), score, 8)
    assert len(calls) == 5 and len(table) == 5  # only the new point was computed
    assert (tmp_path / "sweep.json").is_file()


def test_sweep_command_2x2_resumes_and_writes_table_and_figure(dit_run, tmp_path, cli, monkeypatch):
    out, _ = dit_run
    args = ("sweep", out, "--out", tmp_path / "sw", "--cfg", "1,3", "--steps", "2,4", "--samples", "24",
            "--device", "cpu")
    r = cli(*args)
    assert "sweep: 4 points" in r.stdout
    rows = json.loads((tmp_path / "sw/sweep.json").read_text())["points"]
    assert sorted((p["cfg"], p["steps"]) for p in rows.values()) == [(1, 2), (1, 4), (3, 2), (3, 4)]
    assert all(p["fd_rep"] > 0 and p["images_per_s"] > 0 for p in rows.values())
    assert {p["nfe"] for p in rows.values() if p["cfg"] == 1} == {2, 4}  # unguided: one forward a step
    table = (tmp_path / "sw/sweep.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 points
    assert (tmp_path / "sw/sweep.png").stat().st_size > 10_000
    # a rerun computes nothing; a wider grid computes only its new points
    monkeypatch.setattr("flatdino_cli.sweep.evaluate_dit", lambda *a, **k: pytest.fail("recomputed"))
    cli(*args)
    calls = []
    monkeypatch.setattr("flatdino_cli.sweep.evaluate_dit", lambda *a, **k: calls.append(1) or {"fd_rep": 1.0})
    cli("sweep", out, "--out", tmp_path / "sw", "--cfg", "1,3,5", "--steps", "2,4", "--samples", "24", "--device", "cpu")
    assert len(calls) == 2
    bad = cli("sweep", out, "--out", tmp_path / "sw", "--cfg", "1", "--samples", "12", "--device", "cpu", check=False)
    assert bad.returncode == 1 and "other samples" in bad.stderr and "\n" not in bad.stderr.strip()


def test_sweep_records_the_evaluations_dopri5_used(dit_run, tmp_path, cli):
    """An adaptive solver's count is known only after sampling: the sweep records the mean it measured."""
    pytest.importorskip("torchdiffeq")  # the ode extra (installed with the test extra)
    out, _ = dit_run
    cli("sweep", out, "--out", tmp_path / "sw", "--cfg", "1,3", "--sampler", "dopri5", "--samples", "24",
        "--device", "cpu")
    rows = json.loads((tmp_path / "sw/sweep.json").read_text())["points"].values()
    nfe = {r["cfg"]: r["nfe"] for r in rows}
    # dopri5 evaluates at least its 6 stages once; guided points count each evaluation twice
    assert nfe[1] >= 6 and nfe[3] > nfe[1]

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

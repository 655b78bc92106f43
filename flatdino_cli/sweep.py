"""`flatdino sweep` (foundation): a grid of sampler knobs for one DiT, scored point by point into a
resumable table.

A point is one setting of (cfg, interval, steps, sampler, shift). Finished points are kept in
RESULTS (one JSON file, rewritten atomically after every point), keyed by the knob values, so a
rerun computes only the points that are missing. The quality metric is passed in as `score`
(fd_rep once the evaluation module lands); network evaluations per image come from
flow.network_evaluations, the count `flops` and `sample` use, and images/s is measured per point.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable

from flatdino_cli.flow import FlowConfig, network_evaluations
from flatdino_cli.pipeline import parse_interval, sampling_flow
from flatdino_cli.utils import atomic_write_json, comma_list, ensure_dir, read_json

RESULTS = "sweep.json"
KNOBS = ("cfg", "interval", "steps", "sampler", "shift")


def parse_grid(cfg: str | None = None, interval: str | None = None, steps: str | None = None,
               sampler: str | None = None, shift: str | None = None) -> dict[str, list]:
    """Command-line grids -> {knob: values}; None: the DiT's own value (one point on that axis).
    Intervals are separated by ';' ('0,1;0.225,1'), the others by commas."""
    return {"cfg": comma_list(cfg, "--cfg", float) if cfg else [None],
            "interval": [parse_interval(i) for i in interval.split(";") if i.strip()] if interval else [None],
            "steps": comma_list(steps, "--steps", int) if steps else [None],
            "sampler": comma_list(sampler, "--sampler") if sampler else [None],
            "shift": comma_list(shift, "--shift", float) if shift else [None]}


def grid_points(grid: dict[str, list], base: FlowConfig) -> list[tuple[str, FlowConfig]]:
    """(key, flow config) per point of the grid's product; every config is validated by FlowConfig,
    so any sampler the flow accepts is accepted here (a bad one is a one-line error)."""
    points = []
    for values in itertools.product(*(grid[k] for k in KNOBS)):
        knobs = dict(zip(KNOBS, values))
        flow = sampling_flow(base, cfg_scale=knobs["cfg"], steps=knobs["steps"], sampler=knobs["sampler"],
                             interval=knobs["interval"], shift=knobs["shift"])
        points.append((point_key(flow), flow))
    return points


def point_key(flow: FlowConfig) -> str:
    """The knob values a point is stored under (after the DiT's defaults filled the unset ones)."""
    return json.dumps({"cfg": flow.cfg_scale, "interval": list(flow.cfg_interval), "steps": flow.steps,
                       "sampler": flow.sampler, "shift": flow.shift, "schedule": [list(p) for p in flow.cfg_schedule]},
                      sort_keys=True)


def run_points(out: str | Path, points: list[tuple[str, FlowConfig]], score: Callable[[FlowConfig], dict],
               images: int) -> dict[str, dict]:
    """Score every point not already in out/RESULTS; returns the whole table (key -> row)."""
    out = ensure_dir(Path(out))
    path = out / RESULTS
    table = read_json(path).get("points", {}) if path.is_file() else {}
    for key, flow in points:
        if key in table:
            continue
        t0 = time.perf_counter()
        metrics = score(flow)
        seconds = time.perf_counter() - t0
        table[key] = {**json.loads(key), **metrics, "nfe": network_evaluations(flow),
                      "images_per_s": images / seconds if seconds > 0 else None}
        atomic_write_json(path, {"points": table})  # after every point: a killed sweep keeps what it finished
    return table

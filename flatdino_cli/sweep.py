"""`flatdino sweep`: a grid of sampler knobs for one DiT, scored point by point with fd_rep into a
resumable table, a Markdown table and a figure (the paper's Figure 14 is the cfg axis).

A point is one setting of (cfg, interval, steps, sampler, shift). Finished points are kept in
RESULTS (one JSON file, rewritten atomically after every point), keyed by the knob values, so a
rerun computes only the points that are missing; the file also records what every point shares (the
DiT's weights, the reference, samples, seed), and a folder swept with other ones is refused. Network
evaluations per image come from flow.network_evaluations, the count `flops` and `sample` use, and
images/s (sampling and mapping into feature space) is measured per point.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import FD_REP, ScoreConfig, evaluate_dit, evaluation_parts
from flatdino_cli.flow import FlowConfig, adaptive_tally, mean_evaluations, network_evaluations
from flatdino_cli.pipeline.options import parse_interval, sampling_flow
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import atomic_write_json, atomic_write_text, comma_list, ensure_dir, read_json
from flatdino_cli.viz import curve, new_figure, save_figure

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


def grid_points(grid: dict[str, list], base: FlowConfig, paper: bool = False) -> list[tuple[str, FlowConfig]]:
    """(key, flow config) per point of the grid's product; every config is validated by FlowConfig,
    so any sampler the flow accepts is accepted here (a bad one is a one-line error). paper
    (--paper-sampler): the paper's sampler and steps where the grid leaves them to the DiT."""
    points = []
    for values in itertools.product(*(grid[k] for k in KNOBS)):
        knobs = dict(zip(KNOBS, values))
        flow = sampling_flow(base, cfg_scale=knobs["cfg"], steps=knobs["steps"], sampler=knobs["sampler"],
                             interval=knobs["interval"], shift=knobs["shift"], paper=paper)
        points.append((point_key(flow), flow))
    return points


def point_key(flow: FlowConfig) -> str:
    """The knob values a point is stored under (after the DiT's defaults filled the unset ones)."""
    return json.dumps({"cfg": flow.cfg_scale, "interval": list(flow.cfg_interval), "steps": flow.steps,
                       "sampler": flow.sampler, "shift": flow.shift, "schedule": [list(p) for p in flow.cfg_schedule]},
                      sort_keys=True)


def run_points(out: str | Path, points: list[tuple[str, FlowConfig]], score: Callable[[FlowConfig], dict],
               images: int, shared: dict | None = None) -> dict[str, dict]:
    """Score every point not already in out/RESULTS; returns the whole table (key -> row). `shared`:
    what every point depends on besides its knobs; a RESULTS file made with other values is refused."""
    out = ensure_dir(Path(out))
    path = out / RESULTS
    table = finished_points(out, shared)
    for key, flow in points:
        if key in table:
            continue
        t0 = time.perf_counter()
        metrics = score(flow)
        seconds = time.perf_counter() - t0
        # an adaptive solver's count is known only after sampling: its score reports it
        nfe = metrics.pop("nfe") if "nfe" in metrics else network_evaluations(flow)
        table[key] = {**json.loads(key), **metrics, "nfe": nfe,
                      "images_per_s": images / seconds if seconds > 0 else None}
        atomic_write_json(path, {"shared": shared or {}, "points": table})  # a killed sweep keeps what it finished
    return table


def finished_points(out: str | Path, shared: dict | None = None) -> dict[str, dict]:
    """The points out/RESULTS holds (key -> row); UserError when it was swept with other `shared` values."""
    path = Path(out) / RESULTS
    have = read_json(path) if path.is_file() else {}
    if have and have.get("shared", {}) != (shared or {}):
        diff = sorted(k for k in {**have.get("shared", {}), **(shared or {})}
                      if have.get("shared", {}).get(k) != (shared or {}).get(k))
        raise UserError(f"{path}: holds a sweep with other {', '.join(diff)}; pass another --out, or delete it "
                        "to start over")
    return have.get("points", {})


def _series_label(row: dict, varied: list[str], skip: str) -> str:
    return ", ".join(f"{k} {row[k]}" for k in varied if k != skip) or "all points"


def write_report(out: str | Path, table: dict[str, dict], keys: list[str], title: str = "") -> dict[str, Path]:
    """OUT/sweep.md (one row per point of this grid, best fd_rep first) and OUT/sweep.png: fd_rep against
    network evaluations per image, and against the guidance scale when it was swept (Figure 14)."""
    out = Path(out)
    rows = [table[k] for k in keys]
    varied = [k for k in KNOBS if len({json.dumps(r[k]) for r in rows}) > 1]
    lines = [f"# {title}" if title else "# sweep", "",
             "| cfg | interval | steps | sampler | shift | NFE / image | fd_rep | images/s |",
             "|---:|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r[FD_REP]):
        lines.append(f"| {r['cfg']:g} | {r['interval'][0]:g}-{r['interval'][1]:g} | {r['steps']} | {r['sampler']} | "
                     f"{r['shift']:g} | {r['nfe']} | {r[FD_REP]:.4g} | {r['images_per_s'] or 0:.3g} |")
    md = out / "sweep.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    axes = [("nfe", "network evaluations per image")] + ([("cfg", "guidance scale")] if "cfg" in varied else [])
    fig = new_figure(4.2 * len(axes), 3.2, dpi=200)
    for i, (x, xlabel) in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), i + 1)
        series: dict[str, list[dict]] = {}
        for r in rows:
            series.setdefault(_series_label(r, varied, "steps" if x == "nfe" else x), []).append(r)
        for label, pts in series.items():
            pts = sorted(pts, key=lambda r: r[x])
            curve(ax, [r[x] for r in pts], [r[FD_REP] for r in pts], label=label)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("fd_rep (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series) > 1:
            ax.legend(fontsize=6, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return {"table": md, "figure": save_figure(fig, out / "sweep.png")}


def run_sweep(dit: str | Path, out: str | Path, grid: dict[str, list], cfg: ScoreConfig = ScoreConfig(),
              rt: Runtime = CPU) -> dict:
    """Score a grid of sampler knobs for one DiT (a train-dit run or RAE's stage2_model.pt) with fd_rep
    (the preset's guidance as set by the point; evaluate.py), resumably; writes OUT/sweep.json, .md, .png."""
    pipe, ref, n = evaluation_parts(dit, cfg.reference, cfg.samples, cfg.vae_run, cfg.stats, rt)
    points = grid_points(grid, pipe.cfg.flow, cfg.paper_sampler)
    shared = {"dit": pipe.identity["dit"]["sha256"], "reference": ref.identity["manifest_sha256"], "samples": n,
              "seed": cfg.seed}

    done = finished_points(out, shared)
    bar = tqdm(total=sum(k not in done for k, _ in points), desc="sweep", unit="point", dynamic_ncols=True,
               disable=not rt.is_main)

    def scored(flow: FlowConfig) -> dict:
        counts: list[tuple[int, int]] = []  # (images, evaluations per image) per chunk, from dopri5
        result = evaluate_dit(pipe, ref, n, cfg.seed, flow, cfg.batch_size, rt, nocfg=False,
                              evaluations=counts if flow.sampler == "dopri5" else None)
        if counts:
            result["nfe"] = mean_evaluations(adaptive_tally(counts))
        bar.update(1)
        bar.set_postfix(fd_rep=f"{result[FD_REP]:.4g}")
        return result

    try:
        table = run_points(out, points, scored, n, shared)
    finally:
        bar.close()
    keys = [k for k, _ in points]
    report = write_report(out, table, keys, title=f"{Path(dit).name}: fd_rep, {n} samples") if rt.is_main else {}
    return {"points": [table[k] for k in keys], **report}

"""`flatdino redundancy`: spatial redundancy of patch features (the paper's Figure 5).

Cosine similarity of every pair of distinct patches of an image, grouped by the Euclidean distance
of the two patches on the grid (in patch units) into `bins` equal bins over [0, max_distance];
mean and standard deviation over all pairs of all images in each bin. The paper uses 50 bins over
[0, 10] on the 16 x 16 DINOv2 grid; smaller grids scale the range to 10 * side / 16 (the same
fraction of the image), and the JSON says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from flatdino_cli import viz
from flatdino_cli.analysis.common import subset_rows, iter_rows, write_json
from flatdino_cli.data import Store
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import grid_side

__all__ = ["RedundancyConfig", "pair_distances", "similarity_by_distance", "default_max_distance", "run_redundancy"]

PAPER_GRID, PAPER_MAX_DISTANCE = 16, 10.0


def default_max_distance(side: int) -> float:
    """10 patches on grids of side >= 16 (the paper's range); proportionally less on smaller grids."""
    return PAPER_MAX_DISTANCE if side >= PAPER_GRID else PAPER_MAX_DISTANCE * side / PAPER_GRID


def pair_distances(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j of the side x side grid (row-major patch order): (i, j, Euclidean distance)."""
    r, c = np.divmod(np.arange(side * side), side)
    i, j = np.triu_indices(side * side, k=1)
    return i, j, np.hypot(r[i] - r[j], c[i] - c[j])


@torch.no_grad()
def similarity_by_distance(batches: Iterable[torch.Tensor], side: int, bins: int = 50,
                           max_distance: float = PAPER_MAX_DISTANCE) -> dict:
    """Mean/std of patch-pair cosine similarity per distance bin over every image of `batches`
    ((B, P, C) tensors). Per pair, sums over images are kept in float64; pairs are binned at the end.
    Bins without any pair (the grid has only distances sqrt(a^2 + b^2)) hold None."""
    i, j, dist = pair_distances(side)
    s1 = s2 = None
    n = 0
    for x in batches:
        xn = F.normalize(x.float(), dim=-1)  # (B, P, C)
        sim = (xn @ xn.transpose(1, 2))[:, i, j].double()  # (B, pairs)
        s1 = sim.sum(0) if s1 is None else s1 + sim.sum(0)
        s2 = sim.square().sum(0) if s2 is None else s2 + sim.square().sum(0)
        n += x.shape[0]
    if s1 is None:
        raise ValueError("no images")
    s1, s2 = s1.cpu().numpy(), s2.cpu().numpy()
    edges = np.linspace(0.0, max_distance, bins + 1)
    keep = dist <= max_distance
    b = np.minimum(np.searchsorted(edges, dist[keep], side="right") - 1, bins - 1)  # [lo, hi); max -> last
    count = np.bincount(b, minlength=bins) * n  # samples per bin: pairs x images
    sum1 = np.bincount(b, weights=s1[keep], minlength=bins)
    sum2 = np.bincount(b, weights=s2[keep], minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sum1 / count
        std = np.sqrt(np.maximum(sum2 / count - mean ** 2, 0.0))
    filled = count > 0
    return {"n_images": n, "grid": [side, side], "bins": bins, "max_distance": max_distance,
            "edges": edges.tolist(), "centers": ((edges[:-1] + edges[1:]) / 2).tolist(),
            "mean": [float(m) if f else None for m, f in zip(mean, filled)],
            "std": [float(s) if f else None for s, f in zip(std, filled)],
            "count": count.astype(int).tolist()}


@dataclass(frozen=True)
class RedundancyConfig:
    """What `flatdino redundancy` measures (run_redundancy)."""

    features: str | Path  # feature store; its first n images
    out: str | Path
    n: int = 5000
    bins: int = 50
    max_distance: float | None = None  # None: the paper's 10, scaled down on grids < 16x16
    batch_size: int = 64


def run_redundancy(cfg: RedundancyConfig, rt: Runtime | None = None, progress: bool = True) -> dict:
    """Similarity vs grid distance over the first n images of a feature store; writes
    redundancy.json and redundancy.png into `out` and returns the JSON's content."""
    rt = rt or CPU
    out = Path(cfg.out)
    store = Store.open(cfg.features)
    rows = subset_rows(store, cfg.n)
    side = grid_side(store.item_shape[0], str(cfg.features))
    scaled = cfg.max_distance is None and side < PAPER_GRID
    max_d = default_max_distance(side) if cfg.max_distance is None else float(cfg.max_distance)
    batches = (x for _, x in iter_rows(store, rows, cfg.batch_size, rt.device, "redundancy", progress))
    result = similarity_by_distance(batches, side, cfg.bins, max_d)
    result.update({"features": str(Path(cfg.features).resolve()), "features_manifest_sha256": store.manifest_hash(),
                   "range_scaled_to_grid": scaled, "figure": "redundancy.png"})
    if scaled:
        result["note"] = (f"grid {side}x{side} is smaller than the paper's 16x16: distance range scaled "
                          f"from [0, 10] to [0, {max_d:g}] (10 * {side} / 16)")
    out.mkdir(parents=True, exist_ok=True)
    _plot(result, out / "redundancy.png")
    write_json(out / "redundancy.json", result, rows=rows)
    return result


def _plot(r: dict, path: Path) -> None:
    ok = [k for k, m in enumerate(r["mean"]) if m is not None]
    x = np.array(r["centers"])[ok]
    mean, std = np.array([r["mean"][k] for k in ok]), np.array([r["std"][k] for k in ok])
    fig = viz.new_figure(6, 4)
    ax = fig.subplots()
    viz.curve(ax, x, mean, "mean cosine similarity (± 1 std)", band=std)
    side = r["grid"][0]
    title = f"Spatial redundancy: {r['n_images']} images, {side}x{side} grid, {r['bins']} bins"
    viz.style_axes(ax, "distance between patches (patch units)", "cosine similarity", title)
    ax.set_xlim(0, r["max_distance"])
    viz.save_figure(fig, path)

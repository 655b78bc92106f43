"""`flatdino ablate-tokens`: which patches each latent token controls (the paper's Figures 6, 11-13).

For every image, unit k of the posterior mean mu is zeroed, both the ablated and the intact latent
are decoded to features, and the L2 norm (over the feature dimension) of their difference is taken
per patch; averaging over the first n images gives a (U, P) array, shown as U heatmaps on the
sqrt(P) x sqrt(P) patch grid. The ablation unit is row k of the latent: a token of the flat VAE,
one patch's latent of a per-patch (FAE-kind) autoencoder; nothing below depends on which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from flatdino_cli import viz
from flatdino_cli.analysis.common import subset_rows, iter_rows, load_vae, store_image, write_json
from flatdino_cli.data import Store
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import grid_side

__all__ = ["AblateConfig", "ablate_units", "ablation_heatmaps", "unit_name", "run_ablate"]


def unit_name(kind: str) -> str:
    """What one row of the latent is called in titles: a token (flat VAE) or a patch latent (FAE)."""
    return "patch" if kind == "fae" else "token"


def ablate_units(z: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """z (B, U, d), units (K,) -> (K, B, U, d): copy j has row units[j] of every latent zeroed."""
    K = len(units)
    za = z.unsqueeze(0).repeat(K, 1, 1, 1)  # (K, B, U, d)
    za[torch.arange(K, device=z.device), :, units.to(z.device)] = 0
    return za


@torch.no_grad()
def ablation_sums(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                  unit_batch: int = 8) -> torch.Tensor:
    """(U, P) float64: per-patch ||decode(z with unit k zeroed) - decode(z)||_2 summed over the batch.

    Units are ablated `unit_batch` at a time, so one decoder call sees unit_batch * B latents.
    """
    B, U, _ = z.shape
    base = decode(z).float()  # (B, P, C)
    out = torch.empty(U, base.shape[1], dtype=torch.float64, device=z.device)
    for lo in range(0, U, unit_batch):
        units = torch.arange(lo, min(lo + unit_batch, U))
        za = ablate_units(z, units)  # (K, B, U, d)
        rec = decode(za.flatten(0, 1)).float().view(len(units), B, *base.shape[1:])  # (K, B, P, C)
        out[lo:lo + len(units)] = (rec - base).norm(dim=-1).sum(1).double()  # (K, P)
    return out


def ablation_heatmaps(decode: Callable[[torch.Tensor], torch.Tensor], latents: Iterable[torch.Tensor],
                      unit_batch: int = 8) -> np.ndarray:
    """Mean over all latents of `ablation_sums`: (U, P) float64. `latents` yields (B, U, d) batches."""
    total, n = None, 0
    for z in latents:
        s = ablation_sums(decode, z, unit_batch)
        total = s if total is None else total + s
        n += z.shape[0]
    if total is None:
        raise ValueError("no latents to ablate")
    return (total / n).cpu().numpy()


def _summary(maps: np.ndarray, side: int) -> list[dict]:
    """Per unit: total effect, peak patch (row, col), and how spread the map is (normalised entropy:
    1 = uniform over the image, the paper's 'global' tokens; near 0 = a single patch)."""
    rows = []
    for k, m in enumerate(maps):
        p = m / max(m.sum(), 1e-30)
        ent = float(-(p * np.log(np.clip(p, 1e-30, None))).sum() / np.log(len(m))) if len(m) > 1 else 0.0
        peak = int(m.argmax())
        rows.append({"unit": k, "total": float(m.sum()), "peak": [peak // side, peak % side],
                     "entropy": round(ent, 6)})
    return rows


@dataclass(frozen=True)
class AblateConfig:
    """What `flatdino ablate-tokens` measures (run_ablate)."""

    vae_run: str | Path
    features: str | Path  # feature store; its first n images
    out: str | Path
    n: int = 10000
    batch_size: int = 32
    unit_batch: int = 8  # units ablated per decoder call (x batch_size latents)
    example: int = 0  # which of the n images the overlay is drawn on


def run_ablate(cfg: AblateConfig, rt: Runtime | None = None, progress: bool = True) -> dict:
    """Token ablation over the first n images of a feature store; writes into `out`:
    heatmaps.npy (U, P) float32, token_ablation.png, token_ablation_overlay.png (when the example
    image is readable) and ablation.json. Returns the JSON's content."""
    rt = rt or CPU
    out = Path(cfg.out)
    store = Store.open(cfg.features, expect_kind="features")
    vae_cfg, vae, sha = load_vae(cfg.vae_run, store, rt)
    rows = subset_rows(store, cfg.n)
    P = store.item_shape[0]
    side = grid_side(P, str(cfg.features))
    name = unit_name(vae_cfg.model.kind)

    def decode(z: torch.Tensor) -> torch.Tensor:
        with rt.autocast():
            return vae.decode(z)

    def latents():
        for _, x in iter_rows(store, rows, cfg.batch_size, rt.device, desc="ablate", progress=progress):
            with torch.no_grad(), rt.autocast():
                yield vae.encode(x)[0].float()  # mu (B, U, d)

    maps = ablation_heatmaps(decode, latents(), cfg.unit_batch)  # (U, P)
    U = maps.shape[0]
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "heatmaps.npy", maps.astype(np.float32))
    grid = maps.reshape(U, side, side)
    vmin, vmax = float(maps.min()), float(maps.max())
    titles = [f"{name} {k}" for k in range(U)]
    label = "mean per-patch ||Δ feature||₂"
    viz.heatmap_grid(grid, out / "token_ablation.png", titles, vmin=vmin, vmax=vmax, colorbar_label=label,
                     suptitle=f"{name.capitalize()} ablation: feature change per patch, mean over {len(rows)} images")
    result = {"vae_run": str(Path(cfg.vae_run).resolve()), "vae_checkpoint_sha256": sha,
              "features": str(Path(cfg.features).resolve()), "features_manifest_sha256": store.manifest_hash(),
              "n_images": int(len(rows)), "unit": name, "units": U, "num_patches": P, "grid": [side, side],
              "vmin": vmin, "vmax": vmax, "heatmaps": "heatmaps.npy", "figure": "token_ablation.png",
              "overlay": None, "per_unit": _summary(maps, side)}
    ex_row = int(rows[min(cfg.example, len(rows) - 1)])
    image = store_image(store, ex_row, size=max(224, 14 * side))
    if image is not None:
        viz.heatmap_grid(grid, out / "token_ablation_overlay.png", titles, vmin=vmin, vmax=vmax,
                         colorbar_label=label, background=image, alpha=0.55,
                         suptitle=f"{name.capitalize()} ablation maps over image {ex_row} "
                                  f"({Path(store.paths[ex_row]).name})")
        result["overlay"] = "token_ablation_overlay.png"
        result["overlay_image"] = store.paths[ex_row]
    else:
        result["overlay_skipped"] = f"image of row {ex_row} not readable: {store.paths[ex_row]}"
    write_json(out / "ablation.json", result, rows=rows)
    return result

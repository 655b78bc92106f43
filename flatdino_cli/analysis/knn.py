"""`flatdino knn`: weighted k-NN classification probe on latents (the paper's Appendix I, Table 10).

Embedding of one item (T, d): L2-normalise each token, mean-pool over tokens, L2-normalise again
(works as well for (P, 768) DINOv2 feature stores: the paper's baseline). Each validation
embedding takes its k most cosine-similar training embeddings; neighbour votes are weighted by
exp(sim / 0.07) (Caron et al. 2021) and the class with the largest total wins.

The paper's protocol (the authors' eval/knn.py) makes train and val alike: `extract --preprocess knn`
(the whole image resized to 256 px, no crop: 324 DINOv2 patches, which the FlatDINO encoder takes as
they are). A val store made with other preprocessing than the train store is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flatdino_cli import viz
from flatdino_cli.analysis.common import iter_rows, write_json
from flatdino_cli.data import Store, split_indices
from flatdino_cli.errors import UserError
from flatdino_cli.runtime import CPU, Runtime

__all__ = ["KNNConfig", "pooled_embedding", "knn_classify", "check_same_making", "run_knn"]

KS = (10, 20, 100)
TEMPERATURE = 0.07


def pooled_embedding(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, T, d) -> (B, d): per-token L2 norm, mean over tokens, L2 norm."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    return F.normalize(x.mean(1), dim=-1, eps=eps)


@torch.no_grad()
def knn_classify(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 ks: Sequence[int] = KS, temperature: float = TEMPERATURE, num_classes: int | None = None,
                 chunk: int = 256) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN vote for each k. Embeddings are unit vectors:
    train (N, D), query (M, D); labels int64. k larger than N is clamped to N."""
    C = int(num_classes or int(train_labels.max()) + 1)
    kmax = min(max(ks), train.shape[0])
    chunk = max(1, min(chunk, (1 << 27) // train.shape[0]))  # a (chunk, N) similarity block stays <= 512 MB
    hits = {k: [0, 0] for k in ks}
    for lo in range(0, query.shape[0], chunk):
        q, y = query[lo:lo + chunk], query_labels[lo:lo + chunk]
        sim, idx = (q @ train.T).topk(kmax, dim=1)  # (b, kmax), most similar first
        nb = train_labels[idx]  # (b, kmax)
        w = (sim / temperature).exp()
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(q.shape[0], C, device=q.device).scatter_add_(1, nb[:, :kk], w[:, :kk])
            top = votes.topk(min(5, C), dim=1).indices  # (b, 5)
            hits[k][0] += int((top[:, 0] == y).sum())
            hits[k][1] += int((top == y[:, None]).any(1).sum())
    M = query.shape[0]
    return {k: {"top1": 100.0 * h1 / M, "top5": 100.0 * h5 / M} for k, (h1, h5) in hits.items()}


def check_same_making(train: Store, val: Store, train_path, val_path) -> None:
    """One-line UserError unless both stores were made alike: the same image preprocessing (a bicubic
    train store against a bilinear val store would measure the resize as much as the features) and, for
    latents, the same VAE checkpoint."""
    a, b = train.manifest.get("preprocessing") or {}, val.manifest.get("preprocessing") or {}
    if a != b:
        diff = ", ".join(f"{k} {b.get(k)!r} vs {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise UserError(f"--val {val_path}: made with other preprocessing than {train_path} ({diff}); extract "
                        "both with the same options (the paper's k-NN: `flatdino extract --preprocess knn` for each)")
    vae_a, vae_b = (s.manifest["identity"].get("vae_checkpoint_sha256") for s in (train, val))
    if vae_a != vae_b:
        raise UserError(f"--val {val_path}: latents of another VAE checkpoint than {train_path}; extract both "
                        "with the same --vae run")


def _embed(store: Store, rows: np.ndarray, batch_size: int, rt: Runtime, desc: str, progress: bool):
    embs = [pooled_embedding(x) for _, x in iter_rows(store, rows, batch_size, rt.device, desc, progress)]
    return torch.cat(embs), torch.from_numpy(store.labels[rows]).long().to(rt.device)


@dataclass(frozen=True)
class KNNConfig:
    """What `flatdino knn` measures (run_knn)."""

    latents: str | Path  # training store: latents or DINOv2 features
    out: str | Path
    val: str | Path | None = None  # validation store (None: LATENTS/val, else a held-out split)
    ks: tuple[int, ...] = KS
    temperature: float = TEMPERATURE  # vote weight exp(sim / temperature)
    val_count: int = 10000  # held-out rows when there is no validation store
    seed: int = 0  # of the held-out split
    batch_size: int = 256


def run_knn(cfg: KNNConfig, rt: Runtime | None = None, progress: bool = True) -> dict:
    """k-NN probe: train = the store `latents`, val = `val`, else `latents`/val when it exists, else
    `val_count` held-out rows (at most a tenth of the store). Writes knn.json and knn.png into `out`."""
    rt = rt or CPU
    latents, val, seed = cfg.latents, cfg.val, cfg.seed  # named often below: in the errors and the split
    train_store = Store.open(latents)
    train_rows = train_store.valid_indices()
    val_dir = Path(val) if val is not None else Path(latents) / "val"
    if val is not None or (val_dir / "manifest.json").exists():
        val_store = Store.open(val_dir)
        if val_store.item_shape != train_store.item_shape:
            raise UserError(f"{val_dir}: items of shape {val_store.item_shape}, but {latents} has "
                            f"{train_store.item_shape}; pass the matching --val store")
        check_same_making(train_store, val_store, latents, val_dir)
        val_rows, split = val_store.valid_indices(), f"store {val_dir}"
    else:
        n_val = min(cfg.val_count, len(train_rows) // 10)
        tr, va = split_indices(len(train_rows), n_val, seed)
        val_store, val_rows, train_rows = train_store, train_rows[va], train_rows[tr]
        split = f"{n_val} rows held out of {latents} (seed {seed})"
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise UserError(f"{latents}: too few rows for a k-NN probe (train {len(train_rows)}, val {len(val_rows)})")
    if (train_store.labels[train_rows] < 0).any() or (val_store.labels[val_rows] < 0).any():
        raise UserError(f"{latents}: has unlabelled rows (label -1); k-NN needs class labels (an ImageFolder source)")
    xtr, ytr = _embed(train_store, train_rows, cfg.batch_size, rt, "knn train", progress)
    xva, yva = _embed(val_store, val_rows, cfg.batch_size, rt, "knn val", progress)
    C = int(max(ytr.max(), yva.max())) + 1
    acc = knn_classify(xtr, ytr, xva, yva, cfg.ks, cfg.temperature, C)
    result = {"store": str(Path(latents).resolve()), "store_manifest_sha256": train_store.manifest_hash(),
              "kind": train_store.manifest.get("kind"), "item_shape": list(train_store.item_shape),
              "val": split, "n_train": int(len(train_rows)), "n_val": int(len(val_rows)), "classes": C,
              "preprocessing": train_store.manifest.get("preprocessing"),
              "temperature": cfg.temperature, "k": {str(k): v for k, v in acc.items()},
              "effective_k": {str(k): min(k, len(train_rows)) for k in cfg.ks},
              "best_top1": max(v["top1"] for v in acc.values()), "figure": "knn.png"}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(result, out / "knn.png")
    write_json(out / "knn.json", result)
    return result


def _plot(r: dict, path: Path) -> None:
    ks = list(r["k"])
    x = np.arange(len(ks))
    fig = viz.new_figure(5, 3.6)
    ax = fig.subplots()
    # top-5 among <= 5 classes is always 100 %: not worth a bar
    keys = (("top1", "top-1"), ("top5", "top-5")) if r["classes"] > 5 else (("top1", "top-1"),)
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        bars = ax.bar(x + (j - (len(keys) - 1) / 2) * width, [r["k"][k][key] for k in ks], width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.axhline(100.0 / r["classes"], color="grey", linestyle=":", linewidth=1, label="chance")
    eff = r["effective_k"]
    ax.set_xticks(x, [f"k={k}" if eff[k] == int(k) else f"k={k}\n(all {eff[k]})" for k in ks])
    ax.set_ylim(0, 105)
    title = f"k-NN probe ({r['n_train']} train / {r['n_val']} val, {r['classes']} classes, T={r['temperature']:g})"
    viz.style_axes(ax, "neighbours", "accuracy (%)", title)
    viz.save_figure(fig, path)

"""Plumbing shared by the analysis commands: stream store rows, load a VAE that fits a store,
find the images behind a store, write results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from flatdino_cli.data import (SUBSET_SEED, BadImage, Store, adm_center_crop, check_feature_shape, is_whole_image,
                               load_rgb, resize, subset_rows, to_tensor, whole_image_resize)
from flatdino_cli.errors import UserError
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import Runtime
from flatdino_cli.utils import atomic_write_json

__all__ = ["SUBSET_SEED", "subset_rows", "iter_rows", "load_vae", "store_image", "write_json"]


def iter_rows(store: Store, rows: np.ndarray, batch_size: int, device: torch.device,
              desc: str = "", progress: bool = True) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Batches (row indices (B,), data (B, *item_shape) float32 on device) read from the memmap;
    only one batch is in memory at a time."""
    bar = tqdm(total=len(rows), desc=desc, unit="img", dynamic_ncols=True, disable=not progress)
    for lo in range(0, len(rows), batch_size):
        idx = rows[lo:lo + batch_size]
        x = torch.from_numpy(np.asarray(store.data[idx], dtype=np.float32)).to(device)
        yield idx, x
        bar.update(len(idx))
    bar.close()


def load_vae(vae_run: str | Path, store: Store, rt: Runtime):
    """(stage config, eval VAE on rt.device, weights sha256); UserError if it was trained on other features."""
    cfg, vae, sha = load_run(vae_run, "vae", device=rt.device)
    check_feature_shape(store, cfg.model, store.path)
    return cfg, vae, sha


def store_image(store: Store, row: int, size: int) -> np.ndarray | None:
    """The image behind store row `row`, ADM center-cropped (or whole-image resized) as the store was made,
    resized to size x size, (size, size, 3) float in [0, 1]; None if the file cannot be read."""
    path = store.paths[row]
    if not Path(path).is_file():
        return None
    try:
        img = load_rgb(path)
    except BadImage:
        return None
    pre = store.manifest.get("preprocessing", {})
    crop = int(pre.get("crop_size") or min(img.size))
    img = whole_image_resize(img, crop, pre["interp"]) if is_whole_image(pre) else adm_center_crop(img, crop)
    x = resize(to_tensor(img), size)  # (3, size, size)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def write_json(path: str | Path, obj: dict, rows: np.ndarray | None = None) -> Path:
    """`obj` as JSON at `path` (atomically); with `rows`, also the image subset it was computed on."""
    path = Path(path)
    if rows is not None:
        obj = {**obj, "subset": {"seed": SUBSET_SEED, "rows": [int(r) for r in rows]}}
    atomic_write_json(path, obj)
    return path

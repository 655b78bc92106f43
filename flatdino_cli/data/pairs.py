"""The pixel decoder's training items: an image's target pixels paired with its features, a row of a
feature store, or the encoder's input for features computed on the fly (stages/decoder.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from flatdino_cli.data.sources import BadImage, BadImageWarning, ImageList, load_rgb
from flatdino_cli.data.store import Store, first_view, split_indices
from flatdino_cli.data.transforms import adm_center_crop, normalize, resize, to_tensor
from flatdino_cli.errors import UserError

VAL_COUNT = 500  # held-out images (at most a tenth of the set) when the store has no val/ split
MEAN_IMAGES = 512  # training images averaged into the mean-image baseline


class DecoderItems(Dataset):
    """Items (target (3, S, S) in [0, 1], x) with x a feature row (P, C) of `store_data` or the encoder
    input (3, E, E); None for an unreadable image (with a warning naming it)."""

    def __init__(self, paths: list[str], crop: int, out_size: int, enc_size: int | None = None,
                 interp: str = "bicubic", store_data: Path | None = None, rows: list[int] | None = None,
                 flip: bool = False, seed: int = 0):
        self.paths, self.crop, self.out_size, self.enc_size, self.interp = paths, crop, out_size, enc_size, interp
        self.store_data, self.rows, self.flip = store_data, rows, flip
        self._data, self.seed, self.epoch = None, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The flips follow (seed, epoch, item), not the process's RNG, so a run resumed mid-epoch (or
        loading in worker processes) flips the same images as an uninterrupted one."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray, flip: bool = False, seed: int = 0) -> DecoderItems:
        """The items at `idx`, flipped at random (per seed, epoch, item) if `flip`."""
        return DecoderItems([self.paths[i] for i in idx], self.crop, self.out_size, self.enc_size, self.interp,
                            self.store_data, None if self.rows is None else [self.rows[i] for i in idx], flip, seed)

    def _crop(self, i: int) -> Image.Image | None:
        try:
            img = load_rgb(self.paths[i])
        except BadImage as e:
            warnings.warn(f"skipping unreadable image: {e}", BadImageWarning, stacklevel=3)
            return None
        return adm_center_crop(img, self.crop)

    def target(self, i: int) -> torch.Tensor | None:
        crop = self._crop(i)
        return None if crop is None else resize(to_tensor(crop), self.out_size, "bicubic").clamp(0, 1)

    def __getitem__(self, i: int):
        crop = self._crop(i)
        if crop is None:
            return None
        pixels = to_tensor(crop)  # (3, crop, crop) in [0, 1]
        if self.flip and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            pixels = pixels.flip(-1)
        target = resize(pixels, self.out_size, "bicubic").clamp(0, 1)  # (3, S, S)
        if self.store_data is not None:
            if self._data is None:
                self._data = first_view(np.load(self.store_data, mmap_mode="r"))
            return target, torch.from_numpy(np.array(self._data[self.rows[i]], dtype=np.float32))  # (P, C)
        return target, normalize(resize(pixels, self.enc_size, self.interp))  # (3, E, E)

    def __getstate__(self):
        return {**self.__dict__, "_data": None}  # the memmap is reopened in each DataLoader worker


def collate_pairs(items: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack (target, x) pairs, dropping unreadable images; None when none is left."""
    good = [it for it in items if it is not None]
    if not good:
        return None
    return torch.stack([t for t, _ in good]), torch.stack([x for _, x in good])


def _key(path: str, root: str) -> str:
    """Path relative to its list's root folder, so a store still matches a moved image folder."""
    return os.path.relpath(path, root) if root and Path(root).is_dir() else path


def store_rows(images: ImageList, features: str | Path, encoder_name: str | None
               ) -> tuple[list[tuple[Store, list[str], list[int]]], dict]:
    """[(store, image paths, store rows)] for the store (and its val/ split), aligned to `images` by path,
    and the store's identity for inputs.json."""
    stores = [Store.open(features, expect_kind="features")]
    if (Path(features) / "val" / "manifest.json").exists():
        stores.append(Store.open(Path(features) / "val", expect_kind="features"))
    ident, prep = stores[0].manifest["identity"], stores[0].manifest["preprocessing"]
    if encoder_name is not None and ident.get("encoder") != encoder_name:
        raise UserError(f"--features {features}: holds {ident.get('encoder')} features, not --encoder {encoder_name}")
    if prep.get("crop") != "adm_center_crop":
        raise UserError(f"--features {features}: made with {prep.get('crop')} crops; the decoder's targets need "
                        "the ADM center crop of `flatdino extract`")
    where = {}
    for s, store in enumerate(stores):
        root = store.manifest.get("extra", {}).get("source", "")
        for row, p in enumerate(store.paths):
            where[_key(p, root)] = (s, row)
    found = [where.get(_key(p, images.source)) for p in images.paths]
    missing = [p for p, f in zip(images.paths, found) if f is None]
    if missing:
        raise UserError(f"--features {features}: {len(missing)} of the {len(images)} images of --images "
                        f"{images.source} have no row in the store (e.g. {missing[0]}); extract the store from "
                        f"the same images (`flatdino extract {images.source} STORE`)")
    parts, skipped = [], 0
    for s, store in enumerate(stores):
        sel = [(p, f[1]) for p, f in zip(images.paths, found) if f[0] == s and store.status[f[1]] == 1]
        skipped += sum(1 for f in found if f[0] == s) - len(sel)
        parts.append((store, [p for p, _ in sel], [r for _, r in sel]))
    if skipped:
        tqdm.write(f"train-decoder: {skipped} image(s) the store skipped as unreadable are left out")
    return parts, {"path": str(Path(features).resolve()), "manifest_sha256": stores[0].manifest_hash()}


def store_items(parts: list[tuple[Store, list[str], list[int]]], crop: int, out_size: int
                ) -> tuple[DecoderItems, DecoderItems | None]:
    """The items of store_rows' parts: the training store's, and its val/ split's (None without one)."""
    train, *val = (DecoderItems(paths, crop, out_size, store_data=store.path / "data.npy", rows=rows)
                   for store, paths, rows in parts)
    return train, (val[0] if val else None)


def hold_out(items: DecoderItems, seed: int, flip: bool = False) -> tuple[DecoderItems, DecoderItems]:
    """(train, val): min(VAL_COUNT, a tenth) of the items held out, drawn by `seed`; `flip` the training ones."""
    tr, va = split_indices(len(items), min(VAL_COUNT, len(items) // 10), seed)
    return items.subset(tr, flip=flip, seed=seed), items.subset(va)


def mean_image(items: DecoderItems, count: int = MEAN_IMAGES) -> torch.Tensor:
    """(3, S, S) mean of up to `count` evenly spaced items' targets."""
    idx = np.unique(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int))
    targets = [t for t in (items.target(int(i)) for i in idx) if t is not None]
    if not targets:
        raise UserError("train-decoder: none of the sampled training images could be read")
    return torch.stack(targets).mean(0)

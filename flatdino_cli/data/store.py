"""The on-disk feature/latent store (DESIGN.md "Files on disk"): a memory-mapped `data.npy` +
`labels.npy` + `paths.txt` + a per-row progress bitmap `done.npy` + `manifest.json`.

An extract that is killed at any moment and rerun ends byte-identical to an uninterrupted one.
A store may hold V > 1 views per row (view 0: the ADM centre crop, view 1: its mirror image); then
data.npy is (count, V, *item_shape), `Store.data` is view 0 and `FeatureDataset` draws the views.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from flatdino_cli.data.sources import source_hash
from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file


FORMAT_VERSION = 1
PENDING, DONE, SKIPPED = 0, 1, 2  # done.npy values
_STORE_FILES = ("manifest.json", "data.npy", "labels.npy", "paths.txt", "done.npy")
# what must agree for a rerun to resume an existing store instead of refusing it
_IDENTITY_KEYS = ("format_version", "kind", "item_shape", "dtype", "count", "identity", "preprocessing",
                  "source_hash", "views")


def _jsonable(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists etc., so comparisons see what is on disk


def _diff(have, want, prefix: str) -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        return [d for k in sorted(set(have) | set(want)) for d in _diff(have.get(k), want.get(k), f"{prefix}.{k}")]
    return [] if have == want else [f"{prefix} ({have!r} on disk, {want!r} now)"]


def _runs(sorted_idx: np.ndarray):
    """(start, stop) position ranges of consecutive values in a sorted index array."""
    cuts = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    bounds = np.concatenate([[0], cuts, [len(sorted_idx)]])
    return zip(bounds[:-1].tolist(), bounds[1:].tolist())


def _pwrite_all(fd: int, buf: bytes | memoryview, offset: int) -> None:
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _new_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    m = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # header + sparse zeros
    m.flush()
    del m


def first_view(data: np.ndarray) -> np.ndarray:
    """(count, *item) of a store's data.npy: view 0 of a multi-view (count, V, P, C) array."""
    return data[:, 0] if data.ndim == 4 else data


def epoch_views(seed: int, epoch: int, count: int, views: int) -> np.ndarray:
    """(count,) uint8: the view each store row shows in `epoch`, a function of (seed, epoch, row) only."""
    return np.random.default_rng([seed, epoch]).integers(0, views, size=count, dtype=np.uint8)


class Store:
    """Rows of encoder features or VAE latents on disk; see the module docstring and DESIGN.md.

    Attributes: path, manifest, count, item_shape, views, dtype, all_views ((count, *row_shape)
    read-only memmap; row_shape = (views, *item_shape) if views > 1 else item_shape), data (view 0,
    (count, *item_shape)), labels ((count,) int64), paths (list[str]), status ((count,) uint8:
    0 pending, 1 done, 2 skipped = unreadable image, row left as zeros).
    """

    def __init__(self, path: Path, manifest: dict, writable: bool):
        self.path, self.manifest, self.writable = path, manifest, writable
        self.count = int(manifest["count"])
        self.item_shape = tuple(manifest["item_shape"])
        self.views = int(manifest.get("views", 1))  # stores written before the view axis hold one
        self.row_shape = (self.views, *self.item_shape) if self.views > 1 else self.item_shape
        self.dtype = np.dtype(manifest["dtype"])
        try:
            self.all_views = np.load(path / "data.npy", mmap_mode="r")
            self.labels = np.load(path / "labels.npy")
            self.status = np.array(np.load(path / "done.npy", mmap_mode="r"))
            self.paths = (path / "paths.txt").read_text().split("\n")[:-1]  # not splitlines: \r is legal in names
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: store files are damaged ({e}); rerun with --overwrite") from None
        if (self.all_views.shape != (self.count, *self.row_shape) or self.all_views.dtype != self.dtype
                or self.labels.shape != (self.count,) or self.status.shape != (self.count,)
                or len(self.paths) != self.count):
            raise UserError(f"{path}: store files disagree with manifest.json; rerun with --overwrite")
        self.data = first_view(self.all_views)
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape))
        self._data_fd = self._done_fd = None
        if writable:
            self._data_offset = self.all_views.offset
            self._done_offset = np.load(path / "done.npy", mmap_mode="r").offset
            self._data_fd = os.open(path / "data.npy", os.O_RDWR)
            self._done_fd = os.open(path / "done.npy", os.O_RDWR)

    @property
    def num_classes(self) -> int:
        """The classes the rows are labelled from: the class names extract recorded, or the largest
        label + 1; 0 for a store without labels (every row -1: an unlabelled image folder)."""
        names = self.manifest.get("extra", {}).get("class_names") or []
        return max(len(names), int(self.labels.max()) + 1 if self.count else 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path: str | Path, kind: str, item_shape: Sequence[int], count: int, dtype: str,
               identity: dict, preprocessing: dict, paths: Sequence[str], labels: Sequence[int],
               extra: dict | None = None, overwrite: bool = False, views: int = 1) -> "Store":
        """A writable store at `path`: a new one, or the existing one (resumed) if its manifest agrees.
        views > 1: each row holds that many views of its image (rows of shape (views, *item_shape)).

        A disagreeing existing store is refused with a UserError unless overwrite=True, which
        replaces the store's own files (nothing else in the folder is touched).
        """
        path = Path(path).expanduser()
        if kind not in ("features", "latents"):
            raise ValueError(f"kind must be 'features' or 'latents', got {kind!r}")
        if dtype not in ("float16", "float32"):
            raise UserError(f"store dtype must be float16 or float32, got {dtype!r}")
        if count < 1 or len(paths) != count or len(labels) != count:
            raise ValueError(f"count={count} but {len(paths)} paths and {len(labels)} labels")
        if any("\n" in p for p in paths):
            raise ValueError("paths must not contain newlines")
        manifest = _jsonable({
            "format_version": FORMAT_VERSION, "kind": kind, "item_shape": list(item_shape), "dtype": dtype,
            "count": count, "identity": identity, "preprocessing": preprocessing,
            "source_hash": source_hash(paths, labels), "complete": False, "skipped": [], "skipped_count": 0,
            "extra": extra or {}, "views": views,
        })
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file; a store is a folder: choose another --out")
        mf = path / "manifest.json"
        if mf.exists() and not overwrite:
            have = cls._read_manifest(path)
            diffs = [d for k in _IDENTITY_KEYS for d in _diff({"views": 1, **have}.get(k), manifest[k], k)]
            if diffs:
                raise UserError(f"{path}: an existing store differs in {'; '.join(diffs)}; pass --overwrite "
                                f"to replace it (or choose another --out)")
            return cls(path, have, writable=True)
        # new store (or overwrite, or a creation that died before its manifest): manifest goes first,
        # so a crash while wiping leaves files that the next create recognises as replaceable
        path.mkdir(parents=True, exist_ok=True)
        for name in _STORE_FILES:
            (path / name).unlink(missing_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.asarray(labels, dtype=np.int64))
        atomic_write_bytes(path / "labels.npy", buf.getvalue())
        atomic_write_text(path / "paths.txt", "".join(f"{p}\n" for p in paths))
        # open_memmap sizes the files sparsely: untouched rows read as zeros, which is what skipped rows hold
        _new_npy(path / "data.npy", np.dtype(dtype), (count, *((views,) if views > 1 else ()), *item_shape))
        _new_npy(path / "done.npy", np.dtype(np.uint8), (count,))
        atomic_write_json(mf, manifest)  # last: its presence means the files above are complete
        return cls(path, manifest, writable=True)

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            m = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: not a store (no manifest.json); make one with `flatdino extract`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}/manifest.json is unreadable ({e}); rerun extract with --overwrite") from None
        if m.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: store format version {m.get('format_version')!r}, this flatdino reads "
                            f"{FORMAT_VERSION}; re-extract it with --overwrite")
        return m

    @classmethod
    def open(cls, path: str | Path, expect_kind: str | None = None) -> "Store":
        """A finished store, read-only. UserError if missing, incomplete or of the wrong kind."""
        path = Path(path).expanduser()
        m = cls._read_manifest(path)
        if expect_kind is not None and m.get("kind") != expect_kind:
            raise UserError(f"{path}: holds {m.get('kind')}, expected {expect_kind} (check the path)")
        store = cls(path, m, writable=False)
        n_left = int((store.status == PENDING).sum())
        if not m.get("complete") or n_left:
            raise UserError(f"{path}: incomplete store ({store.count - n_left} of {store.count} rows done); "
                            f"rerun the same extract command to finish it")
        return store

    # ------------------------------------------------------------------ writing
    def _need_writable(self) -> None:
        if not self.writable:
            raise RuntimeError(f"{self.path}: store opened read-only")

    def write_rows(self, indices, array) -> None:
        """Write rows `indices` (any order, unique) from `array` (len(indices), *row_shape), cast to
        the store dtype. Raises ValueError on non-finite values (e.g. float16 overflow)."""
        self._need_writable()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(array, torch.Tensor):  # cast where the tensor lives (GPU: fast, half the copy)
            array = array.detach().to(getattr(torch, self.dtype.name)).cpu().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught (and refused) below
            arr = np.asarray(array).astype(self.dtype, copy=False)
        if arr.shape != (len(idx), *self.row_shape):
            raise ValueError(f"rows have shape {arr.shape}, expected {(len(idx), *self.row_shape)}")
        if len(idx) == 0:
            return
        order = np.argsort(idx, kind="stable")
        idx, arr = idx[order], np.ascontiguousarray(arr[order])
        if idx[0] < 0 or idx[-1] >= self.count or (np.diff(idx) == 0).any():
            raise ValueError(f"row indices must be unique and in [0, {self.count})")
        if not np.isfinite(arr).all():
            bad = idx[~np.isfinite(arr.reshape(len(idx), -1)).all(1)]
            raise ValueError(f"non-finite values in rows {bad[:8].tolist()} (as {self.dtype}); not written")
        for a, b in _runs(idx):
            _pwrite_all(self._data_fd, memoryview(arr[a:b]).cast("B"), self._data_offset + int(idx[a]) * self._row_bytes)

    def mark_done(self, indices, status: int = DONE) -> None:
        """Flag rows finished. Data is fsynced before the bitmap is written, so no kill or crash ever
        leaves a row flagged whose data is not on disk."""
        self._need_writable()
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(idx) == 0:
            return
        os.fdatasync(self._data_fd)
        self.status[idx] = status
        for a, b in _runs(idx):
            lo, hi = int(idx[a]), int(idx[b - 1]) + 1
            _pwrite_all(self._done_fd, self.status[lo:hi].tobytes(), self._done_offset + lo)
        os.fdatasync(self._done_fd)

    def mark_skipped(self, indices) -> None:
        """Rows whose input could not be read: filled with zeros and flagged 2 (kept out of training)."""
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(idx):
            self.write_rows(idx, np.zeros((len(idx), *self.row_shape), self.dtype))
            self.mark_done(idx, SKIPPED)

    def pending(self) -> np.ndarray:
        """(K,) int64 row indices not yet done, ascending."""
        return np.flatnonzero(self.status == PENDING)

    def valid_indices(self) -> np.ndarray:
        """(K,) int64 rows that hold real data (done and not skipped)."""
        return np.flatnonzero(self.status == DONE)

    def finalize(self, skipped: Sequence[int] | None = None, extra: dict | None = None) -> "Store":
        """Mark `skipped` rows (if any), check every row is done, write the final manifest."""
        self._need_writable()
        if skipped is not None:
            self.mark_skipped(skipped)
        # re-read the bitmap: other processes (torchrun ranks) may have finished rows of their own
        self.status = np.array(np.load(self.path / "done.npy", mmap_mode="r"))
        left = self.pending()
        if len(left):
            raise RuntimeError(f"{self.path}: {len(left)} rows still pending (first {left[:5].tolist()})")
        bad = np.flatnonzero(self.status == SKIPPED).tolist()
        m = dict(self.manifest, complete=True, skipped=[{"index": i, "path": self.paths[i]} for i in bad],
                 skipped_count=len(bad))
        if extra:
            m["extra"] = _jsonable({**m.get("extra", {}), **extra})
        atomic_write_json(self.path / "manifest.json", m)
        self.manifest = m
        return self

    def manifest_hash(self) -> str:
        """sha256 of manifest.json: what downstream runs record as 'the input I used'."""
        return sha256_file(self.path / "manifest.json")

    def close(self) -> None:
        for fd in (self._data_fd, self._done_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._done_fd = None
        self.writable = False

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def store_identity(store: Store) -> dict:
    """What makes two stores the same data: kind, encoder (+ weights hash), preprocessing, source list.

    A run records it (inputs.json `data_identity`) and refuses to resume on a store that differs."""
    m = store.manifest
    return {"kind": m["kind"], "encoder": m["identity"], "preprocessing": m["preprocessing"],
            "source_hash": m["source_hash"]}


class FeatureDataset(Dataset):
    """Items ((*item_shape) float32 tensor, label) over store rows; skipped rows are left out.

    Of a multi-view store: view 0 (the centre crop), or with `view_seed` the view drawn for each row
    by `epoch_views(view_seed, epoch, ...)` after `set_epoch(epoch)`; `all_views=True` gives whole
    rows (*row_shape). Holds the store's path, not its memmap, so it pickles cheaply into workers.
    """

    def __init__(self, store: Store, indices: Sequence[int] | None = None, view_seed: int | None = None,
                 all_views: bool = False):
        idx = store.valid_indices() if indices is None else np.asarray(indices, dtype=np.int64)
        self.indices = idx[store.status[idx] == DONE]
        self.labels = store.labels[self.indices]
        self.data_path = store.path / "data.npy"
        self.count, self.views, self.view_seed, self.all_views = store.count, store.views, view_seed, all_views
        self.row_views: np.ndarray | None = None  # (count,) view per store row this epoch
        self._data = None

    def set_epoch(self, epoch: int) -> None:
        if self.view_seed is not None and self.views > 1:
            self.row_views = epoch_views(self.view_seed, epoch, self.count, self.views)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._data is None:
            self._data = np.load(self.data_path, mmap_mode="r")
        r = self.indices[i]
        if self.views > 1 and not self.all_views:
            r = (r, 0 if self.row_views is None else int(self.row_views[r]))
        row = np.array(self._data[r], dtype=np.float32)  # a writable copy
        return torch.from_numpy(row), int(self.labels[i])

    def __getstate__(self):
        return {**self.__dict__, "_data": None}


SUBSET_SEED = 0  # the one seed of image subsets (analyses, fd_rep's PCA): every user of a store sees the same rows


def subset_rows(store: Store, n: int | None, seed: int = SUBSET_SEED) -> np.ndarray:
    """(K,) ascending rows of `store` that hold data (skipped images left out): all of them, or a seeded
    uniform choice of n over the whole store. Stores are in folder order (ImageNet: sorted by synset), so
    the first n rows would be the first few hundred classes; the same (store, n, seed) gives the same rows,
    so analyses that compare two spaces compare the same images."""
    rows = store.valid_indices()
    if n is not None:
        if n < 1:
            raise UserError(f"--n {n}: must be a positive number of images")
        if n < len(rows):
            rows = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    if len(rows) == 0:
        raise UserError(f"{store.path}: holds no valid rows")
    return rows


def split_indices(count: int, val_count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) split of range(count): val_count random rows, both sorted."""
    if not 0 <= val_count < count:
        raise UserError(f"validation size {val_count} must be in [0, {count}) for {count} rows")
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[val_count:]), np.sort(perm[:val_count])

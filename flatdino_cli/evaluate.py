"""fd_rep: a cheap quality number of a DiT, in the encoder's feature space.

What fd_rep measures. N class-balanced samples (image i is class i mod K, its noise from (seed, i) as
in `flatdino sample`) are drawn with a sampler setting and mapped into the frozen encoder's feature
space: through the VAE decoder (FlatDINO, FAE) or by de-normalisation (RAE grids). Each sample's
(P, C) feature grid becomes one vector

    r(f) = [ mean_p f_p  (C)  ++  W^T (vec(f) - m) / sqrt(P)  (k = PCA_DIMS) ]

where m and W (P*C, k) are the mean and the top-k principal directions of the flattened grids of the
reference store (fitted once, on at most PCA_FIT_ROWS of its rows; / sqrt(P) puts both parts on the
scale of one patch). fd_rep is the Frechet distance (fid_metrics.frechet_distance, ADM's formula)
between the Gaussian of r over the samples and the Gaussian of r over a validation feature store.
The mean-pooled part sees what is in an image; the PCA part sees where it is (layout), which a real
DINOv2 and the random `tiny` encoder both encode in their grids.

What it leaves out. No pixel decoder is involved: decoder artefacts are not seen, and it is NOT
Inception FID (another network, pixels, 50k samples); values are comparable only between runs
evaluated against the same reference statistics (the same store, encoder and PCA basis) with the same
number of samples (FD is biased upwards at small N).

Keys: `fd_rep` (the preset's guidance: its flow section, cfg scale/interval/schedule), `fd_rep_nocfg`
(the same samples' noise, unguided). The reference statistics are cached beside the store's files as
REFERENCE_FILE, recorded with the store's identity; a cache made for another store is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from flatdino_cli.data import Store, store_identity
from flatdino_cli.errors import UserError
from flatdino_cli.fid_metrics import Gaussian, frechet_distance
from flatdino_cli.flow import FlowConfig
from flatdino_cli.pipeline import Pipeline, sample_chunks
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import atomic_write_bytes

__all__ = ["FD_REP", "FD_REP_NOCFG", "PCA_DIMS", "PCA_FIT_ROWS", "REFERENCE_FILE", "REFERENCE_VERSION",
           "Reference", "reference_stats", "rep_vectors", "fd_rep", "eval_labels", "sample_features",
           "unguided", "evaluate_dit", "default_reference_store"]

FD_REP, FD_REP_NOCFG = "fd_rep", "fd_rep_nocfg"  # the metrics.jsonl / tracker keys, everywhere
PCA_DIMS = 32  # principal directions of the flattened grid
PCA_FIT_ROWS = 1024  # reference rows the PCA is fitted on (P*C floats each: 0.8 GB at 256 x 768)
REFERENCE_FILE = "fd_rep_reference.npz"
REFERENCE_VERSION = 1  # bump when r(f) changes: older caches are refused


@dataclass
class Reference:
    """The fitted r(f) (pca_mean (P*C,), pca_basis (P*C, k)) and the Gaussian of r over a store."""

    pca_mean: np.ndarray
    pca_basis: np.ndarray
    gaussian: Gaussian
    identity: dict  # {"store", "manifest_sha256", "data_identity", "rows", "version"}

    @property
    def item_shape(self) -> tuple[int, int]:
        return tuple(self.identity["item_shape"])


def rep_vectors(feats: torch.Tensor | np.ndarray, pca_mean: np.ndarray, pca_basis: np.ndarray) -> np.ndarray:
    """(B, P, C) features -> (B, C + k) float64 vectors r(f) (module docstring)."""
    f = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats).double().cpu()
    P = f.shape[1]
    pooled = f.mean(1)  # (B, C)
    flat = f.flatten(1) - torch.from_numpy(pca_mean)
    proj = flat @ torch.from_numpy(pca_basis) / P ** 0.5  # (B, k)
    return torch.cat([pooled, proj], 1).numpy()


def _store_record(store: Store) -> dict:
    return {"store": str(store.path.resolve()), "manifest_sha256": store.manifest_hash(),
            "data_identity": json.loads(json.dumps(store_identity(store))), "item_shape": list(store.item_shape),
            "version": REFERENCE_VERSION}


def _fit(store: Store, batch: int = 256) -> Reference:
    """PCA on the first PCA_FIT_ROWS valid rows (view 0), then the Gaussian of r over all valid rows."""
    idx = store.valid_indices()
    if len(idx) < 2:
        raise UserError(f"{store.path}: fd_rep needs a reference store with at least 2 rows, it has {len(idx)}")
    fit = torch.from_numpy(np.asarray(store.data[idx[:PCA_FIT_ROWS]], dtype=np.float32)).flatten(1).double()
    mean = fit.mean(0)
    k = min(PCA_DIMS, len(fit) - 1, fit.shape[1])
    # the top-k right singular vectors of the centred rows, via the small (n, n) Gram matrix
    centred = fit - mean
    w, u = torch.linalg.eigh(centred @ centred.T)
    top = torch.argsort(w, descending=True)[:k]
    basis = centred.T @ u[:, top] / w[top].clamp_min(1e-12).sqrt()  # (P*C, k), orthonormal columns
    sign = torch.sign(basis[basis.abs().argmax(0), torch.arange(k)])  # a fixed sign per direction
    basis = (basis * sign).numpy()
    mean = mean.numpy()
    vecs = np.concatenate([rep_vectors(np.asarray(store.data[idx[lo: lo + batch]], np.float32), mean, basis)
                           for lo in range(0, len(idx), batch)])
    return Reference(mean, basis, Gaussian.from_features(vecs), {**_store_record(store), "rows": int(len(idx))})


def _save(ref: Reference, path: Path) -> None:
    g = ref.gaussian
    arrays = {"pca_mean": ref.pca_mean, "pca_basis": ref.pca_basis, "mu": g.mu,
              "identity": np.frombuffer(json.dumps(ref.identity).encode(), np.uint8)}
    arrays["sigma" if g.sigma is not None else "root"] = g.sigma if g.sigma is not None else g.root
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path) -> Reference:
    try:
        with np.load(path, allow_pickle=False) as z:
            identity = json.loads(z["identity"].tobytes().decode())
            g = Gaussian(z["mu"], sigma=z["sigma"] if "sigma" in z else None, root=z["root"] if "root" in z else None)
            return Reference(z["pca_mean"], z["pca_basis"], g, identity)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable fd_rep reference ({type(e).__name__}); delete it to recompute") from None


def reference_stats(store_path: str | Path, cache: str | Path | None = None) -> Reference:
    """The fd_rep reference of a feature store (its validation split, normally): read from `cache`
    (default STORE/REFERENCE_FILE) when that file was made for this very store, computed and cached
    (atomically) when there is none; a cache recorded for another store or data is refused (UserError)."""
    store = Store.open(store_path, expect_kind="features")
    path = Path(cache) if cache is not None else store.path / REFERENCE_FILE
    want = _store_record(store)
    if path.is_file():
        ref = _load(path)
        have = {k: ref.identity.get(k) for k in ("manifest_sha256", "data_identity", "version")}
        if have != {k: want[k] for k in have}:
            what = "another fd_rep version" if have["version"] != want["version"] else \
                f"another store ({ref.identity.get('store')})"
            raise UserError(f"{path}: fd_rep reference statistics of {what}, not of {store.path}; delete it "
                            "to recompute them for this store, or pass the store they were made from")
        return ref
    ref = _fit(store)
    try:
        _save(ref, path)
    except OSError as e:  # a read-only store still evaluates, just without the cache
        print(f"fd_rep: reference not cached at {path} ({e.strerror})")
    return ref


def default_reference_store(latents: str | Path) -> Path:
    """The validation feature store for a DiT trained on `latents`: FEATURES/val (FEATURES: the latent
    store's source features, or the store itself in RAE mode), else FEATURES itself."""
    store = Store.open(latents)
    base = store.path
    if store.manifest["kind"] == "latents":
        base = Path(store.manifest["identity"].get("features", base))
    if base.name == "val":  # already a validation split
        return base
    return base / "val" if (base / "val" / "manifest.json").is_file() else base


def eval_labels(n: int, num_classes: int) -> list[int]:
    """Class-balanced labels of evaluation images 0..n-1: image i is class i mod K."""
    return [i % num_classes for i in range(n)]


def unguided(flow: FlowConfig) -> FlowConfig:
    """The flow settings without guidance (scale 1, no schedule): fd_rep_nocfg."""
    return dataclasses.replace(flow, cfg_scale=1.0, cfg_schedule=())


def sample_features(pipe: Pipeline, ref: Reference, indices: Sequence[int], seed: int, flow: FlowConfig | None = None,
                    batch_size: int = 64, rt: Runtime = CPU) -> np.ndarray:
    """(len(indices), C + k) vectors r(f) of evaluation images `indices` (this rank's share)."""
    labels = [i % pipe.cfg.model.num_classes for i in indices]
    out = []
    for x, k in sample_chunks(pipe, labels, list(indices), seed, flow, batch_size, rt):
        feats = pipe.features(x, rt)[:k]
        if tuple(feats.shape[1:]) != ref.item_shape:
            raise UserError(f"fd_rep reference {ref.identity.get('store')}: holds {ref.item_shape} features, this "
                            f"DiT makes {tuple(feats.shape[1:])}; pass a validation store of its encoder")
        out.append(rep_vectors(feats, ref.pca_mean, ref.pca_basis))
    return np.concatenate(out) if out else np.zeros((0, ref.gaussian.dim))


def _gather(vecs: np.ndarray, indices: Sequence[int], n: int, rt: Runtime) -> np.ndarray:
    """Every rank's (n_r, D) vectors -> all n of them in image order (the same array on every rank)."""
    if not rt.distributed:
        return vecs
    import torch.distributed as dist

    parts: list = [None] * rt.world_size
    dist.all_gather_object(parts, (list(indices), vecs))
    full = np.zeros((n, vecs.shape[1]))
    for idx, v in parts:
        full[idx] = v
    return full


def fd_rep(vecs: np.ndarray, ref: Reference) -> float:
    """Frechet distance between the Gaussian of r-vectors (N, C + k) and the reference's."""
    return frechet_distance(Gaussian.from_features(vecs), ref.gaussian)


@torch.no_grad()
def evaluate_dit(pipe: Pipeline, ref: Reference, samples: int, seed: int = 0, flow: FlowConfig | None = None,
                 batch_size: int = 64, rt: Runtime = CPU, guided: bool = True, nocfg: bool = True) -> dict[str, float]:
    """{FD_REP: ..., FD_REP_NOCFG: ...} of `samples` class-balanced samples from `seed` with the sampler
    setting `flow` (default: the DiT config's). pipe.dit should be the EMA model in eval mode; pipe.decoder
    may be None. Under DDP rank r samples images r, r + W, ... and the vectors are gathered, so the value
    is the same for any number of processes (up to float rounding off the CPU)."""
    if samples < 2:
        raise UserError(f"eval.samples={samples}: fd_rep needs at least 2 samples")
    flow = flow or pipe.cfg.flow
    mine = list(range(rt.rank, samples, rt.world_size))
    out = {}
    for key, f, on in ((FD_REP, flow, guided), (FD_REP_NOCFG, unguided(flow), nocfg)):
        if on:
            vecs = _gather(sample_features(pipe, ref, mine, seed, f, batch_size, rt), mine, samples, rt)
            out[key] = fd_rep(vecs, ref)
    return out

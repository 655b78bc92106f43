"""fd_rep: a cheap quality number of a DiT, in the encoder's feature space.

What fd_rep measures. N class-balanced samples (image i is class i mod K, its noise from (seed, i) as
in `flatdino sample`) are drawn with a sampler setting and mapped into the frozen encoder's feature
space: through the VAE decoder (FlatDINO, FAE) or by de-normalisation (RAE grids). Each sample's
(P, C) feature grid becomes one vector

    r(f) = [ mean_p f_p  (C)  ++  W^T (vec(f) - m) / sqrt(P)  (k = PCA_DIMS) ]

where m and W (P*C, k) are the mean and the top-k principal directions of the flattened grids of the
reference store (fitted once, on a seeded uniform subset of at most PCA_FIT_ROWS of its rows;
/ sqrt(P) puts both parts on the scale of one patch). fd_rep is the Frechet distance
(fid_metrics.frechet_distance, ADM's formula) between the Gaussian of r over the samples and the
Gaussian of r over a validation feature store.
The mean-pooled part sees what is in an image; the PCA part sees where it is (layout), which a real
DINOv2 and the random `tiny` encoder both encode in their grids.

What it leaves out. No pixel decoder is involved: decoder artefacts are not seen, and it is NOT
Inception FID (another network, pixels, 50k samples); values are comparable only between runs
evaluated against the same reference statistics (the same store, encoder and PCA basis) with the same
number of samples (FD is biased upwards at small N).

Keys: `fd_rep` (the preset's guidance: its flow section, cfg scale/interval/schedule), `fd_rep_nocfg`
(the same samples' noise, unguided). The unguided one is the training-progress signal: strong guidance
on a young model can push samples off the feature distribution (fd_rep up) while they become easier to
name (tests/test_quickstart.py measures both against the toy classifier). The reference statistics
are cached beside the store's files as REFERENCE_FILE, recorded with the store's identity; a cache
made for another store is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flatdino_cli.data import Store, store_identity, subset_rows
from flatdino_cli.errors import UserError
from flatdino_cli.fid_metrics import Gaussian, frechet_distance
from flatdino_cli.flow import FlowConfig
from flatdino_cli.checkpoint import checkpoint_dir, kept_checkpoints, load_state
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.pipeline.generate import sample_chunks
from flatdino_cli.pipeline.load import LoadedDiT, load_dit, trained_on_features
from flatdino_cli.pipeline.options import sampling_flow
from flatdino_cli.rundir import is_run_dir, run_inputs
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import atomic_write_bytes, atomic_write_json, read_json

__all__ = ["FD_REP", "FD_REP_NOCFG", "PCA_DIMS", "PCA_FIT_ROWS", "REFERENCE_FILE", "REFERENCE_VERSION",
           "Reference", "reference_stats", "rep_vectors", "fd_rep", "eval_labels", "sample_features",
           "unguided", "evaluate_dit", "default_reference_store", "CUDA_SAMPLES", "CPU_SAMPLES", "default_samples",
           "eval_every_steps", "training_evaluator", "eval_vae", "quality_summary", "RESULTS_FILE",
           "ScoreConfig", "evaluate_checkpoints", "evaluation_parts", "shared_reference"]

FD_REP, FD_REP_NOCFG = "fd_rep", "fd_rep_nocfg"  # the metrics.jsonl / tracker keys, everywhere
PCA_DIMS = 32  # principal directions of the flattened grid
PCA_FIT_ROWS = 1024  # reference rows the PCA is fitted on (P*C floats each: 0.8 GB at 256 x 768)
REFERENCE_FILE = "fd_rep_reference.npz"
REFERENCE_VERSION = 2  # bump when r(f) changes: older caches are refused (2: PCA on a uniform subset)
CUDA_SAMPLES, CPU_SAMPLES = 2000, 240  # eval.samples = 0: per evaluation, by device


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
    """PCA on a seeded uniform subset of PCA_FIT_ROWS valid rows (view 0; a store is class-sorted, so not its
    first rows), then the Gaussian of r over all valid rows."""
    idx = store.valid_indices()
    if len(idx) < 2:
        raise UserError(f"{store.path}: fd_rep needs a reference store with at least 2 rows, it has {len(idx)}")
    fit_rows = subset_rows(store, PCA_FIT_ROWS)
    fit = torch.from_numpy(np.asarray(store.data[fit_rows], dtype=np.float32)).flatten(1).double()
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
        raise UserError(f"{path}: not a readable fd_rep reference ({type(e).__name__}); delete it to "
                        "recompute") from None


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


def shared_reference(store_path: str | Path, rt: Runtime = CPU) -> Reference:
    """reference_stats for every rank: rank 0 computes (and caches) them first, the others then read them."""
    if rt.is_main:
        reference_stats(store_path)
    rt.barrier()
    return reference_stats(store_path)


def default_reference_store(latents: str | Path) -> Path:
    """The validation feature store for a DiT trained on `latents`: FEATURES/val (FEATURES: the latent
    store's source features, or the store itself in RAE mode), else FEATURES itself."""
    store = Store.open(latents)
    base = store.path
    if store.manifest["kind"] == "latents":
        if not store.manifest["identity"].get("features"):
            raise UserError(f"{store.path}: records no feature store its latents came from, so fd_rep has no "
                            "default reference; pass one (eval.reference, --reference)")
        base = Path(store.manifest["identity"]["features"])
    if base.name == "val":  # already a validation split
        return base
    return base / "val" if (base / "val" / "manifest.json").is_file() else base


def eval_labels(indices: Sequence[int], num_classes: int) -> list[int]:
    """Class-balanced labels of evaluation images `indices`: image i is class i mod K (an unconditional
    DiT, K = 0: its one null class, 0, as `sample` draws it)."""
    return [i % max(1, num_classes) for i in indices]


def unguided(flow: FlowConfig) -> FlowConfig:
    """The flow settings without guidance (scale 1, no schedule): fd_rep_nocfg."""
    return dataclasses.replace(flow, cfg_scale=1.0, cfg_schedule=())


def sample_features(pipe: Pipeline, ref: Reference, indices: Sequence[int], seed: int, flow: FlowConfig | None = None,
                    batch_size: int = 64, rt: Runtime = CPU,
                    evaluations: list[tuple[int, int]] | None = None) -> np.ndarray:
    """(len(indices), C + k) vectors r(f) of evaluation images `indices` (this rank's share);
    `evaluations` receives (images, network evaluations per image) per chunk, as sample_chunks says."""
    labels = eval_labels(indices, pipe.cfg.model.num_classes)
    out = []
    for x, k in sample_chunks(pipe, labels, list(indices), seed, flow, batch_size, rt, exact=False,
                              evaluations=evaluations):
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
                 batch_size: int = 64, rt: Runtime = CPU, guided: bool = True, nocfg: bool = True,
                 evaluations: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """{FD_REP: ..., FD_REP_NOCFG: ...} of `samples` class-balanced samples from `seed` with the sampler
    setting `flow` (default: the DiT config's). pipe.dit should be the EMA model in eval mode; pipe.decoder
    may be None. `evaluations`: the guided set's network evaluations per chunk (an adaptive solver's). Under DDP rank r samples images r, r + W, ... and the vectors are gathered, so the value
    is the same for any number of processes (up to float rounding off the CPU)."""
    if samples < 2:
        raise UserError(f"eval.samples={samples}: fd_rep needs at least 2 samples")
    flow = flow or pipe.cfg.flow
    mine = list(range(rt.rank, samples, rt.world_size))
    out = {}
    for key, f, on in ((FD_REP, flow, guided), (FD_REP_NOCFG, unguided(flow), nocfg)):
        if on:
            vecs = _gather(sample_features(pipe, ref, mine, seed, f, batch_size, rt,
                                           evaluations if key == FD_REP else None), mine, samples, rt)
            out[key] = fd_rep(vecs, ref)
    return out


# ----------------------------------------------------------------------------- during training
def default_samples(samples: int, rt: Runtime) -> int:
    """eval.samples, or (0) the device's default."""
    return samples or (CUDA_SAMPLES if rt.is_cuda else CPU_SAMPLES)


def eval_every_steps(every: int, unit: str, count: int, total: int, steps_per_epoch: int) -> int:
    """The evaluation period in optimizer steps (0: off): eval.every in its unit, or (-1) about `count`
    evaluations over the run's `total` steps. The last step is always evaluated as well."""
    if every == 0:
        return 0
    if every < 0:
        return max(1, math.ceil(total / count))
    return every * (steps_per_epoch if unit == "epochs" else 1)


def eval_vae(latents: Store, device) -> nn.Module | None:
    """The VAE that turns a latent store's rows back into features (None for a feature store: RAE mode)."""
    if latents.manifest["kind"] != "latents":
        return None
    vae_run = latents.manifest["identity"].get("vae_run")
    if not vae_run or not is_run_dir(vae_run):
        raise UserError(f"{latents.path}: fd_rep decodes samples with the VAE these latents came from "
                        f"({vae_run or 'not recorded'}), which is not there; restore it")
    return load_run(vae_run, "vae", device=device)[1]


def training_evaluator(cfg, ref: Reference, vae: nn.Module | None, stats: nn.Module | None,
                       rt: Runtime) -> Callable[[nn.Module], dict[str, float]]:
    """Task.evaluate for train-dit: fd_rep (and fd_rep_nocfg) of the network it is given (the EMA model),
    from cfg.eval's samples and seed with the preset's sampler; the same images at every evaluation."""
    n = default_samples(cfg.eval.samples, rt)

    def evaluate(net: nn.Module) -> dict[str, float]:
        was = net.training
        net.eval()  # label dropout off
        try:
            pipe = Pipeline(cfg, net, None, vae, stats)
            out = evaluate_dit(pipe, ref, n, cfg.eval.seed, cfg.flow, cfg.eval.batch_size, rt, nocfg=cfg.eval.nocfg)
        finally:
            net.train(was)
        return {**out, "eval_samples": n}

    return evaluate


def quality_summary(rows: Sequence[dict]) -> dict | None:
    """The latest and the best (lowest) fd_rep of a run's metrics rows, with their steps (None without
    evaluations): what `workspace` and `info` show."""
    q = [r for r in rows if FD_REP in r]
    if not q:
        return None
    best = min(q, key=lambda r: r[FD_REP])
    return {"last": q[-1][FD_REP], "step": q[-1]["step"], "best": best[FD_REP], "best_step": best["step"]}


# ----------------------------------------------------------------------------- after the fact: `flatdino eval`
RESULTS_FILE = "fd_rep.json"  # in a train-dit run: `flatdino eval`'s results, keyed by what they depend on


def _recorded_reference(inputs: dict) -> str | None:
    """The reference a run was evaluated against in training, else the default for its training data."""
    if inputs.get("eval_reference", {}).get("store"):
        return inputs["eval_reference"]["store"]
    data = inputs.get("latents", {}).get("path")
    return str(default_reference_store(data)) if data and Path(data).is_dir() else None


def _reference(dit: Path, reference: str | Path | None, rt: Runtime) -> Reference:
    """--reference, else the run's recorded one (shared_reference)."""
    store = reference or (is_run_dir(dit) and _recorded_reference(run_inputs(dit))) or None
    if store is None:
        raise UserError(f"{dit}: no validation feature store is recorded for it; pass --reference STORE (features "
                        "of the encoder whose space it generates in, e.g. FEATURES/val)")
    return shared_reference(store, rt)


def _vae_for(d: LoadedDiT, dit: Path, vae_run: str | Path | None, device) -> nn.Module | None:
    """The VAE that maps a DiT's samples into feature space (None in RAE mode): --vae, else the recorded one."""
    if trained_on_features(d.cfg, d.inputs.get("kind")):
        return None
    vae_run = vae_run or d.inputs.get("identity", {}).get("vae_run")
    if not vae_run or not Path(vae_run).is_dir():
        raise UserError(f"{dit}: generates latents; pass --vae, the VAE run whose latents trained it "
                        f"(recorded: {vae_run or 'none'})")
    return load_run(vae_run, "vae", device=device)[1]


def evaluation_parts(dit: str | Path, reference: str | Path | None = None, samples: int = 0,
                     vae_run: str | Path | None = None, stats: str | Path | None = None, rt: Runtime = CPU,
                     which: str | None = None, ema: bool = True) -> tuple[Pipeline, Reference, int]:
    """(features-only Pipeline of a DiT, its fd_rep Reference, the sample count) for eval and sweep."""
    dit = Path(dit)
    d = load_dit(dit, rt.device, ema, stats, which=which)
    pipe = Pipeline(d.cfg, d.model.eval(), None, _vae_for(d, dit, vae_run, rt.device), d.stats, {"dit": d.identity})
    return pipe, _reference(dit, reference, rt), default_samples(samples, rt)


@dataclass(frozen=True)
class ScoreConfig:
    """How `flatdino eval` and `flatdino sweep` score a DiT: fd_rep of `samples` class-balanced samples
    (0: the device's default) from the noise of `seed`, against a validation feature store."""

    reference: str | Path | None = None  # None: the store the run was evaluated against, else its data's val
    samples: int = 0
    seed: int = 0
    batch_size: int = 256
    vae_run: str | Path | None = None  # None: the one recorded with the DiT's latents
    stats: str | Path | None = None  # RAE's stat.pt for an RAE checkpoint (None: beside it)
    paper_sampler: bool = False  # sample with the paper's sampler and steps (flow.paper_*), not the DiT's default


def evaluate_checkpoints(path: str | Path, cfg: ScoreConfig = ScoreConfig(), nocfg: bool = True, ema: bool = True,
                         rt: Runtime = CPU) -> list[dict]:
    """fd_rep of every checkpoint of a train-dit run (the kept step-NNNNNNN ones, oldest first, then latest)
    or of RAE's released stage2_model.pt, with the DiT's own sampler setting, exactly as train-dit
    evaluates: old runs, baselines and new runs get the same number against the same reference. A run's
    results are cached in RUN/RESULTS_FILE by (weights, reference, samples, seed, sampler); a rerun
    computes only what is missing. Returns one row per checkpoint."""
    path = Path(path)
    is_run = is_run_dir(path)
    ref, n = _reference(path, cfg.reference, rt), default_samples(cfg.samples, rt)
    cache = read_json(path / RESULTS_FILE) if is_run else {}
    unloaded = object()
    rows, vae = [], unloaded  # the VAE (None in RAE mode), loaded at the first checkpoint that samples
    for which in ([*kept_checkpoints(path), "latest"] if is_run else [None]):
        d = load_dit(path, rt.device, ema, cfg.stats, which=which)
        flow = sampling_flow(d.cfg.flow, paper=cfg.paper_sampler)
        key = json.dumps([d.identity["sha256"], ref.identity["manifest_sha256"], REFERENCE_VERSION, n, cfg.seed, nocfg,
                          dataclasses.asdict(flow)], sort_keys=True)  # the same weights: the same number
        step = int(load_state(checkpoint_dir(path, which) / "state.pt")["step"]) if is_run else None
        if key not in cache:
            if vae is unloaded:
                vae = _vae_for(d, path, cfg.vae_run, rt.device)
            pipe = Pipeline(d.cfg, d.model.eval(), None, vae, d.stats)
            result = evaluate_dit(pipe, ref, n, cfg.seed, flow, cfg.batch_size, rt, nocfg=nocfg)
            cache[key] = {**result, "samples": n, "seed": cfg.seed, "reference": ref.identity["store"]}
            if is_run and rt.is_main:
                atomic_write_json(path / RESULTS_FILE, cache)  # after each checkpoint: a kill loses one at most
        rows.append({"checkpoint": which or str(path), "step": step, **cache[key]})
    return rows

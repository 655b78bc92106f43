"""`flatdino train-dit`: the flow-matching DiT on a latent store (FlatDINO) or a feature store (RAE).

FlatDINO latents are used raw (the VAE mean mu, no normalisation). RAE mode (`normalize: true` in
the preset) standardises each position of the 16x16x768 grid with statistics stored in the run dir
as stats.pt in RAE's own format ({"mean", "var"} of shape (C, H, W)), so a released RAE stat.pt can
be dropped in and ours can be read by RAE's code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flatdino_cli.checkpoint import checkpoint_dir
from flatdino_cli.classes import class_label
from flatdino_cli.config import DiTStageConfig
from flatdino_cli.data import FeatureDataset, Store, store_identity, with_store_shape
from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import (default_reference_store, eval_every_steps, eval_vae, shared_reference,
                                   training_evaluator)
from flatdino_cli.flow import flow_loss
from flatdino_cli.models import build_model
from flatdino_cli.models.stats import STATS_FILE, load_stats, save_stats
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.pipeline.generate import generate
from flatdino_cli.pipeline.load import decoding_parts, trained_on_features
from flatdino_cli.rundir import run_config
from flatdino_cli.runtime import Runtime
from flatdino_cli.train import Task, fit
from flatdino_cli.viz import save_grid

T_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def compute_stats(store: Store, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-position mean and population variance over the store's valid rows, every view of
    them (the data trained on), with float64 sums."""
    idx = store.valid_indices()
    s = np.zeros(store.item_shape, np.float64)
    s2 = np.zeros(store.item_shape, np.float64)
    for lo in tqdm(range(0, len(idx), batch), desc="compute-stats", unit="batch"):
        x = np.asarray(store.all_views[idx[lo: lo + batch]], dtype=np.float64).reshape(-1, *store.item_shape)
        s += x.sum(0)
        s2 += np.square(x).sum(0)
    n = len(idx) * store.views
    mean = s / n
    var = np.maximum(s2 / n - mean**2, 0.0)
    return torch.from_numpy(mean).float(), torch.from_numpy(var).float()


class LabelledRows(torch.utils.data.Dataset):
    """(latent, label) with unlabelled rows (-1) mapped to the null class (trained unconditionally)."""

    def __init__(self, inner: FeatureDataset, null_class: int):
        self.inner, self.null = inner, null_class

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return x, self.null if y < 0 else y


def with_resumed_classes(cfg: DiTStageConfig, out: Path, latents, resume: bool) -> DiTStageConfig:
    """A resumed run keeps its model's label table (its checkpoint's shape): a store with fewer classes
    trains on, one with more is refused (the table has no rows for them)."""
    if not resume or checkpoint_dir(out) is None:
        return cfg
    recorded = run_config(out, "dit")
    have = recorded.model.num_classes
    if cfg.model.num_classes > have:
        what = f"{have} classes" if have else "no classes (unconditional)"
        raise UserError(f"{latents}: holds {cfg.model.num_classes} classes but the run {out} resumes a model of "
                        f"{what}; train a new run (--out NEW or --no-resume)")
    flow = recorded.flow if have and not cfg.model.num_classes else cfg.flow  # its guidance, on unlabelled data too
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=have), flow=flow)


def train_dit(cfg: DiTStageConfig, out: Path, rt: Runtime, latents: str | Path, resume: bool = True,
              recompute_stats: bool = False, on_step=None, new_data: bool = False) -> dict:
    out = Path(out)
    store = Store.open(latents)
    cfg = with_resumed_classes(with_store_shape(cfg, store, latents), out, latents, resume)
    grid = tuple(cfg.model.grid) if cfg.model.grid else None
    stats = None
    if cfg.normalize:
        if recompute_stats or not (out / STATS_FILE).exists():
            if rt.is_main:
                out.mkdir(parents=True, exist_ok=True)
                save_stats(out / STATS_FILE, *compute_stats(store), grid)
            rt.barrier()
        stats = load_stats(out / STATS_FILE, grid).to(rt.device)
        if stats.mean.dim() == 2 and tuple(stats.mean.shape) != (cfg.model.tokens, cfg.model.in_dim):
            raise UserError(f"{out / STATS_FILE}: per-position stats of token shape {tuple(stats.mean.shape)}, "
                            f"the store holds {(cfg.model.tokens, cfg.model.in_dim)}; rerun with --compute-stats")
    torch.manual_seed(cfg.train.seed)  # the init follows train.seed
    model = build_model(cfg)
    flow = cfg.flow

    def loss_fn(net, batch, info):
        z, y = batch
        if stats is not None:
            z = stats.normalize(z)
        loss, t, per = flow_loss(net, z, y, flow)
        metrics = {}
        for lo, hi in zip(T_BUCKETS[:-1], T_BUCKETS[1:]):
            m = (t >= lo) & (t < hi) if hi < 1 else (t >= lo)
            if m.any():
                metrics[f"loss_t{lo:.2f}-{hi:.2f}"] = per[m].mean().item()
        return loss, metrics

    inputs = {"latents": {"path": str(Path(latents).resolve()), "manifest_sha256": store.manifest_hash(),
                          "kind": store.manifest["kind"], "identity": store.manifest["identity"]},
              "data_path": str(Path(latents).resolve()), "data_identity": store_identity(store)}
    evaluate, ref = quality_evaluator(cfg, store, stats, rt)
    if ref is not None:
        inputs["eval_reference"] = ref.identity
    if store.views == 1 and rt.is_main:
        tqdm.write(f"train-dit: {latents} holds one view per image, so no mirror images are trained on "
                   "(re-extract the features with --mirror, then the latents, for the paper's flips)")
    rows = FeatureDataset(store, view_seed=cfg.train.seed)  # crop or mirror, drawn per (seed, epoch, row)
    task = Task(model=model, train_set=LabelledRows(rows, cfg.model.num_classes), loss_fn=loss_fn,
                config=cfg, inputs=inputs, on_step=on_step, keep_files=(STATS_FILE,) if stats is not None else (),
                evaluate=evaluate, eval_period=lambda total, spe: eval_every_steps(
                    cfg.eval.every, cfg.eval.unit, cfg.eval.count, total, spe))
    return fit(task, cfg.train, out, rt, resume=resume, desc="train-dit", new_data=new_data)


def quality_evaluator(cfg: DiTStageConfig, store: Store, stats, rt: Runtime):
    """(Task.evaluate, its fd_rep Reference), or (None, None) with eval.every = 0. With the default cadence
    (eval.every = -1) a run whose latents' VAE is gone trains without evaluations and says so; asked for
    explicitly (eval.every > 0), that is an error."""
    if cfg.eval.every == 0:
        return None, None
    try:
        vae = eval_vae(store, rt.device)
        ref_store = cfg.eval.reference or default_reference_store(store.path)
        Store.open(ref_store, expect_kind="features")
    except UserError as e:
        if cfg.eval.every > 0:
            raise UserError(f"{e}; or turn the evaluation off with --set eval.every=0") from None
        if rt.is_main:
            tqdm.write(f"train-dit: no fd_rep evaluations: {e} (--set eval.every=0 silences this)")
        return None, None
    ref = shared_reference(ref_store, rt)
    return training_evaluator(cfg, ref, vae, stats, rt), ref


def training_grid_hook(cfg: DiTStageConfig, out: str | Path, vae_run: str | Path | None, decoder: str | Path,
                       rt: Runtime, seed: int = 0) -> Callable:
    """on_step(step, model, ema) for train-dit: every cfg.sample_every steps, OUT/samples/step_XXXXXXX.png
    with one image of each of the first 8 classes (EMA weights when there are some). The VAE and decoder
    are loaded (and checked against cfg) now, so a mismatch fails before training starts."""
    out = Path(out)
    vae, dec, identity = decoding_parts(cfg, vae_run, decoder, rt.device, "this DiT preset", trained_on_features(cfg))
    labels = list(range(min(8, cfg.model.num_classes))) or [0] * 8  # unconditional: 8 draws of the null class
    cache: dict = {}

    def on_step(step: int, model: nn.Module, ema: nn.Module | None) -> Path | None:
        if not cfg.sample_every or step % cfg.sample_every:
            return None
        if cfg.normalize and "stats" not in cache:  # written by train-dit before its first step
            grid = tuple(cfg.model.grid) if cfg.model.grid else None
            cache["stats"] = load_stats(out / STATS_FILE, grid).to(rt.device)
        net = ema if ema is not None else model
        was = net.training
        net.eval()  # label dropout off
        try:
            pipe = Pipeline(cfg, net, dec, vae, cache.get("stats"), identity)
            images = generate(pipe, labels, labels, seed, cfg.flow, len(labels), rt)
        finally:
            net.train(was)
        captions = [class_label(c, [], cfg.model.num_classes) for c in labels]
        return save_grid(images, out / "samples" / f"step_{step:07d}.png", nrow=len(labels), labels=captions)

    return on_step

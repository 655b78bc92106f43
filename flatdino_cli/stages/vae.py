"""`flatdino train-vae`: the laminator on a feature store, or on images encoded on the fly.

Store mode (default) reads fixed features: fast, no encoder at train time, but every epoch sees the
same crop of each image. Image mode (`--images DIR --encoder NAME`) runs the frozen encoder on a
fresh RandomResizedCrop(scale 0.3-1) + flip of every image each epoch, as the paper does: better
augmentation, at the price of one encoder forward per sample per step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flatdino_cli.config import VAEStageConfig
from flatdino_cli.data import (EncoderTransform, FeatureDataset, ImageDataset, Store, collate_images, list_images,
                               split_indices, store_identity)
from flatdino_cli.errors import UserError
from flatdino_cli.models import build_model
from flatdino_cli.models.vae import feature_cosine, vae_loss
from flatdino_cli.runtime import Runtime
from flatdino_cli.train import Task, fit


def _with_store_shape(cfg: VAEStageConfig, store: Store) -> VAEStageConfig:
    """The model's input size comes from the features it is trained on."""
    P, C = store.item_shape
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_patches=P, feature_dim=C))


def feature_splits(features: str | Path, val_count: int, seed: int,
                   batch_size: int = 1) -> tuple[FeatureDataset, FeatureDataset, Store]:
    """Train/val datasets: the store's own val/ split if it has one, else `val_count` held-out rows.

    A store with fewer usable rows than one training batch (plus validation) is a one-line error."""
    store = Store.open(features, expect_kind="features")
    val_dir = Path(features) / "val"
    valid = store.valid_indices()
    own_val = (val_dir / "manifest.json").exists()
    n_val = 0 if own_val else min(val_count, len(valid) // 10)
    if len(valid) - n_val < batch_size:
        raise UserError(f"{features}: {len(valid)} usable rows ({store.count - len(valid)} unreadable), but "
                        f"train.batch_size={batch_size} needs at least {batch_size + n_val} (with {n_val} held out "
                        "for validation); extract more images or lower --batch-size")
    if own_val:
        val_store = Store.open(val_dir, expect_kind="features")
        return FeatureDataset(store), FeatureDataset(val_store), store
    tr, va = split_indices(len(valid), n_val, seed)
    return FeatureDataset(store, valid[tr]), FeatureDataset(store, valid[va]), store


def _val_fn(cfg: VAEStageConfig):
    beta = cfg.beta()

    def run(model: nn.Module, batches, rt: Runtime) -> dict[str, float]:
        tot = {"loss": 0.0, "huber": 0.0, "kl_per_token": 0.0, "cosine": 0.0}
        n = 0
        for feats, _ in batches:
            recon, mu, logvar = model(feats)  # eval mode: z = mu
            loss, st = vae_loss(recon, feats, mu, logvar, beta, "huber", cfg.loss.huber_delta, cfg.loss.free_bits)
            b = feats.shape[0]
            tot["loss"] += loss.item() * b
            tot["huber"] += st["recon"].item() * b
            tot["kl_per_token"] += st["kl_per_token"].item() * b
            tot["cosine"] += feature_cosine(recon, feats).item() * b
            n += b
        return {k: v / max(n, 1) for k, v in tot.items()}

    return run


def train_vae(cfg: VAEStageConfig, out: Path, rt: Runtime, features: str | Path | None = None,
              images: str | Path | None = None, encoder_name: str | None = None, encoder_weights: str | None = None,
              resume: bool = True, new_data: bool = False) -> dict:
    beta = cfg.beta()
    inputs: dict = {}
    if features is not None:
        train_set, val_set, store = feature_splits(features, cfg.val_count, cfg.train.seed,
                                                   cfg.train.batch_size)
        cfg = _with_store_shape(cfg, store)
        inputs["features"] = {"path": str(Path(features).resolve()), "manifest_sha256": store.manifest_hash()}
        inputs["data_path"], inputs["data_identity"] = str(Path(features).resolve()), store_identity(store)
        encode = None
    elif images is not None and encoder_name is not None:
        from flatdino_cli.encoders import load_encoder

        enc = load_encoder(encoder_name, encoder_weights, device=rt.device)
        crop = 256 if enc.spec.image_size == 224 else enc.spec.image_size
        imgs = list_images(images)
        tr, va = split_indices(len(imgs), min(cfg.val_count, len(imgs) // 10), cfg.train.seed)
        aug = EncoderTransform(crop, enc.spec.image_size, "bilinear", augment=True)
        plain = EncoderTransform(crop, enc.spec.image_size, "bilinear")
        train_set = ImageDataset(imgs.subset(tr), aug)
        val_set = ImageDataset(imgs.subset(va), plain)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_patches=enc.num_patches,
                                                                 feature_dim=enc.dim))
        inputs["images"] = {"path": str(Path(images).resolve()), "encoder": encoder_name,
                            "encoder_weights": encoder_weights, "augmentation": aug.spec()}

        @torch.no_grad()
        def encode(batch):
            return enc(batch.images)
    else:
        raise UserError("train-vae: pass --features STORE, or --images DIR with --encoder NAME")

    torch.manual_seed(cfg.train.seed)  # the init follows train.seed, not whatever touched the global RNG first
    model = build_model(cfg)

    def loss_fn(net, batch, info):
        feats = batch[0] if encode is None else encode(batch)
        recon, mu, logvar = net(feats)
        loss, st = vae_loss(recon, feats, mu, logvar, beta, cfg.loss.loss, cfg.loss.huber_delta, cfg.loss.free_bits)
        return loss, st

    val_fn = _val_fn(cfg)
    if encode is not None:
        base_val = val_fn
        val_fn = lambda m, batches, rt_: base_val(m, ((encode(b), None) for b in batches), rt_)  # noqa: E731
    task = Task(model=model, train_set=train_set, loss_fn=loss_fn, config=cfg, val_set=val_set, val_fn=val_fn,
                collate_fn=None if encode is None else collate_images, inputs=inputs)
    return fit(task, cfg.train, out, rt, resume=resume, desc="train-vae", new_data=new_data)


def mean_baseline_cosine(features: str | Path) -> float:
    """Cosine similarity of predicting the training-mean feature map for every image (the floor)."""
    store = Store.open(features, expect_kind="features")
    data = np.asarray(store.data[store.valid_indices()], dtype=np.float32)
    mean = torch.from_numpy(data.mean(0, keepdims=True))
    return feature_cosine(mean.expand(len(data), -1, -1), torch.from_numpy(data)).item()

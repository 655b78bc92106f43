"""`flatdino train-vae`: the laminator on a feature store, or on images encoded on the fly.

Store mode (default) reads fixed features: fast, no encoder at train time, but every epoch sees the
same crop of each image. Image mode (`--images DIR --encoder NAME`) runs the frozen encoder on a
fresh RandomResizedCrop(scale 0.3-1) + flip of every image each epoch, as the paper does: better
augmentation, at the price of one encoder forward per sample per step.

Validation (`--val-features STORE`: ImageNet val, extracted with `--interp bilinear` as the authors
evaluate; else the store's val/ split or a hold-out of train) keeps checkpoints/best by the Huber
reconstruction loss alone, the authors' criterion; beta * KL is logged beside it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from flatdino_cli.config import VAEStageConfig
from flatdino_cli.data import (EncoderTransform, FeatureDataset, ImageDataset, Store, collate_images, list_images,
                               split_indices, store_identity)
from flatdino_cli.encoders import default_crop_size, load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.models import build_model
from flatdino_cli.models.vae import feature_cosine, vae_loss
from flatdino_cli.runtime import Runtime
from flatdino_cli.train import Task, fit


def _with_store_shape(cfg: VAEStageConfig, store: Store) -> VAEStageConfig:
    """The model's input size comes from the features it is trained on."""
    P, C = store.item_shape
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_patches=P, feature_dim=C))


def open_val_features(path: str | Path, item_shape) -> FeatureDataset:
    """A validation feature store (--val-features), checked to hold features of the training shape."""
    store = Store.open(path, expect_kind="features")
    if tuple(store.item_shape) != tuple(item_shape):
        raise UserError(f"--val-features {path}: features of shape {tuple(store.item_shape)}, the training "
                        f"features are {tuple(item_shape)}; extract it with the same --encoder")
    return FeatureDataset(store)


def feature_splits(features: str | Path, val_count: int, seed: int, val_features: str | Path | None = None,
                   batch_size: int = 1) -> tuple[FeatureDataset, FeatureDataset, Store]:
    """Train/val datasets: `val_features` if given (all of the store trains), else the store's own val/
    split if it has one, else `val_count` held-out rows. Training rows of a store with mirror views
    show crop or mirror, drawn per (seed, epoch, row); validation uses the crop.

    A store with fewer usable rows than one training batch (plus validation) is a one-line error."""
    store = Store.open(features, expect_kind="features")
    if val_features is not None:
        return FeatureDataset(store, view_seed=seed), open_val_features(val_features, store.item_shape), store
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
        return FeatureDataset(store, view_seed=seed), FeatureDataset(val_store), store
    tr, va = split_indices(len(valid), n_val, seed)
    return FeatureDataset(store, valid[tr], view_seed=seed), FeatureDataset(store, valid[va]), store


def _val_fn(cfg: VAEStageConfig):
    """Validation with the loss training uses (the preset's reconstruction loss: Huber, or MSE for
    FAE), so "loss", which picks checkpoints/best, ranks checkpoints by what was optimised."""
    beta = cfg.beta()

    def run(model: nn.Module, batches, rt: Runtime) -> dict[str, float]:
        # "loss" (what checkpoints/best follows) is the reconstruction term alone (the authors' criterion),
        # logged again under the loss's own name; + beta * KL beside it
        tot = {"loss": 0.0, cfg.loss.loss: 0.0, "loss_with_kl": 0.0, "kl_per_token": 0.0, "cosine": 0.0}
        n = 0
        for feats, _ in batches:
            recon, mu, logvar = model(feats)  # eval mode: z = mu
            loss, st = vae_loss(recon, feats, mu, logvar, beta, cfg.loss.loss, cfg.loss.huber_delta, cfg.loss.free_bits)
            b = feats.shape[0]
            tot["loss"] += st["recon"].item() * b
            tot[cfg.loss.loss] += st["recon"].item() * b
            tot["loss_with_kl"] += loss.item() * b
            tot["kl_per_token"] += st["kl_per_token"].item() * b
            tot["cosine"] += feature_cosine(recon, feats).item() * b
            n += b
        return {k: v / max(n, 1) for k, v in tot.items()}

    return run


def train_vae(cfg: VAEStageConfig, out: Path, rt: Runtime, features: str | Path | None = None,
              images: str | Path | None = None, encoder_name: str | None = None, encoder_weights: str | None = None,
              resume: bool = True, val_features: str | Path | None = None, new_data: bool = False) -> dict:
    beta = cfg.beta()
    inputs: dict = {}
    if val_features is not None:
        inputs["val_features"] = {"path": str(Path(val_features).resolve()),
                                  "manifest_sha256": Store.open(val_features).manifest_hash()}
    if features is not None:
        train_set, val_set, store = feature_splits(features, cfg.val_count, cfg.train.seed, val_features,
                                                   cfg.train.batch_size)
        cfg = _with_store_shape(cfg, store)
        inputs["features"] = {"path": str(Path(features).resolve()), "manifest_sha256": store.manifest_hash()}
        inputs["data_path"], inputs["data_identity"] = str(Path(features).resolve()), store_identity(store)
        encode = None
    elif images is not None and encoder_name is not None:
        enc = load_encoder(encoder_name, encoder_weights, device=rt.device)
        crop = default_crop_size(enc)
        imgs = list_images(images)
        aug = EncoderTransform(crop, enc.spec.image_size, "bilinear", augment=True)  # the authors' bilinear
        if val_features is not None:  # every image trains; validation reads fixed features
            train_set, val_set = ImageDataset(imgs, aug), open_val_features(val_features, (enc.num_patches, enc.dim))
        else:
            tr, va = split_indices(len(imgs), min(cfg.val_count, len(imgs) // 10), cfg.train.seed)
            train_set = ImageDataset(imgs.subset(tr), aug)
            val_set = ImageDataset(imgs.subset(va), EncoderTransform(crop, enc.spec.image_size, "bilinear"))
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
    if encode is not None and val_features is None:
        base_val = val_fn
        val_fn = lambda m, batches, rt_: base_val(m, ((encode(b), None) for b in batches), rt_)  # noqa: E731
    task = Task(model=model, train_set=train_set, loss_fn=loss_fn, config=cfg, val_set=val_set, val_fn=val_fn,
                collate_fn=None if encode is None else collate_images, inputs=inputs,
                val_collate_fn=default_collate if val_features is not None else None)
    return fit(task, cfg.train, out, rt, resume=resume, desc="train-vae", new_data=new_data)


def mean_baseline_cosine(features: str | Path) -> float:
    """Cosine similarity of predicting the training-mean feature map for every image (the floor)."""
    store = Store.open(features, expect_kind="features")
    data = np.asarray(store.data[store.valid_indices()], dtype=np.float32)
    mean = torch.from_numpy(data.mean(0, keepdims=True))
    return feature_cosine(mean.expand(len(data), -1, -1), torch.from_numpy(data)).item()

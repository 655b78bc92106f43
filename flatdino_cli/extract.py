"""`flatdino extract`: images -> frozen-encoder feature store; feature store -> VAE latent store (mu).

Rows are computed in fixed chunks of `batch_size` consecutive rows and a chunk is flagged done only
after its data is on disk, so a run killed at any moment and rerun recomputes only unfinished chunks,
with the same batch composition, and ends byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from flatdino_cli import preempt
from flatdino_cli.config import ExtractConfig
from flatdino_cli.data import (BadImageWarning, DeviceJpegDataset, EncoderTransform, FeatureDataset, ImageDataset,
                               Store, check_feature_shape, collate_device_jpegs, collate_images, crops_on_device,
                               is_whole_image, list_images, split_indices)
from flatdino_cli.encoders import default_crop_size, load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.lock import FolderLock
from flatdino_cli.rundir import run_inputs
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import Runtime, setup_runtime
from flatdino_cli.utils import disk_full_is_user_error
from flatdino_cli.workspace.paths import store_dir
from flatdino_cli.workspace.settings import setting


def _pending_chunks(store: Store, rows: int) -> list[list[int]]:
    """Chunks [i*rows, (i+1)*rows) that still have a pending row, as index lists."""
    pending = set(store.pending().tolist())
    chunks = []
    for lo in range(0, store.count, rows):
        chunk = list(range(lo, min(lo + rows, store.count)))
        if any(i in pending for i in chunk):
            chunks.append(chunk)
    return chunks


def encoder_identity(encoder, cfg: ExtractConfig) -> dict:
    return {"encoder": cfg.encoder, "weights": getattr(encoder, "weights_id", cfg.encoder_weights),
            "num_patches": encoder.num_patches, "dim": encoder.dim}


def extract_features(source: str | Path, out: str | Path, cfg: ExtractConfig, rt: Runtime,
                     overwrite: bool = False, class_index: str | Path | None = None) -> dict:
    """Encode every image of `source` into a feature store at `out` (+ `out/val` with --val-split)."""
    images = list_images(source, class_index)
    encoder = load_encoder(cfg.encoder, cfg.encoder_weights, device=rt.device)
    if cfg.tf32 and rt.is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    side = cfg.crop_size or default_crop_size(encoder)
    if cfg.preprocess == "knn" and side != encoder.spec.image_size:  # the authors' k-NN: the encoder runs at
        encoder = load_encoder(cfg.encoder, cfg.encoder_weights, device=rt.device, input_size=side)  # that side
    transform = EncoderTransform(side, encoder.spec.image_size, cfg.interp, whole_image=cfg.preprocess != "adm")
    forward = torch.compile(encoder) if cfg.compile else encoder
    parts = [(Path(out), images)]
    if cfg.val_split:
        train_idx, val_idx = split_indices(len(images), cfg.val_split, seed=0)
        parts = [(Path(out), images.subset(train_idx)), (Path(out) / "val", images.subset(val_idx))]
    summary = {"stores": [], "skipped": 0, "images": len(images)}

    def encode(x):  # uint8 crops (B, 3, c, c) -> (B, P, C), or (B, 2, P, C) with the mirror image's features
        feats = forward(transform.finish(x))
        return torch.stack([feats, forward(transform.finish(x.flip(-1)))], 1) if cfg.mirror else feats

    new = not Path(out).exists()
    with FolderLock(out, "store", option="OUT"):  # one writer per store; readers need no lock
        bad = []
        for path, subset in parts:
            bad += _extract_part(path, subset, encoder, encode, transform, cfg, rt, overwrite, summary)
    if summary["skipped"] == summary["images"]:
        if new:  # a store of zeros would pass for data: a folder made by this run goes again
            shutil.rmtree(out, ignore_errors=True)
        left = "nothing was written" if new else f"the store {out} holds no data"
        raise UserError(f"{source}: none of its {summary['images']} images could be read (e.g. "
                        f"{', '.join(repr(p) for p in bad[:3])}); {left}")
    return summary


def _extract_part(path: Path, subset, encoder, encode, transform: EncoderTransform, cfg: ExtractConfig,
                  rt: Runtime, overwrite: bool, summary: dict) -> list[str]:
    """Fill one store (the train part or OUT/val); returns the paths of its unreadable images."""
    store = Store.create(path, "features", (encoder.num_patches, encoder.dim), len(subset), cfg.dtype,
                         identity=encoder_identity(encoder, cfg), preprocessing=transform.spec(),
                         paths=subset.paths, labels=subset.labels,
                         extra={"class_names": subset.class_names, "source": subset.source,
                                "grid": [math.isqrt(encoder.num_patches)] * 2},  # the encoder's square patch grid
                         overwrite=overwrite, views=2 if cfg.mirror else 1)
    if rt.decode_jpeg_on_device and not transform.whole_image:  # JPEG bytes through the loader, decoded +
        # cropped on the device (the ADM crop only; the whole-image resize runs in the loader's workers)
        dataset = DeviceJpegDataset(subset, transform.pixels, strict=cfg.strict)
        collate, prepare = collate_device_jpegs, functools.partial(crops_on_device, crop_size=transform.crop_size,
                                                                    device=rt.device)
    else:  # uint8 crops
        dataset, collate, prepare = ImageDataset(subset, transform.pixels, strict=cfg.strict), collate_images, None
    _fill(store, dataset, encode, cfg, rt, desc=f"extract {path.name}", collate=collate, prepare=prepare, unit="images")
    store.finalize()
    summary["stores"].append(str(path))
    summary["skipped"] += int(store.manifest["skipped_count"])
    store.close()
    return [s["path"] for s in store.manifest["skipped"]]


def _fill(store: Store, dataset: Dataset, encode, cfg: ExtractConfig, rt: Runtime, desc: str,
          collate=collate_images, prepare=None, unit: str = "rows") -> None:
    """Compute all pending chunks of `store` from `dataset` (unreadable rows are marked skipped);
    prepare(batch) finishes a collated batch where the encoder runs (JPEGs decoded on the device).
    SIGTERM / SIGUSR1 stop it after the chunk in flight is on disk, Ctrl-C at once (finished chunks are
    flagged done only once their data is written, so either way a rerun continues), with one line
    saying how many `unit` of the store are done."""
    chunks = _pending_chunks(store, cfg.batch_size)
    if not chunks:
        return
    loader = DataLoader(dataset, batch_sampler=chunks, num_workers=cfg.workers, collate_fn=collate,
                        pin_memory=rt.pin_memory, worker_init_fn=preempt.worker_ignores_stop)
    done_rows = store.count - len(store.pending())
    bar = tqdm(total=store.count, initial=done_rows, desc=desc, unit="img", dynamic_ncols=True)
    t0, n = time.perf_counter(), 0
    with preempt.safe_points("extract", store.count, f"{unit} in {store.path}", done_rows) as reached, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)  # reported below, once per file
        for batch in loader:
            if prepare is not None:
                batch = prepare(batch)
            if batch.images is not None:
                with torch.no_grad():
                    feats = encode(batch.images.to(rt.device, non_blocking=rt.pin_memory))  # fp32, no AMP
                row_bytes = store.dtype.itemsize * store.views * int(np.prod(store.item_shape))
                with disk_full_is_user_error(store.path / "data.npy", row_bytes * (store.count - done_rows - n)):
                    store.write_rows(batch.indices.numpy(), feats.float().cpu().numpy())
                store.mark_done(batch.indices.numpy())
            if len(batch.skipped):
                for i in batch.skipped.tolist():
                    tqdm.write(f"extract: skipped unreadable image {store.paths[i]}")
                if cfg.strict:
                    raise UserError(f"{store.paths[batch.skipped[0]]}: unreadable image (--strict)")
                store.mark_skipped(batch.skipped.numpy())
            n += len(batch.indices) + len(batch.skipped)
            bar.update(len(batch.indices) + len(batch.skipped))
            bar.set_postfix(img_s=f"{n / max(time.perf_counter() - t0, 1e-9):.1f}")
            reached(done_rows + n)
    bar.close()


class _RowDataset(Dataset):
    """Feature-store rows (all their views) as ImageDataset-shaped items (index, tensor, label) for the
    chunked filler."""

    def __init__(self, store: Store):
        self.inner = FeatureDataset(store, np.arange(store.count), all_views=True)
        self.status = store.status

    def __len__(self):
        return len(self.status)

    def __getitem__(self, i):
        if self.status[i] != 1:
            return i, None, -1
        x, y = self.inner[int(np.searchsorted(self.inner.indices, i))]
        return i, x, y


def extract_latents(features: str | Path, vae_run: str | Path, out: str | Path, rt: Runtime,
                    batch_size: int = 256, dtype: str = "float32", overwrite: bool = False,
                    decoded: bool = False, new_data: bool = False) -> dict:
    """Feature store -> latent store (N, T, d) of the VAE posterior mean mu (+ `out/val` if present).

    decoded=True writes the VAE's reconstruction decode(mu) instead: a feature store (N, P, C) that a
    pixel decoder can be fine-tuned on, so it learns the features it will see at sampling time (FAE's
    "pixel fine-tuning", seed 004).

    Features of another encoder than the VAE was trained on are refused (new_data=True accepts them,
    and the latent store records the VAE's training data beside its own source).
    """
    vae_cfg, vae, ckpt_hash = load_run(vae_run, "vae", device=rt.device)
    stores = [(Path(features), Path(out))]
    if (Path(features) / "val" / "manifest.json").exists():
        stores.append((Path(features) / "val", Path(out) / "val"))
    cfg = ExtractConfig(batch_size=batch_size, dtype=dtype)
    for src_path, _ in stores:  # every input is checked before anything is written
        src = Store.open(src_path, expect_kind="features")
        check_feature_shape(src, vae_cfg.model, src_path, encode_only=not decoded)
        check_same_encoder(src, src_path, vae_run, new_data)
    summary = {"stores": []}
    with FolderLock(out, "store", option="OUT"):
        for src_path, dst in stores:
            src = Store.open(src_path, expect_kind="features")
            identity = {"vae_run": str(Path(vae_run).resolve()), "vae_checkpoint_sha256": ckpt_hash,
                        "features": str(src_path.resolve()), "features_manifest_sha256": src.manifest_hash()}
            trained_on = check_same_encoder(src, src_path, vae_run, new_data)
            if new_data:
                identity["vae_training_data"] = trained_on
            kind, shape = "latents", vae_cfg.model.latent_shape
            extra = {**src.manifest.get("extra", {}), "encoder": src.manifest["identity"]}
            if decoded:  # still "features" of the same encoder, as far as a pixel decoder is concerned
                kind, shape = "features", tuple(src.item_shape)
                identity = {**src.manifest["identity"], "vae_reconstruction": identity}
            else:  # train-dit reads the latents' layout from here: FAE keeps the patch grid, FlatDINO has none
                side = math.isqrt(vae_cfg.model.num_patches)
                extra["grid"] = [side, side] if vae_cfg.model.kind == "fae" else None
            dst_store = Store.create(dst, kind, shape, src.count, dtype, identity=identity,
                                     preprocessing=src.manifest["preprocessing"], paths=src.paths,
                                     labels=src.labels.tolist(), extra=extra, overwrite=overwrite, views=src.views)

            def encode(x, views=src.views):  # (B, P, C) or (B, V, P, C): every view is encoded
                with rt.autocast():
                    mu = vae.encode(x.flatten(0, 1) if views > 1 else x)[0]
                    out = (vae.decode(mu) if decoded else mu).float()
                return out.unflatten(0, (x.shape[0], views)) if views > 1 else out

            _fill(dst_store, _RowDataset(src), encode, cfg, rt, desc=f"latents {dst.name}")
            dst_store.finalize()
            summary["stores"].append(str(dst))
            dst_store.close()
    return summary


def check_same_encoder(store: Store, where: Path, vae_run: str | Path, new_data: bool) -> dict | None:
    """The VAE run's recorded training-data identity; UserError if `store` was made by another encoder."""
    # None for a run from before identities were recorded: nothing to compare
    trained_on = run_inputs(vae_run).get("data_identity")
    have, want = store.manifest["identity"], (trained_on or {}).get("encoder")
    if is_whole_image(store.manifest.get("preprocessing")) and isinstance(want, dict):
        # the k-NN protocol's larger input: the same encoder and weights at another patch count
        have, want = ({k: v for k, v in d.items() if k != "num_patches"} for d in (have, want))
    if trained_on and want != have and not new_data:
        raise UserError(f"{where}: made by encoder {store.manifest['identity'].get('encoder')} "
                        f"(weights {store.manifest['identity'].get('weights')}), but {vae_run} was trained on "
                        f"features of {trained_on['encoder'].get('encoder')} (weights "
                        f"{trained_on['encoder'].get('weights')}); pass --new-data to use it anyway (recorded)")
    return trained_on


# ============================================================================ the command's two modes
def run_extract_images(source: Path, out: Path | None, device: str, cfg: ExtractConfig,
                       class_index: Path | None = None, overwrite: bool = False) -> dict:
    """`flatdino extract IMAGES`: a feature store. OUT defaults to the workspace's stores/<source>-<encoder>,
    the encoder weights to the workspace's setting (the tiny encoders have random weights)."""
    out = store_dir("extract", out, f"{source.resolve().name}-{cfg.encoder}")
    if not cfg.encoder.startswith("tiny"):
        weights = setting("encoder-weights", cfg.encoder_weights)
        cfg = dataclasses.replace(cfg, encoder_weights=str(weights) if weights else None)
    rt = setup_runtime(device, "fp32", False)
    return extract_features(source, out, cfg, rt, overwrite=overwrite, class_index=class_index)


def run_extract_latents(features: Path, vae: Path, out: Path | None, device: str, batch_size: int = 64,
                        dtype: str = "float32", decoded: bool = False, overwrite: bool = False,
                        new_data: bool = False) -> dict:
    """`flatdino extract FEATURES --vae RUN`: a latent store (decoded: the VAE's reconstructions, as
    features). OUT defaults to the workspace's stores/<features>-latents-<vae> (or -decoded-<vae>)."""
    made = f"{'decoded' if decoded else 'latents'}-{vae.resolve().name}"
    out = store_dir("extract", out, f"{features.resolve().name}-{made}")
    rt = setup_runtime(device, "fp32", False)
    return extract_latents(features, vae, out, rt, batch_size=batch_size, dtype=dtype, overwrite=overwrite,
                           decoded=decoded, new_data=new_data)

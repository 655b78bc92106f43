"""`flatdino train-decoder`: RAE's pixel decoder, frozen-encoder features -> pixels (INTEROP.md A4).

Each training item is an image's target pixels at the decoder's output size (ADM center crop, resized
to sqrt(num_patches) * patch_size) plus its features: a row of a feature store (`--features`, whose
rows must be these images) or the frozen encoder run on the same crop every step (then with a random
horizontal flip of both). Training only: features get Gaussian noise of sigma = noise_tau * U(0,1)
per sample (or exactly noise_tau with loss.noise_fixed, FAE). Loss = l1 * L1 + lpips * LPIPS + gan * adaptive_weight * G-loss; the GAN term starts at
gan_start_epoch, and from disc_start_epoch the discriminator takes one hinge-loss AdamW step per
optimizer step, after the decoder's (Task.after_step), on the whole batch however it was split into
micro-batches (DiffAugment on both sides; the fakes are this step's reconstructions, detached and
quantised to 8 bits; RAE regenerates them after the decoder's update in eval mode, one more forward).
The generator loss sees the discriminator in eval mode, so its spectral norms are updated only by the
discriminator's own step. The discriminator and its optimizer are Task.aux, so they are checkpointed
and resumed with the decoder. Validation (every epoch) logs L1 (the "loss" that picks checkpoints/best), PSNR on held-out images and the PSNR of
predicting the training mean image, the floor a decoder has to beat.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from flatdino_cli.checkpoint import checkpoint_dir
from flatdino_cli.config import DecoderLossConfig, DecoderStageConfig
from flatdino_cli.data import (BadImage, BadImageWarning, ImageList, Store, adm_center_crop, first_view, list_images,
                               load_rgb, normalize, resize, split_indices, store_identity, to_tensor)
from flatdino_cli.encoders import default_crop_size, load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.losses import adaptive_weight, build_discriminator, diff_augment, generator_loss, hinge_d_loss
from flatdino_cli.metrics import PSNR_CAP, psnr
from flatdino_cli.models import build_model
from flatdino_cli.models.pixel_decoder import load_decoder
from flatdino_cli.runs import decoder_identity, run_inputs
from flatdino_cli.runtime import Runtime
from flatdino_cli.train import Task, fit, lr_at, read_metrics, unwrap
from flatdino_cli.utils import grid_side

VAL_COUNT = 500  # held-out images (at most a tenth of the set) when the store has no val/ split
MEAN_IMAGES = 512  # training images averaged into the mean-image baseline


# ----------------------------------------------------------------------------- data
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


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack (target, x) pairs, dropping unreadable images; None when none is left."""
    good = [it for it in items if it is not None]
    if not good:
        return None
    return torch.stack([t for t, _ in good]), torch.stack([x for _, x in good])


def _key(path: str, root: str) -> str:
    """Path relative to its list's root folder, so a store still matches a moved image folder."""
    return os.path.relpath(path, root) if root and Path(root).is_dir() else path


def _store_rows(images: ImageList, features: str | Path, encoder_name: str | None
                ) -> tuple[list[tuple[Store, list[str], list[int]]], dict]:
    """[(store, image paths, store rows)] for the store (and its val/ split), aligned to `images` by path."""
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


def _subset(items: DecoderItems, idx: np.ndarray, flip: bool = False, seed: int = 0) -> DecoderItems:
    return DecoderItems([items.paths[i] for i in idx], items.crop, items.out_size, items.enc_size, items.interp,
                        items.store_data, None if items.rows is None else [items.rows[i] for i in idx], flip, seed)


def mean_image(items: DecoderItems, count: int = MEAN_IMAGES) -> torch.Tensor:
    """(3, S, S) mean of up to `count` evenly spaced items' targets."""
    idx = np.unique(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int))
    targets = [t for t in (items.target(int(i)) for i in idx) if t is not None]
    if not targets:
        raise UserError("train-decoder: none of the sampled training images could be read")
    return torch.stack(targets).mean(0)


# ----------------------------------------------------------------------------- the task
def _quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images clamped and rounded to 8-bit levels, as fakes saved to disk would be."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def noisy_features(feats: torch.Tensor, L: DecoderLossConfig) -> torch.Tensor:
    """Training-time feature noise: sigma = noise_tau * U(0, 1) per sample (RAE), or exactly noise_tau
    when loss.noise_fixed (FAE's Gaussian embedding decoder)."""
    if L.noise_tau <= 0:
        return feats
    B = feats.shape[0]
    sigma = torch.full((B, 1, 1), L.noise_tau, device=feats.device) if L.noise_fixed else \
        L.noise_tau * torch.rand(B, 1, 1, device=feats.device)
    return feats + sigma * torch.randn_like(feats)


def _check_resume(out: Path, disc_id: dict | None, resume: bool) -> None:
    """A resumed run must keep its discriminator (its state is in the checkpoint)."""
    if not (resume and checkpoint_dir(out) is not None and (Path(out) / "inputs.json").is_file()):
        return
    old = run_inputs(Path(out)).get("discriminator")
    if (old or {}).get("kind") != (disc_id or {}).get("kind"):
        raise UserError(f"{out}: was trained with discriminator {old and old['kind']}, now "
                        f"{disc_id and disc_id['kind']} (loss.gan / --disc); keep them, or start over with --no-resume")


def decoder_task(cfg: DecoderStageConfig, rt: Runtime, images: str | Path, encoder_name: str | None = None,
                 encoder_weights: str | None = None, features: str | Path | None = None, no_lpips: bool = False,
                 lpips_weights: str | Path | None = None, vgg_weights: str | Path | None = None,
                 disc: str = "patch", disc_weights: str | Path | None = None) -> Task:
    """Everything train.fit needs for the pixel decoder; task.config is the resolved config."""
    if no_lpips:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, lpips=0.0))
    L = cfg.loss
    inputs: dict = {"images": str(Path(images).resolve())}
    lpips_fn = None
    if L.lpips > 0:  # fail fast, before any data or encoder is touched
        from flatdino_cli.losses.lpips import load_lpips, resolve_lpips_files

        vgg_path, lin_path = resolve_lpips_files(lpips_weights, vgg_weights)
        lpips_fn = load_lpips(lin_path, vgg_path, rt.device)
        inputs["lpips"] = {"vgg": str(vgg_path), "lin": str(lin_path)}
    discriminator, disc_id = None, None
    if L.gan > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 1)  # same init in every process, independent of the decoder's
            discriminator = build_discriminator(disc, disc_weights).to(rt.device)
        disc_id = {"kind": disc, "weights": str(disc_weights) if disc_weights else None}
        inputs["discriminator"] = disc_id

    imgs = list_images(images)
    encoder = None
    if features is not None:
        parts, inputs["features"] = _store_rows(imgs, features, encoder_name)
        store = parts[0][0]
        P, C = store.item_shape
        crop, enc_size, interp = (store.manifest["preprocessing"][k] for k in ("crop_size", "input_size", "interp"))
        inputs["encoder"] = store.manifest["identity"]
    elif encoder_name is not None:
        encoder = load_encoder(encoder_name, encoder_weights, device=rt.device)
        P, C = encoder.num_patches, encoder.dim
        crop, enc_size, interp = default_crop_size(encoder), encoder.spec.image_size, encoder.spec.interpolation
        inputs["encoder"] = {"encoder": encoder_name, "weights": encoder.weights_id}
    else:
        raise UserError("train-decoder: pass --encoder NAME (features computed on the fly) or --features STORE")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_dim=C, num_patches=P))
    grid_side(P, "train-decoder: the features")
    S = cfg.model.image_size

    if features is not None:
        (store, paths, rows), *val_part = parts
        full = DecoderItems(paths, crop, S, store_data=store.path / "data.npy", rows=rows)
        if val_part:
            vstore, vpaths, vrows = val_part[0]
            train_set, val_set = full, DecoderItems(vpaths, crop, S, store_data=vstore.path / "data.npy", rows=vrows)
        else:
            tr, va = split_indices(len(full), min(VAL_COUNT, len(full) // 10), cfg.train.seed)
            train_set, val_set = _subset(full, tr), _subset(full, va)
    else:
        full = DecoderItems(imgs.paths, crop, S, enc_size=enc_size, interp=interp)
        tr, va = split_indices(len(full), min(VAL_COUNT, len(full) // 10), cfg.train.seed)
        train_set, val_set = _subset(full, tr, flip=True, seed=cfg.train.seed), _subset(full, va)
    if len(val_set) == 0:
        raise UserError(f"--images {images}: {len(full)} images are too few to hold any out for validation (need 10+)")
    mean_img = mean_image(train_set)
    inputs.update(train_images=len(train_set), val_images=len(val_set), image_size=S)
    # what a resume must train on again (train.merge_inputs): the images, their encoder, the store rows
    inputs["data_identity"] = {"kind": "images", "source_hash": imgs.source_hash(), "encoder": inputs["encoder"],
                               "features": store_identity(parts[0][0]) if features is not None else None}

    @torch.no_grad()
    def feats_of(x: torch.Tensor) -> torch.Tensor:
        if encoder is None:
            return x  # (B, P, C) store rows
        with torch.autocast(rt.device.type, enabled=False):  # features exactly as `extract` makes them (fp32)
            return encoder(x)  # (B, P, C)

    d_opt = None
    if discriminator is not None:
        d_opt = rt.adamw([{"params": list(discriminator.parameters()), "weight_decay": 0.0}], cfg.train.lr,
                         cfg.train.betas, cfg.train.eps)

    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (target, recon) micro-batches

    def disc_step(info) -> dict[str, float]:
        """One hinge-loss step of the discriminator on this step's real and (detached, quantised) fake
        images, all micro-batches at once."""
        if not pending:
            return {}
        real = torch.cat([t for t, _ in pending]) * 2 - 1  # [-1, 1]
        fake = torch.cat([r for _, r in pending]) * 2 - 1
        pending.clear()
        for g in d_opt.param_groups:
            g["lr"] = lr_at(info.step, info.total_steps, info.steps_per_epoch, cfg.train)
        with rt.autocast():
            logits_real = discriminator(diff_augment(real))
            logits_fake = discriminator(diff_augment(_quantize(fake)))
            d_loss = hinge_d_loss(logits_real, logits_fake)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        if rt.distributed:  # the discriminator is not DDP-wrapped: average its gradients by hand
            for p in discriminator.parameters():
                if p.grad is not None:
                    p.grad.copy_(rt.all_reduce_mean(p.grad))
        d_opt.step()
        return {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
                "logits_fake": logits_fake.mean().item()}

    def loss_fn(net, batch, info):
        if batch is None:  # every image of the micro-batch was unreadable
            return sum(p.sum() for p in net.parameters()) * 0.0, {}
        target, x = batch  # (B, 3, S, S) in [0, 1]
        recon = net(noisy_features(feats_of(x), L))  # (B, 3, S, S), ~[0, 1]
        l1 = (recon - target).abs().mean()
        rec = L.l1 * l1
        metrics = {"l1": l1.item()}
        if lpips_fn is not None:
            p = lpips_fn(recon * 2 - 1, target * 2 - 1).mean()
            rec = rec + L.lpips * p
            metrics["lpips"] = p.item()
        loss = rec
        epoch = info.step / info.steps_per_epoch
        if discriminator is not None and epoch >= L.disc_start_epoch:
            pending.append((target, recon.detach()))  # disc_step takes them after the decoder's step
        if discriminator is not None and epoch >= L.gan_start_epoch:
            # the generator's backward must not touch D's gradients, nor its forward D's spectral norms
            discriminator.requires_grad_(False).eval()
            g = generator_loss(discriminator(diff_augment(recon * 2 - 1)))
            discriminator.requires_grad_(True).train()
            w = adaptive_weight(rec, g, unwrap(net).pred.weight, L.max_adaptive_weight)
            loss = loss + L.gan * w * g
            metrics.update(g_loss=g.item(), gan_weight=w.item())
        return loss, metrics

    def val_fn(model, batches, rt_):
        tot = {"l1": 0.0, "psnr": 0.0, "psnr_mean_image": 0.0}
        n = 0
        for batch in batches:
            if batch is None:
                continue
            target, x = batch
            recon = model(feats_of(x)).float().clamp(0, 1)
            base = mean_img.to(target.device).expand_as(target)
            tot["l1"] += (recon - target).abs().mean((1, 2, 3)).sum().item()
            tot["psnr"] += psnr(recon, target).clamp_max(PSNR_CAP).sum().item()
            tot["psnr_mean_image"] += psnr(base, target).clamp_max(PSNR_CAP).sum().item()
            n += target.shape[0]
        out = {k: v / max(n, 1) for k, v in tot.items()}
        return {"loss": out["l1"], **out, "psnr_gain": out["psnr"] - out["psnr_mean_image"]}

    torch.manual_seed(cfg.train.seed)  # the init follows train.seed
    model = build_model(cfg)
    aux = {} if discriminator is None else {"disc": discriminator, "disc_opt": d_opt}
    return Task(model=model, train_set=train_set, loss_fn=loss_fn, config=cfg, val_set=val_set, val_fn=val_fn,
                collate_fn=collate, aux=aux, inputs=inputs, after_step=disc_step if discriminator is not None else None)


def train_decoder(cfg: DecoderStageConfig, out: Path, rt: Runtime, images: str | Path, encoder_name: str | None = None,
                  encoder_weights: str | None = None, features: str | Path | None = None, no_lpips: bool = False,
                  lpips_weights: str | Path | None = None, resume: bool = True, vgg_weights: str | Path | None = None,
                  disc: str = "patch", disc_weights: str | Path | None = None, init: str | Path | None = None,
                  new_data: bool = False) -> dict:
    """Train the pixel decoder into run dir `out`; returns fit's summary plus the last validation numbers.
    A resume on other images (or features) than the run's is refused unless new_data says so.
    `init` (a decoder run or weights file of the same architecture) replaces the random init: FAE's pixel
    fine-tuning continues its Gaussian embedding decoder on reconstructed features."""
    disc_id = {"kind": disc} if cfg.loss.gan > 0 else None
    _check_resume(Path(out), disc_id, resume)
    task = decoder_task(cfg, rt, images, encoder_name, encoder_weights, features, no_lpips, lpips_weights,
                        vgg_weights, disc, disc_weights)
    if init is not None:  # a resumed checkpoint, when there is one, still wins (fit loads it after this)

        src = load_decoder(init, cfg.model).state_dict()
        own = task.model.state_dict()
        if {k: v.shape for k, v in src.items()} != {k: v.shape for k, v in own.items()}:
            raise UserError(f"--init {init}: a pixel decoder of another architecture than the preset's "
                            f"(width {cfg.model.width}, depth {cfg.model.depth}, {cfg.model.in_dim}-d features)")
        task.model.load_state_dict(src)
        task.inputs["init"] = decoder_identity(init)
    summary = fit(task, task.config.train, out, rt, resume=resume, desc="train-decoder", new_data=new_data)
    summary["val"] = last_validation(out)
    return summary


def last_validation(run_dir: str | Path) -> dict[str, float]:
    """The last `val/*` row of metrics.jsonl (prefix stripped); {} if there is none."""
    last: dict = {}
    for row in read_metrics(run_dir):
        if any(k.startswith("val/") for k in row):
            last = {k[4:]: v for k, v in row.items() if k.startswith("val/")}
    return last

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from flatdino_cli.checkpoint import checkpoint_dir
from flatdino_cli.config import DecoderLossConfig, DecoderStageConfig
from flatdino_cli.data import list_images, store_identity
from flatdino_cli.data.pairs import DecoderItems, collate_pairs, hold_out, mean_image, store_items, store_rows
from flatdino_cli.encoders import default_crop_size, load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.losses import (adaptive_weight, build_discriminator, diff_augment, discriminator_step, generator_loss,
                                 load_lpips, resolve_lpips_files)
from flatdino_cli.metrics import PSNR_CAP, psnr
from flatdino_cli.models import build_model
from flatdino_cli.models.pixel_decoder import load_decoder
from flatdino_cli.rundir import read_metrics, run_inputs
from flatdino_cli.runs import decoder_identity
from flatdino_cli.runtime import Runtime
from flatdino_cli.steps import lr_at
from flatdino_cli.train import Task, fit, unwrap
from flatdino_cli.utils import grid_side


# ----------------------------------------------------------------------------- the task
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
    recorded = run_inputs(out) if resume and checkpoint_dir(out) is not None else {}
    if not recorded:  # nothing to resume, or a run that recorded no inputs
        return
    old = recorded.get("discriminator")
    if (old or {}).get("kind") != (disc_id or {}).get("kind"):
        raise UserError(f"{out}: was trained with discriminator {old and old['kind']}, now "
                        f"{disc_id and disc_id['kind']} (loss.gan / --disc); keep them, or start over with --no-resume")


@dataclass(frozen=True)
class DecoderSources:
    """What train-decoder learns from and with, beside its stage config (recorded in inputs.json)."""

    images: str | Path  # the pixel targets
    encoder: str | None = None  # frozen encoder run on the fly (with features: only checked against the store)
    encoder_weights: str | None = None
    features: str | Path | None = None  # a feature store of exactly these images, instead of encoding on the fly
    no_lpips: bool = False  # train without LPIPS (loss.lpips = 0)
    lpips_weights: str | Path | None = None
    vgg_weights: str | Path | None = None
    disc: str = "patch"  # patch | dino-s8
    disc_weights: str | Path | None = None
    init: str | Path | None = None  # a decoder of the same architecture to start from


def decoder_task(cfg: DecoderStageConfig, rt: Runtime, src: DecoderSources) -> Task:
    """Everything train.fit needs for the pixel decoder; task.config is the resolved config."""
    if src.no_lpips:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, lpips=0.0))
    inputs: dict = {"images": str(Path(src.images).resolve())}
    lpips_fn, discriminator, disc_opt = None, None, None
    if cfg.loss.lpips > 0:  # fail fast, before any data or encoder is touched
        lpips_fn, inputs["lpips"] = _lpips(src.lpips_weights, src.vgg_weights, rt)
    if cfg.loss.gan > 0:
        discriminator, disc_opt, inputs["discriminator"] = _discriminator(src.disc, src.disc_weights, cfg.train, rt)
    cfg, encoder, train_set, val_set = _datasets(cfg, rt, src.images, src.encoder, src.encoder_weights, src.features,
                                                 inputs)
    pending: list = []  # this step's (target, recon) micro-batches, which the discriminator's step takes
    loss_fn = partial(_loss, L=cfg.loss, encoder=encoder, lpips_fn=lpips_fn, disc=discriminator, pending=pending)
    val_fn = partial(_validate, encoder=encoder, mean_img=mean_image(train_set))
    disc_step = None if discriminator is None else partial(_disc_step, discriminator, disc_opt, pending, cfg.train, rt)
    torch.manual_seed(cfg.train.seed)  # the init follows train.seed
    model = build_model(cfg)
    aux = {} if discriminator is None else {"disc": discriminator, "disc_opt": disc_opt}
    return Task(model=model, train_set=train_set, loss_fn=loss_fn, config=cfg, val_set=val_set, val_fn=val_fn,
                collate_fn=collate_pairs, aux=aux, inputs=inputs, after_step=disc_step)


def _lpips(lpips_weights: str | Path | None, vgg_weights: str | Path | None, rt: Runtime):
    """The LPIPS network and the record of its weight files."""
    vgg_path, lin_path = resolve_lpips_files(lpips_weights, vgg_weights)
    return load_lpips(lin_path, vgg_path, rt.device), {"vgg": str(vgg_path), "lin": str(lin_path)}


def _discriminator(kind: str, weights: str | Path | None, train, rt: Runtime):
    """The discriminator, its AdamW and its record for inputs.json."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed + 1)  # same init in every process, independent of the decoder's
        disc = build_discriminator(kind, weights).to(rt.device)
    opt = rt.adamw([{"params": list(disc.parameters()), "weight_decay": 0.0}], train.lr, train.betas, train.eps)
    return disc, opt, {"kind": kind, "weights": str(weights) if weights else None}


def _datasets(cfg: DecoderStageConfig, rt: Runtime, images: str | Path, encoder_name: str | None,
              encoder_weights: str | None, features: str | Path | None, inputs: dict):
    """(cfg with the features' shape, the encoder (None: the store's rows are the features), train set,
    val set); what they are made of goes into `inputs`."""
    imgs = list_images(images)
    encoder = None
    if features is not None:
        parts, inputs["features"] = store_rows(imgs, features, encoder_name)
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
        full, held = store_items(parts, crop, S)  # held: the store's val/ split, None without one
    else:
        full, held = DecoderItems(imgs.paths, crop, S, enc_size=enc_size, interp=interp), None
    if held is not None:
        train_set, val_set = full, held
    else:  # images encoded on the fly are flipped at random (encoder input and target alike)
        train_set, val_set = hold_out(full, cfg.train.seed, flip=encoder is not None)
    if len(val_set) == 0:
        raise UserError(f"--images {images}: {len(full)} images are too few to hold any out for validation (need 10+)")
    inputs.update(train_images=len(train_set), val_images=len(val_set), image_size=S)
    # what a resume must train on again (rundir.merge_inputs): the images, their encoder, the store rows
    inputs["data_identity"] = {"kind": "images", "source_hash": imgs.source_hash(), "encoder": inputs["encoder"],
                               "features": store_identity(parts[0][0]) if features is not None else None}
    return cfg, encoder, train_set, val_set


@torch.no_grad()
def _features(encoder: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """The decoder's input: the batch's store rows, or the frozen encoder's features of its images."""
    if encoder is None:
        return x  # (B, P, C) store rows
    with torch.autocast(x.device.type, enabled=False):  # features exactly as `extract` makes them (fp32)
        return encoder(x)  # (B, P, C)


def _loss(net, batch, info, *, L: DecoderLossConfig, encoder, lpips_fn, disc, pending: list):
    """L1 (+ LPIPS) (+ the adaptively weighted GAN term from gan_start_epoch); from disc_start_epoch the
    micro-batch's targets and reconstructions wait in `pending` for the discriminator's step."""
    if batch is None:  # every image of the micro-batch was unreadable
        return sum(p.sum() for p in net.parameters()) * 0.0, {}
    target, x = batch  # (B, 3, S, S) in [0, 1]
    recon = net(noisy_features(_features(encoder, x), L))  # (B, 3, S, S), ~[0, 1]
    l1 = (recon - target).abs().mean()
    rec = L.l1 * l1
    metrics = {"l1": l1.item()}
    if lpips_fn is not None:
        p = lpips_fn(recon * 2 - 1, target * 2 - 1).mean()
        rec = rec + L.lpips * p
        metrics["lpips"] = p.item()
    loss = rec
    epoch = info.step / info.steps_per_epoch
    if disc is not None and epoch >= L.disc_start_epoch:
        pending.append((target, recon.detach()))  # _disc_step takes them after the decoder's step
    if disc is not None and epoch >= L.gan_start_epoch:
        # the generator's backward must not touch D's gradients, nor its forward D's spectral norms
        disc.requires_grad_(False).eval()
        g = generator_loss(disc(diff_augment(recon * 2 - 1)))
        disc.requires_grad_(True).train()
        w = adaptive_weight(rec, g, unwrap(net).pred.weight, L.max_adaptive_weight)
        loss = loss + L.gan * w * g
        metrics.update(g_loss=g.item(), gan_weight=w.item())
    return loss, metrics


def _disc_step(disc, opt, pending: list, train, rt: Runtime, info) -> dict[str, float]:
    """The discriminator's step, after the decoder's, on all of this step's micro-batches at once."""
    if not pending:
        return {}
    real = torch.cat([t for t, _ in pending]) * 2 - 1  # [-1, 1]
    fake = torch.cat([r for _, r in pending]) * 2 - 1
    pending.clear()
    for g in opt.param_groups:
        g["lr"] = lr_at(info.step, info.total_steps, info.steps_per_epoch, train)
    # the discriminator is not DDP-wrapped: its gradients are averaged by hand
    return discriminator_step(disc, opt, real, fake, rt.autocast, rt.all_reduce_mean if rt.distributed else None)


def _validate(model, batches, rt: Runtime, *, encoder, mean_img: torch.Tensor) -> dict[str, float]:
    """Held-out L1 (the loss), PSNR, and the PSNR of predicting the training mean image."""
    tot = {"l1": 0.0, "psnr": 0.0, "psnr_mean_image": 0.0}
    n = 0
    for batch in batches:
        if batch is None:
            continue
        target, x = batch
        recon = model(_features(encoder, x)).float().clamp(0, 1)
        base = mean_img.to(target.device).expand_as(target)
        tot["l1"] += (recon - target).abs().mean((1, 2, 3)).sum().item()
        tot["psnr"] += psnr(recon, target).clamp_max(PSNR_CAP).sum().item()
        tot["psnr_mean_image"] += psnr(base, target).clamp_max(PSNR_CAP).sum().item()
        n += target.shape[0]
    out = {k: v / max(n, 1) for k, v in tot.items()}
    return {"loss": out["l1"], **out, "psnr_gain": out["psnr"] - out["psnr_mean_image"]}


def train_decoder(cfg: DecoderStageConfig, out: Path, rt: Runtime, src: DecoderSources, resume: bool = True,
                  new_data: bool = False) -> dict:
    """Train the pixel decoder into run dir `out`; returns fit's summary plus the last validation numbers.
    A resume on other images (or features) than the run's is refused unless new_data says so.
    `src.init` (a decoder run or weights file of the same architecture) replaces the random init: FAE's pixel
    fine-tuning continues its Gaussian embedding decoder on reconstructed features."""
    disc_id = {"kind": src.disc} if cfg.loss.gan > 0 else None
    _check_resume(Path(out), disc_id, resume)
    task = decoder_task(cfg, rt, src)
    if src.init is not None:  # a resumed checkpoint, when there is one, still wins (fit loads it after this)

        start = load_decoder(src.init, cfg.model).state_dict()
        own = task.model.state_dict()
        if {k: v.shape for k, v in start.items()} != {k: v.shape for k, v in own.items()}:
            raise UserError(f"--init {src.init}: a pixel decoder of another architecture than the preset's "
                            f"(width {cfg.model.width}, depth {cfg.model.depth}, {cfg.model.in_dim}-d features)")
        task.model.load_state_dict(start)
        task.inputs["init"] = decoder_identity(src.init)
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

"""train-vae, train-dit, train-decoder: the three stages, with their shared options declared once.

Imports inside the commands keep `flatdino --help` fast.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli.cli.common import Device, ModelOption, Precision, SetOpt

# The options every train-* command takes: name -> (type and option, default). `train_options` adds them
# to a command and hands them to it as one stages.start.TrainRequest.
TRAIN_OPTIONS = {
    "out": (Annotated[Optional[Path], typer.Option("--out", "-o", help=(
        "Run directory (created; resumed if it has a checkpoint). Default: the workspace's runs/<stage>-<preset>, "
        "or a new -N suffix unless that run has the same config (then it is resumed)."))], None),
    "preset": (Annotated[str, typer.Option("--preset", "-p", help="Preset name (`flatdino presets`) or a YAML "
                                                                  "file.")], None),  # the command's own default
    "epochs": (Annotated[Optional[float], typer.Option(help="Overrides train.epochs.")], None),
    "batch_size": (Annotated[Optional[int], typer.Option(help="Global batch (overrides train.batch_size); use "
                                                              "--set train.micro_batch_size=N to accumulate.")], None),
    "seed": (Annotated[Optional[int], typer.Option(help="Training seed (overrides train.seed).")], None),
    "sets": (SetOpt, None),
    "device": (Device, "auto"),
    "precision": (Precision, "auto"),
    "compile": (Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the model (default: on for CUDA, off for CPU).")], None),
    "resume": (Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Resume from the run dir's checkpoint if it has one (default). --no-resume "
                                     "starts over and moves the old run aside to RUN.old-<time> (keeps the last "
                                     "train.keep_old_runs, default 1).")], True),
    "log_to": (Annotated[Optional[list[str]], typer.Option(
        "--log-to", help="Also log to an experiment tracker: tensorboard or wandb (repeatable; metrics.jsonl always; "
                         "needs pip install \"flatdino[track]\"). Example: --log-to tensorboard --log-to wandb "
                         "(offline: WANDB_MODE=offline).")], None),
    "new_data": (Annotated[bool, typer.Option(
        "--new-data", help="Resume on a store of other data than the run was trained on (fine-tuning on new data "
                           "on purpose); both are recorded in inputs.json.")], False),
}


def train_options(preset: str, after: dict[str, str | None] | None = None):
    """Give a train-* command the TRAIN_OPTIONS (--preset defaulting to `preset`), handed to it as its first
    argument `train`, a stages.start.TrainRequest. The signature Typer reads is the shared options in
    TRAIN_OPTIONS' order with the command's own options after --preset, or where `after` puts them (own
    option -> the shared option it and the own options after it follow; None: first): the order each
    command's --help has always had."""

    def wrap(fn):
        # eval_str: the real Annotated types of the own options (this module postpones annotations)
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "train"]
        runs: dict[str | None, list] = {}
        slot = "preset"
        for p in own:
            slot = (after or {}).get(p.name, slot)
            runs.setdefault(slot, []).append(p)
        params = list(runs.get(None, []))
        for name, (annotation, default) in TRAIN_OPTIONS.items():
            default = preset if name == "preset" else default
            params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                         annotation=annotation), *runs.get(name, [])]

        @functools.wraps(fn)
        def command(**options):
            from flatdino_cli.stages.start import TrainRequest  # startup

            return fn(TrainRequest(**{name: options.pop(name) for name in TRAIN_OPTIONS}), **options)

        command.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        command.__annotations__ = {p.name: p.annotation for p in params}  # what typer reads, resolved
        return command

    return wrap


@train_options(preset="vae-32x128")
def train_vae(
    train,
    features: Annotated[Optional[Path], typer.Option(help="Feature store from `flatdino extract` (default: the "
                                                          "workspace's newest, unless --images).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Train on images encoded on the fly (with --encoder), "
                                                        "re-augmented every epoch as in the paper.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder for --images mode.")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for --encoder.")] = None,
    val_features: Annotated[Optional[Path], typer.Option(help="Validation feature store (ImageNet val, "
                                                              "`extract --interp bilinear`) that picks "
                                                              "checkpoints/best.")] = None,
):
    """Train the FlatDINO laminator (beta-VAE) on DINOv2 features.

    beta defaults to 1e-6 * 512 / (T * d); validation logs the Huber loss, Huber + beta * KL, KL per
    token and the mean cosine similarity of reconstructed features, and keeps checkpoints/best by the
    validation Huber loss alone (the authors' criterion).

    SIGTERM / SIGUSR1 (cluster preemption): saves checkpoints/latest at the step reached and exits with
    code 75; rerun the same command to continue.

    \b
    Multi-GPU (multi-node: add torchrun's --nnodes/--node-rank/--rdzv-endpoint):
      torchrun --nproc-per-node 8 -m flatdino_cli.cli train-vae ...

    \b
    Examples:
      flatdino train-vae --preset vae-32x128 --features stores/in1k   (-> runs/vae-vae-32x128)
      flatdino train-vae --preset vae-32x128 --images imagenet/train --encoder dinov2-b-reg4 \\
        --val-features stores/in1k-val-bilinear --out runs/vae
    """
    from flatdino_cli.stages.start import start_training  # startup
    from flatdino_cli.stages.vae import train_vae as run  # startup
    from flatdino_cli.workspace.paths import note_run  # startup
    from flatdino_cli.workspace.pick import pick_features  # startup
    from flatdino_cli.workspace.settings import setting  # startup

    def pick(cfg):
        picked = features if features is not None or images is not None else pick_features("train-vae")
        return picked, setting("encoder-weights", encoder_weights) if images is not None else encoder_weights

    cfg, (features, encoder_weights), out, rt = start_training(train, "train-vae", "vae", "a vae-* preset", pick)
    summary = run(cfg, out, rt, features=features, images=images, encoder_name=encoder,
                  encoder_weights=str(encoder_weights) if encoder_weights else None, resume=train.resume,
                  val_features=val_features, new_data=train.new_data)
    if rt.is_main:
        note_run(out, "vae", train.preset)
        best = summary["best_val"]
        val = (f"best val {'Huber' if cfg.loss.loss == 'huber' else cfg.loss.loss.upper()} {best:.4g}"
               if best != float("inf") else "no validation yet (it runs at each epoch end; train longer)")
        typer.echo(f"train-vae: {summary['step']} steps, {val} -> {out}")


@train_options(preset="xl-32x128", after={"latents": "out", "compute_stats": "batch_size"})
def train_dit(
    train,
    latents: Annotated[Optional[Path], typer.Option(help="Latent store (`flatdino extract --vae`), or a feature "
                                                         "store for the rae-* baseline presets (default: the "
                                                         "workspace's newest that fits the preset).")] = None,
    compute_stats: Annotated[bool, typer.Option(
        "--compute-stats", help="(RAE mode) recompute the per-position mean/var of the store into RUN/stats.pt "
                                "(RAE's format); otherwise computed once when missing.")] = False,
    vae: ModelOption(help="VAE run, to write sample grids during training.") = None,
    decoder: ModelOption(help="Pixel decoder (run dir or RAE model.pt) for sample grids.") = None,
):
    """Train the LightningDiT flow-matching generator on latents (the paper's recipe by default).

    AdamW (0.9, 0.95), wd 1e-4, clip 1.0, constant lr 2e-4, EMA 0.9995, global batch 1024 (set
    train.micro_batch_size to accumulate on small GPUs). Logs the loss per t-bucket to metrics.jsonl;
    with --vae and --decoder (and --set sample_every=N) writes a small sample grid every N steps.

    SIGTERM / SIGUSR1 (cluster preemption): saves checkpoints/latest at the step reached and exits with
    code 75; rerun the same command to continue.

    \b
    Multi-GPU:
      torchrun --nproc-per-node 8 -m flatdino_cli.cli train-dit ...

    \b
    Example:
      flatdino train-dit --preset xl-32x128   (the newest fitting latents -> runs/dit-xl-32x128)
    """
    from flatdino_cli.data import Store, with_store_shape  # startup
    from flatdino_cli.stages.dit import train_dit as run  # startup
    from flatdino_cli.stages.start import start_training  # startup
    from flatdino_cli.workspace.paths import note_run  # startup
    from flatdino_cli.workspace.pick import pick_latents  # startup

    cfg, latents, out, rt = start_training(
        train, "train-dit", "dit", "a DiT preset (xl-32x128, ...)",
        lambda cfg: latents if latents is not None else pick_latents("train-dit", cfg),
        lambda cfg, store: with_store_shape(cfg, Store.open(store), store))
    on_step = None
    if cfg.sample_every and decoder is not None and (vae is not None or cfg.model.grid) and rt.is_main:
        from flatdino_cli.stages.dit import training_grid_hook  # startup

        on_step = training_grid_hook(cfg, out, vae, decoder, rt)
    summary = run(cfg, out, rt, latents, resume=train.resume, recompute_stats=compute_stats, on_step=on_step,
                  new_data=train.new_data)
    if rt.is_main:
        note_run(out, "dit", train.preset)
        typer.echo(f"train-dit: {summary['step']} steps -> {out}")


@train_options(preset="decoder-xl", after={"images": None, "encoder": "preset"})
def train_decoder(
    train,
    images: Annotated[Path, typer.Option(help="Training images (ImageFolder tree or flat folder): the pixel targets.")],
    encoder: Annotated[Optional[str], typer.Option(help="Frozen encoder run on the fly: dinov2-b-reg4 or tiny "
                                                        "(with --features: only checked against the store).")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for --encoder.")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Feature store of exactly these images (`flatdino "
                                                          "extract`), instead of encoding on the fly.")] = None,
    no_lpips: Annotated[bool, typer.Option("--no-lpips", help="Train without LPIPS (sets loss.lpips=0).")] = False,
    lpips_weights: Annotated[Optional[Path], typer.Option(help="LPIPS v0.1 linear layers (lpips' vgg.pth); "
                                                               "default: the pip lpips package's copy.")] = None,
    vgg_weights: Annotated[Optional[Path], typer.Option(help="torchvision VGG16 weights (vgg16-397923af.pth); "
                                                             "default: torch.hub.get_dir()/checkpoints/.")] = None,
    disc: Annotated[str, typer.Option(help="GAN discriminator: patch (trainable PatchGAN, no weights) or dino-s8 "
                                           "(RAE's frozen DINO ViT-S/8 + trainable heads).")] = "patch",
    disc_weights: Annotated[Optional[Path], typer.Option(help="DINO ViT-S/8 weights for --disc dino-s8 (default: "
                                                              "the HF cache of timm/vit_small_patch8_224.dino).")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from this decoder (run or weights file, same "
                                                      "architecture), e.g. FAE's pixel fine-tuning.")] = None,
):
    """Train RAE's pixel decoder (features -> pixels): L1 + LPIPS + adaptive-weight GAN, noise-augmented.

    Features get noise sigma = noise_tau * U(0,1) during training; the discriminator starts at
    loss.disc_start_epoch, the GAN term at loss.gan_start_epoch. No weights are ever downloaded:
    LPIPS needs local VGG16 + LPIPS files (or --no-lpips). Validation logs PSNR on held-out images
    next to the PSNR of the mean training image.

    SIGTERM / SIGUSR1 (cluster preemption): saves checkpoints/latest at the step reached and exits with
    code 75; rerun the same command to continue.

    \b
    Examples:
      flatdino train-decoder --preset decoder-xl --images imagenet/train --features stores/in1k \\
          --lpips-weights vgg.pth --out runs/decoder-xl
      flatdino train-decoder --preset tiny-decoder --images runs/toy --encoder tiny --out runs/toy-decoder
    """
    from flatdino_cli.stages.decoder import DecoderSources, train_decoder as run  # startup
    from flatdino_cli.stages.start import start_training  # startup
    from flatdino_cli.workspace.paths import note_run  # startup
    from flatdino_cli.workspace.settings import setting  # startup

    cfg, encoder_weights, out, rt = start_training(
        train, "train-decoder", "decoder", "decoder-xl, tiny-decoder, ...",
        lambda cfg: setting("encoder-weights", encoder_weights) if encoder is not None and not encoder.startswith("tiny") else encoder_weights)
    src = DecoderSources(images, encoder, encoder_weights=str(encoder_weights) if encoder_weights else None,
                         features=features, no_lpips=no_lpips, lpips_weights=lpips_weights, vgg_weights=vgg_weights,
                         disc=disc, disc_weights=disc_weights, init=init)
    summary = run(cfg, out, rt, src, resume=train.resume, new_data=train.new_data)
    if rt.is_main:
        note_run(out, "decoder", train.preset)
        v = summary["val"]
        psnr = (f", val PSNR {v['psnr']:.2f} dB vs mean image {v['psnr_mean_image']:.2f} dB" if "psnr" in v else "")
        typer.echo(f"train-decoder: {summary['step']} steps{psnr} -> {out}")

"""toy-data, extract: images in, stores out.

Imports inside the commands keep `flatdino --help` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli.cli.common import Device, ModelOption
from flatdino_cli.errors import UserError


def toy_data(
    out: Annotated[Path, typer.Argument(help="Output folder (an ImageFolder tree, one folder per class).")],
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 200,
    size: Annotated[int, typer.Option(help="Image side in pixels (the tiny encoder expects 48).")] = 48,
    seed: Annotated[int, typer.Option(help="Generation seed; same seed, same bytes.")] = 0,
):
    """Write the embedded procedural toy dataset (10+ shape x colour classes) as an ImageFolder tree.

    \b
    Example:
      flatdino toy-data runs/toy --per-class 200
    """
    from flatdino_cli.toydata import write_toy_dataset  # startup

    summary = write_toy_dataset(out, per_class=per_class, size=size, seed=seed)
    typer.echo(f"toy-data: {summary['count']} images in {summary['classes']} classes -> {out}")


def extract(
    source: Annotated[Path, typer.Argument(help="Images (ImageFolder tree, flat folder or `path label` list), "
                                                "or with --vae a FEATURE STORE.")],
    out: Annotated[Optional[Path], typer.Argument(help="Output store directory (default: the workspace's "
                                                       "stores/<source>-<encoder>, or stores/<source>-latents-<vae>).")] = None,
    encoder: Annotated[str, typer.Option(help="dinov2-b-reg4 (the paper's encoder), dinov2-s-reg4 (RAE's DiT-XL "
                                              "anchor), dinov2-g-reg4 (FAE) or tiny (random weights, for tests "
                                              "and the CPU quickstart).")] = "dinov2-b-reg4",
    encoder_weights: Annotated[Optional[Path], typer.Option(
        help="Local DINOv2 weights (.safetensors/.pth, timm or Hugging Face key names) instead of the HF cache.")] = None,
    vae: ModelOption(help="A train-vae run: turn the feature store SOURCE into a latent store of the posterior "
                     "mean mu.") = None,
    decoded: Annotated[bool, typer.Option("--decoded", help="With --vae: store the VAE's reconstruction "
                                          "decode(mu) as features (to fine-tune a pixel decoder on).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per encoder forward.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for decoding images.")] = 0,
    val_split: Annotated[int, typer.Option(help="Hold out N images (deterministic) into OUT/val.")] = 0,
    mirror: Annotated[bool, typer.Option(help="Also encode each crop's mirror image (a second view per row: "
                                              "train-dit then draws crop or mirror every epoch).")] = False,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 (default for features) or float32.")] = "",
    preprocess: Annotated[str, typer.Option(help="adm: the ADM centre crop, resized to the encoder input (the "
                                                 "generator and VAE pipelines); whole: the authors' evaluation "
                                                 "transform, the whole image resized to CROP_SIZE (no crop), then "
                                                 "bilinear to the encoder input; knn: the same, encoded at "
                                                 "CROP_SIZE itself (their k-NN: 256 px, 324 DINOv2 patches).")] = "adm",
    interp: Annotated[str, typer.Option(help="adm: resize to the encoder input, bicubic (generator pipeline, "
                                             "default) or bilinear (VAE evaluation); whole/knn: area (cv2 "
                                             "INTER_AREA, default) or bilinear (INTER_LINEAR, for images "
                                             "smaller than CROP_SIZE such as CIFAR).")] = "",
    crop_size: Annotated[Optional[int], typer.Option(help="ADM center-crop size, or the whole-image side "
                                                          "(default 256 for DINOv2-B).")] = None,
    class_index: Annotated[Optional[Path], typer.Option(help="JSON/txt mapping ImageNet synset folders to 0-999.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store that was made differently.")] = False,
    new_data: Annotated[bool, typer.Option("--new-data", help="With --vae: accept features of another encoder "
                                                              "than the VAE was trained on (recorded).")] = False,
    device: Device = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the encoder.")] = False,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 matmuls on CUDA (faster, slightly less exact).")] = False,
):
    """Images -> frozen DINOv2 features (N, 256, 768) in a resumable store; with --vae, features -> latents.

    Killed at any moment and rerun, it resumes without recomputing finished rows and ends
    byte-identical to an uninterrupted run. Unreadable images are skipped, named, and counted in the
    manifest (--strict fails instead). SIGTERM / SIGUSR1 stop it after the chunk in flight is saved
    (exit code 75), saying how many images are done.

    \b
    Examples:
      flatdino extract imagenet/train stores/in1k --encoder dinov2-b-reg4 --batch-size 256 --workers 8
      flatdino extract runs/toy runs/toy-feats --encoder tiny --val-split 100
      flatdino extract imagenet/val stores/knn-val --preprocess knn   (Table 10's k-NN input: 324 patches)
      flatdino extract stores/in1k --vae runs/vae-vae-32x128     (-> stores/in1k-latents-vae-vae-32x128)
    """
    from flatdino_cli.config import ExtractConfig  # startup
    from flatdino_cli.extract import run_extract_images, run_extract_latents  # startup

    if vae is not None:
        summary = run_extract_latents(source, vae, out, device, batch_size=batch_size, dtype=dtype or "float32",
                                      decoded=decoded, overwrite=overwrite, new_data=new_data)
    elif decoded:
        raise UserError("--decoded goes with --vae RUN")
    else:
        cfg = ExtractConfig(encoder=encoder, encoder_weights=str(encoder_weights) if encoder_weights else None,
                            preprocess=preprocess, crop_size=crop_size, interp=interp or None,
                            dtype=dtype or "float16", batch_size=batch_size, workers=workers,
                            val_split=val_split, mirror=mirror, strict=strict, compile=compile, tf32=tf32)
        summary = run_extract_images(source, out, device, cfg, class_index=class_index, overwrite=overwrite)
    if vae is not None:
        typer.echo(f"extract: {'decoded features' if decoded else 'latents'} -> {', '.join(summary['stores'])}")
    else:
        typer.echo(f"extract: {summary['images']} images -> {', '.join(summary['stores'])} "
                   f"({summary['skipped']} unreadable skipped)")

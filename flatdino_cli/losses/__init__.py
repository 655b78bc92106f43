"""Pixel-space losses of the decoder recipe: LPIPS-VGG16, discriminators, hinge/generator GAN terms,
the adaptive GAN weight and DiffAugment (INTEROP.md A4)."""

from flatdino_cli.losses.discriminator import DISCRIMINATORS, PatchDiscriminator, ViTDiscriminator, build_discriminator
from flatdino_cli.losses.gan import adaptive_weight, diff_augment, discriminator_step, generator_loss, hinge_d_loss
from flatdino_cli.losses.lpips import LPIPS, load_lpips, resolve_lpips_files

__all__ = ["DISCRIMINATORS", "PatchDiscriminator", "ViTDiscriminator", "build_discriminator", "adaptive_weight",
           "diff_augment", "discriminator_step", "generator_loss", "hinge_d_loss", "LPIPS", "load_lpips",
           "resolve_lpips_files"]

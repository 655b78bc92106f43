"""Model registry: build the network a stage config describes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flatdino_cli.models.dit import DiT
from flatdino_cli.models.pixel_decoder import PixelDecoder
from flatdino_cli.models.vae import build_vae


def build_model(cfg: Any) -> nn.Module:
    """The trainable network of a stage config (VAE, DiT or pixel decoder)."""
    if cfg.stage == "vae":
        return build_vae(cfg.model)
    if cfg.stage == "dit":
        return DiT(cfg.model)
    if cfg.stage == "decoder":
        return PixelDecoder(cfg.model)
    raise ValueError(f"unknown stage {cfg.stage}")


def count_parameters(cfg: Any) -> dict[str, int]:
    """Parameter counts per part, built on the meta device (no memory, instant even for XL)."""
    with torch.device("meta"):
        model = build_model(cfg)
    parts = {"total": sum(p.numel() for p in model.parameters())}
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            parts[name] = n
    return parts

"""The sampling pipeline, from latents to pictures: a DiT with its decoders (`Pipeline`), built by load.py,
run by generate.py; options.py turns the command line's sampling options into flow settings.

One decode path serves FlatDINO and the RAE baseline:

    DiT sample x (B, N, d) --[stats: x*std+mean]--> --[VAE decoder]--> features (B, P, C)
        --pixel decoder--> (B, 3, S, S) --clip [0, 1], x255, ROUND--> uint8 (B, S, S, 3)

FlatDINO: N x d = 32 x 128 raw VAE means (no stats), turned into 256 x 768 features by the VAE decoder.
RAE mode (a DiT with model.grid): N x d = 256 x 768 normalised features, de-normalised with
RUN/stats.pt, no VAE. Either way the pixel decoder consumes raw (LN-without-affine) DINOv2 features.
Sample sets on disk: sample.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flatdino_cli.config import DiTStageConfig
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.viz import to_uint8


@dataclass
class Pipeline:
    """A DiT with what turns its samples into pixels (see the module docstring)."""

    cfg: DiTStageConfig
    dit: nn.Module
    decoder: nn.Module | None  # PixelDecoder (None: features only, e.g. for evaluate)
    vae: nn.Module | None = None
    stats: nn.Module | None = None  # models.stats.LatentStats
    identity: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    guide: nn.Module | None = None  # AutoGuidance's weaker DiT: v = v_guide + w (v_main - v_guide)
    compiled: tuple | None = field(default=None, repr=False)  # (dit, its compiled wrapper): generate.sampling_dit

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.cfg.model.tokens, self.cfg.model.in_dim

    @property
    def image_size(self) -> int:
        return self.decoder.cfg.image_size

    @torch.no_grad()
    def features(self, x: torch.Tensor, rt: Runtime = CPU) -> torch.Tensor:
        """DiT samples (B, N, d) -> encoder features (B, P, C) float32: de-normalised (RAE), VAE-decoded."""
        x = x.float()
        if self.stats is not None:
            x = self.stats.denormalize(x)
        with rt.autocast():
            feats = self.vae.decode(x) if self.vae is not None else x  # (B, P, C)
        return feats.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor, rt: Runtime = CPU) -> np.ndarray:
        """DiT samples (B, N, d) -> uint8 images (B, S, S, 3)."""
        feats = self.features(x, rt)
        with rt.autocast():
            pixels = self.decoder(feats)  # (B, 3, S, S)
        return to_uint8(pixels)

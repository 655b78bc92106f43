"""The laminator: FlatDINO's beta-VAE from a patch-feature grid to T ordered latent tokens.

Shapes (defaults of vae-32x128 on DINOv2-B/14 at 224 px):
    features (B, P=256, C=768) --encode--> mu, logvar (B, T=32, d=128) --decode--> (B, 256, 768)

Encoder: bias-free Linear C -> W_e on the patches (no positional embedding, as in the authors'
code), T learned query tokens prepended, pre-LN ViT blocks (QK-norm, SwiGLU), final LN, the T query
outputs -> bias-free Linear -> 2d, split [mu | logvar]. Decoder: bias-free Linear d -> W_d on the
latents + a learned position table, P learned patch queries prepended, one self-attention stack over
P + T tokens, the P query outputs -> final LN -> bias-free Linear -> C. Token k of the latent is
the k-th query's output, so "token k" means the same thing everywhere (ablations, truncation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flatdino_cli.config import VAEModelConfig
from flatdino_cli.models.fae import FAE
from flatdino_cli.nn import Block, group_cells, ungroup_cells


def _proj(i: int, o: int) -> nn.Module:
    return nn.Identity() if i == o else nn.Linear(i, o, bias=False)


def _stack(width: int, depth: int, heads: int, cfg: VAEModelConfig) -> nn.ModuleList:
    return nn.ModuleList(
        Block(width, heads, int(cfg.mlp_ratio * width), norm="layernorm", norm_eps=1e-6, mlp="swiglu",
              qkv_bias=True, qk_norm="layernorm" if cfg.qk_norm else None)
        for _ in range(depth))


class FlatEncoder(nn.Module):
    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        self.tokens, self.group = cfg.tokens, cfg.patch_group
        self.grid = (math.isqrt(cfg.num_patches),) * 2
        self.in_proj = _proj(cfg.patch_group ** 2 * cfg.feature_dim, cfg.enc_width)
        self.queries = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.enc_width))
        self.blocks = _stack(cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg)
        self.norm = nn.LayerNorm(cfg.enc_width, eps=1e-6)
        self.out_proj = nn.Linear(cfg.enc_width, 2 * cfg.latent_dim, bias=False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.in_proj(group_cells(feats, self.grid, self.group))  # (B, P / g^2, W)
        x = torch.cat([self.queries.expand(x.shape[0], -1, -1), x], dim=1)  # (B, T + P / g^2, W)
        for blk in self.blocks:
            x = blk(x)
        mu, logvar = self.out_proj(self.norm(x[:, : self.tokens])).float().chunk(2, dim=-1)  # (B, T, d) x2
        return mu, logvar


class FlatDecoder(nn.Module):
    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        self.group, self.grid = cfg.patch_group, (math.isqrt(cfg.num_patches),) * 2
        self.num_queries = cfg.num_patches // cfg.patch_group ** 2
        self.in_proj = nn.Linear(cfg.latent_dim, cfg.dec_width, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dec_width))
        self.queries = nn.Parameter(torch.zeros(1, self.num_queries, cfg.dec_width))
        self.blocks = _stack(cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg)
        self.norm = nn.LayerNorm(cfg.dec_width, eps=1e-6)
        self.out_proj = _proj(cfg.dec_width, cfg.patch_group ** 2 * cfg.feature_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(z) + self.pos  # (B, T, W)
        x = torch.cat([self.queries.expand(x.shape[0], -1, -1), x], dim=1)  # (B, P / g^2 + T, W)
        for blk in self.blocks:
            x = blk(x)
        x = self.out_proj(self.norm(x[:, : self.num_queries]))  # (B, P / g^2, g^2 C)
        return ungroup_cells(x, self.grid, self.group).float()  # (B, P, C)


class FlatVAE(nn.Module):
    """encode(features) -> (mu, logvar); decode(z) -> features; forward samples z ~ q(z|x) in training."""

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FlatEncoder(cfg)
        self.decoder = FlatDecoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.encoder.queries, self.decoder.queries, self.decoder.pos):
            nn.init.trunc_normal_(p, std=0.02)

    def encode(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, P, C) -> mu, logvar (B, T, d), float32."""
        return self.encoder(feats)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, d) -> features (B, P, C), float32."""
        return self.decoder(z)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(feats)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar


def build_vae(cfg: VAEModelConfig) -> nn.Module:
    if cfg.kind == "fae":
        return FAE(cfg)
    return FlatVAE(cfg)


# ----------------------------------------------------------------------------- loss
def kl_per_element(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent number."""
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
             kind: str = "huber", delta: float = 1.0, free_bits: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reconstruction (Huber or MSE, mean over elements) + beta * KL (sum over T*d, mean over batch)."""
    target = target.float()
    rec = F.huber_loss(recon, target, delta=delta) if kind == "huber" else F.mse_loss(recon, target)
    kl_el = kl_per_element(mu, logvar)
    kl = kl_el.clamp_min(free_bits).flatten(1).sum(1).mean()
    stats = {"recon": rec.detach(), "kl_per_token": kl_el.detach().sum(-1).mean()}
    return rec + beta * kl, stats


def feature_cosine(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over patches and batch of the cosine similarity of reconstructed vs true features."""
    return F.cosine_similarity(recon.float(), target.float(), dim=-1).mean()

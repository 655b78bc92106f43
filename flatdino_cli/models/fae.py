"""FAE (seed 004, "One Layer Is Enough"): a per-patch feature autoencoder, the second laminator.

Shapes (fae-16x16x32 on DINOv2-B/14 at 224 px):
    features (B, P=256, C=768) --encode--> mu, logvar (B, 256, d=32) --decode--> (B, 256, 768)

Encoder: ONE self-attention layer, pre-RMSNorm, attending in a wider space than its input (the
paper: 24 heads x 256 = 6144 for a 1536-d backbone, i.e. 4C; here enc_width x enc_heads) with 2-D
RoPE and a residual connection, then a Linear C -> 2d per patch, split [mu | logvar]. The latent
keeps the patch grid: one d-dim latent per patch. Decoder: Linear d -> W, 6 pre-RMSNorm blocks with
2-D RoPE and SwiGLU (hidden 2/3 * mlp_ratio * W, which gives the paper's 170M for W = 1536), final
RMSNorm, Linear W -> C when W != C. Loss: L2 + beta KL (loss.loss = mse).

The paper's encoder counts 38.17M parameters for C = 1536; this layout counts 37.9M (a pre-norm,
fused qkv with bias, output projection, latent head); the paper does not spell out the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from flatdino_cli.config import VAEModelConfig
from flatdino_cli.nn import Attention, Block, RMSNorm, rope_2d
from flatdino_cli.utils import grid_side


class FAE(nn.Module):
    """encode(features) -> (mu, logvar) per patch; decode(z) -> features; forward samples in training."""

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        self.cfg = cfg
        C, W, side = cfg.feature_dim, cfg.dec_width, grid_side(cfg.num_patches, "FAE: model.num_patches")
        self.enc_norm = RMSNorm(C, eps=1e-6)
        self.enc_attn = Attention(C, cfg.enc_heads, qkv_bias=True, inner_dim=cfg.enc_width)
        self.enc_out = nn.Linear(C, 2 * cfg.latent_dim)
        self.dec_in = nn.Linear(cfg.latent_dim, W)
        hidden = int(2 / 3 * cfg.mlp_ratio * W)
        self.dec_blocks = nn.ModuleList(Block(W, cfg.dec_heads, hidden, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                                              qkv_bias=True) for _ in range(cfg.dec_depth))
        self.dec_norm = RMSNorm(W, eps=1e-6)
        self.dec_out = nn.Identity() if W == C else nn.Linear(W, C)
        for name, head_dim in (("enc", cfg.enc_width // cfg.enc_heads), ("dec", W // cfg.dec_heads)):
            cos, sin = rope_2d(side, side, head_dim)
            self.register_buffer(f"{name}_rope_cos", cos, persistent=False)
            self.register_buffer(f"{name}_rope_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, P, C) -> mu, logvar (B, P, d), float32."""
        x = feats + self.enc_attn(self.enc_norm(feats), (self.enc_rope_cos, self.enc_rope_sin))  # (B, P, C)
        mu, logvar = self.enc_out(x).float().chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, P, d) -> features (B, P, C), float32."""
        x = self.dec_in(z)  # (B, P, W)
        rope = (self.dec_rope_cos, self.dec_rope_sin)
        for blk in self.dec_blocks:
            x = blk(x, rope)
        return self.dec_out(self.dec_norm(x)).float()

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(feats)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar

"""LightningDiT velocity model over a token sequence, with RAE's optional DDT head (DiT-DH).

    forward(x (B, N, d), t (B,) in [0, 1], y (B,) long) -> v (B, N, d)

N = T latent tokens of width d (FlatDINO, 1-D positions) or an h x w grid: the 16x16 grid of 768-d
DINOv2 features (RAE baseline) or of FAE latents, 2-D positions; model.patch = p > 1 groups p x p
grid cells into one token (DiT-XL/2 style), so the transformer runs over N / p^2 tokens. Trunk: Linear d -> W, + fixed sin-cos (or learned)
positions, adaLN-Zero blocks (RMSNorm, SwiGLU, RoPE over the full head dim), conditioned on
c = t_emb + y_emb (Gaussian-Fourier time, label table with a null class for CFG).
DiT-DH (INTEROP.md B5): the trunk is conditioned on silu(t_emb + y_emb); its output s is mixed with
t_emb, SiLU'd and projected to the head width, then a wide shallow head reads a fresh embedding of
the noisy input, modulated per token by s, with its own RoPE and no absolute positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatdino_cli.config import DiTModelConfig
from flatdino_cli.nn import (AdaLNBlock, FinalLayer, GaussianFourierEmbedder, LabelEmbedder, group_cells, rope_1d,
                             rope_2d, sincos_1d, sincos_2d, ungroup_cells)


def _rope(cfg: DiTModelConfig, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_2d(*cfg.seq_grid, head_dim) if cfg.grid else rope_1d(cfg.tokens, head_dim)


class DiT(nn.Module):
    def __init__(self, cfg: DiTModelConfig):
        super().__init__()
        self.cfg = cfg
        W, N, p = cfg.width, cfg.seq_len, cfg.patch
        self.null_class = cfg.num_classes
        token_dim = cfg.in_dim * p * p  # a token is a p x p patch of grid cells (p = 1: one cell)
        self.x_embedder = nn.Linear(token_dim, W)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, N, W))
        else:  # fixed table, stored with the checkpoint like RAE's
            table = sincos_2d(*cfg.seq_grid, W) if cfg.grid else sincos_1d(N, W)
            self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)
        self.t_embedder = GaussianFourierEmbedder(W)
        self.y_embedder = LabelEmbedder(cfg.num_classes, W, cfg.class_dropout)
        self.blocks = nn.ModuleList(AdaLNBlock(W, cfg.heads, cfg.mlp_hidden, qk_norm="rmsnorm" if cfg.qk_norm else None)
                                    for _ in range(cfg.depth))
        if cfg.rope:
            cos, sin = _rope(cfg, W // cfg.heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.has_head = cfg.head_depth > 0
        if self.has_head:
            H = cfg.head_width
            self.s_projector = nn.Linear(W, H) if cfg.head_projector else nn.Identity()
            self.head_embedder = nn.Linear(token_dim, H)
            self.head_blocks = nn.ModuleList(AdaLNBlock(H, cfg.head_heads, cfg.head_mlp_hidden, cond_dim=H)
                                             for _ in range(cfg.head_depth))
            if cfg.rope:
                cos, sin = _rope(cfg, H // cfg.head_heads)
                self.register_buffer("head_rope_cos", cos, persistent=False)
                self.register_buffer("head_rope_sin", sin, persistent=False)
            self.final_layer = FinalLayer(H, token_dim)
        else:
            self.final_layer = FinalLayer(W, token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier Linear layers (LightningDiT; model.init=trunc_normal: trunc-normal(0.02) inside the
        blocks, as the FlatDINO authors' flat DiT), N(0, 0.02) tables, then the zero adaLN/final layers."""
        blocks = [*self.blocks, *(self.head_blocks if self.has_head else [])]
        in_blocks = {id(m) for blk in blocks for m in blk.modules()} if self.cfg.init == "trunc_normal" else set()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if id(m) in in_blocks:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for blk in blocks:
            blk.adaLN_modulation.reset_parameters()
        self.final_layer.reset_parameters()

    def _rope_of(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (getattr(self, f"{prefix}rope_cos"), getattr(self, f"{prefix}rope_sin")) if self.cfg.rope else None

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*w, d) grid cells, row-major -> (B, h/p * w/p, p*p*d) tokens."""
        return group_cells(x, self.cfg.grid, self.cfg.patch)  # grid is None only at patch 1: unused

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of _patchify."""
        return ungroup_cells(x, self.cfg.grid, self.cfg.patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._unpatchify(self._forward_tokens(self._patchify(x), t, y))

    def _forward_tokens(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_emb = self.t_embedder(t)  # (B, W)
        c = t_emb + self.y_embedder(y)  # (B, W); label dropout happens in training mode
        s = self.x_embedder(x) + self.pos_embed  # (B, N, W)
        trunk_c = F.silu(c) if self.has_head else c  # DDT conditions its trunk on silu(t + y)
        rope = self._rope_of("")
        for blk in self.blocks:
            s = blk(s, trunk_c, rope)
        if not self.has_head:
            return self.final_layer(s, c)  # (B, N, d)
        s = self.s_projector(F.silu(t_emb.unsqueeze(1) + s))  # (B, N, H): per-token head conditioning
        h = self.head_embedder(x)  # (B, N, H)
        rope = self._rope_of("head_")
        for blk in self.head_blocks:
            h = blk(h, s, rope)
        return self.final_layer(h, s)

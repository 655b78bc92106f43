"""Transformer blocks: plain pre-norm `Block` (VAE, pixel decoder), adaLN-Zero `AdaLNBlock` and
`FinalLayer` (LightningDiT and its DDT head).

Submodule names (norm1, attn, norm2, mlp, adaLN_modulation, norm_final, linear) follow
DiT / LightningDiT / RAE so their checkpoints map onto ours key by key.
"""

from __future__ import annotations

import torch
from torch import nn

from flatdino_cli.nn.attention import Attention
from flatdino_cli.nn.mlp import SwiGLU, make_mlp
from flatdino_cli.nn.modulate import AdaLN, modulate
from flatdino_cli.nn.norm import RMSNorm, make_norm

__all__ = ["Block", "AdaLNBlock", "FinalLayer"]

Rope = tuple[torch.Tensor, torch.Tensor]


class Block(nn.Module):
    """Pre-norm block: x = x + attn(norm1 x, rope); x = x + mlp(norm2 x); (B, N, dim) -> (B, N, dim).

    Args:
        norm: "layernorm" (with bias) or "rmsnorm", both affine, eps `norm_eps`
            (FlatDINO VAE: layernorm 1e-6; RAE pixel decoder: layernorm 1e-12).
        mlp: "swiglu" (VAE) or "gelu" (pixel decoder, exact GELU), hidden width `mlp_hidden`.
        qk_norm: None, "layernorm" or "rmsnorm" (per head; the VAE uses "layernorm").
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm: str = "layernorm",
                 norm_eps: float = 1e-6, mlp: str = "swiglu", qkv_bias: bool = True,
                 qk_norm: str | None = None):
        super().__init__()
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.norm2 = make_norm(norm, dim, norm_eps)
        self.mlp = make_mlp(mlp, dim, mlp_hidden)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)  # (B, N, dim)
        return x + self.mlp(self.norm2(x))


def _tokenwise(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (B, cond) -> (B, 1, cond) so per-sample and per-token conditioning share one code path
    return c.unsqueeze(1) if c.dim() == x.dim() - 1 else c


class AdaLNBlock(nn.Module):
    """LightningDiT block with adaLN-Zero; x (B, N, dim), c (B, cond_dim) or per-token (B, N, cond_dim).

    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = adaLN_modulation(c)
    x = x + gate_msa * attn(modulate(norm1 x, shift_msa, scale_msa), rope)
    x = x + gate_mlp * mlp(modulate(norm2 x, shift_mlp, scale_mlp))
    Norms are RMSNorm (eps 1e-6, learned scale), the MLP is SwiGLU with biases, qkv has a bias.
    adaLN_modulation (SiLU -> Linear(cond_dim, 6*dim)) is zero-initialised, so the block is the
    identity at init. cond_dim defaults to dim.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, cond_dim: int | None = None,
                 qk_norm: str | None = None):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation = AdaLN(cond_dim or dim, dim, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        c = _tokenwise(c, x)  # (B, 1 or N, cond_dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """linear(modulate(norm_final x, shift, scale)): x (B, N, dim), c (B[, N], cond_dim) -> (B, N, out_dim).

    RMSNorm (eps 1e-6, learned scale); adaLN_modulation gives (shift, scale) and, like `linear`,
    is zero-initialised, so the output is exactly zero at init.
    """

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm_final = RMSNorm(dim, eps=1e-6)
        self.adaLN_modulation = AdaLN(cond_dim or dim, dim, 2)
        self.linear = nn.Linear(dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero adaLN and output projection (call again after any model-wide re-initialisation)."""
        self.adaLN_modulation.reset_parameters()
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(_tokenwise(c, x))
        return self.linear(modulate(self.norm_final(x), shift, scale))

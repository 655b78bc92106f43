"""Multi-head self-attention with optional per-head QK-norm and rotary position embedding.

Conventions fixed here once:
- the fused `qkv` Linear stacks its outputs as [q; k; v] along dim 0 of the weight (3*dim rows),
  and within each third the heads are contiguous (rows h*head_dim:(h+1)*head_dim are head h),
  which is exactly how separate HF-style query/key/value Linears lay out their outputs;
- RoPE rotates INTERLEAVED pairs (x0, x1), (x2, x3), ... and is applied to q and k after QK-norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatdino_cli.nn.norm import FP32LayerNorm, RMSNorm

__all__ = ["rotate_half", "apply_rope", "fuse_qkv", "Attention"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pair rotation: [x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., D/2) each
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by the angles whose cos/sin are given, in fp32, returning x.dtype.

    Args:
        x: (B, heads, N, head_dim).
        cos, sin: (N, head_dim) tables (see embed.rope_1d / rope_2d), or anything broadcastable
            to x, e.g. (B, 1, N, head_dim).
    """
    xf = x.float()
    return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate query/key/value weights (dim, in) or biases (dim,) -> fused qkv (3*dim, ...)."""
    return torch.cat([q, k, v], dim=0)


def _qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    # per-head norm with a learned scale and no bias, eps 1e-6, statistics in fp32
    if kind is None:
        return nn.Identity()
    if kind == "layernorm":
        return FP32LayerNorm(head_dim, eps=1e-6, bias=False)
    if kind == "rmsnorm":
        return RMSNorm(head_dim, eps=1e-6)
    raise ValueError(f"unknown qk_norm {kind!r}; expected None, 'layernorm' or 'rmsnorm'")


class Attention(nn.Module):
    """Self-attention (B, N, dim) -> (B, N, dim) via F.scaled_dot_product_attention.

    Parameters: `qkv` Linear(dim, 3*dim) with the [q; k; v] layout described in the module
    docstring, optional `q_norm` / `k_norm` (per head, over head_dim), `proj` Linear(dim, dim).
    The attention scale is the SDPA default 1/sqrt(head_dim).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: str | None = None,
                 proj_bias: bool = True, inner_dim: int | None = None):
        super().__init__()
        inner = inner_dim or dim  # FAE's encoder attends in a wider space than its input
        if inner % num_heads != 0:
            raise ValueError(f"attention width {inner} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.inner = num_heads, inner // num_heads, inner
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.q_norm = _qk_norm(qk_norm, self.head_dim)
        self.k_norm = _qk_norm(qk_norm, self.head_dim)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, dim); rope = (cos, sin), each (N, head_dim), or None."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.inner))

    @torch.no_grad()
    def load_qkv(self, q: nn.Linear | dict, k: nn.Linear | dict, v: nn.Linear | dict) -> None:
        """Copy separate query/key/value projections into the fused `qkv` Linear.

        Each argument is an nn.Linear or a dict {"weight": (dim, dim), "bias": (dim,) optional},
        e.g. the RAE decoder's `attention.attention.{query,key,value}` entries.
        """
        parts = [p.state_dict() if isinstance(p, nn.Module) else p for p in (q, k, v)]
        weight = fuse_qkv(*(p["weight"] for p in parts))
        if weight.shape != self.qkv.weight.shape:
            raise ValueError(f"fused qkv weight {tuple(weight.shape)} != {tuple(self.qkv.weight.shape)}")
        self.qkv.weight.copy_(weight)
        has_bias = [p.get("bias") is not None for p in parts]
        if self.qkv.bias is None:
            if any(has_bias):
                raise ValueError("separate q/k/v carry biases but this Attention has qkv_bias=False")
            return
        if not all(has_bias):
            raise ValueError("this Attention has qkv_bias=True but q/k/v biases are missing")
        self.qkv.bias.copy_(fuse_qkv(*(p["bias"] for p in parts)))

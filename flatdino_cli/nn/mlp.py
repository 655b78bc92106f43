"""Feed-forward blocks: SwiGLU (FlatDINO VAE, LightningDiT) and exact-GELU MLP (RAE pixel decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "GeluMLP", "make_mlp", "MLP_KINDS"]

MLP_KINDS = ("swiglu", "gelu")


class SwiGLU(nn.Module):
    """y = w3(silu(w1 x) * w2 x); (..., dim) -> (..., dim).

    Parameters: `w12` Linear(dim, 2*hidden) holds w1 and w2 fused as [w1; w2] along dim 0 (rows
    0:hidden are the silu-gated branch w1, rows hidden:2*hidden the linear branch w2), and `w3`
    Linear(hidden, dim). These are RAE's LightningDiT key names (`mlp.w12`, `mlp.w3`), so its
    checkpoints load by key copy; FlatDINO's JAX names map as gate -> w1, up -> w2, down -> w3.
    `hidden` is used as given (no 2/3 reduction here; callers decide).
    """

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.hidden = hidden
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.w3(F.silu(x1) * x2)


class GeluMLP(nn.Module):
    """y = fc2(gelu(fc1 x)) with the exact (erf) GELU; (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def make_mlp(kind: str, dim: int, hidden: int, bias: bool = True) -> nn.Module:
    """kind "swiglu" -> SwiGLU, "gelu" -> GeluMLP."""
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias=bias)
    if kind == "gelu":
        return GeluMLP(dim, hidden, bias=bias)
    raise ValueError(f"unknown mlp kind {kind!r}; expected one of {MLP_KINDS}")

"""Normalisation layers: RMSNorm, an fp32 LayerNorm for QK-norm, and a `make_norm` factory.

Both norms normalise over the last dimension and return the input's dtype, so they can sit
inside bf16 autocast regions without changing the residual stream's precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "FP32LayerNorm", "make_norm", "NORM_KINDS"]

NORM_KINDS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim; (..., D) -> (..., D).

    Computed in fp32 and cast back to x.dtype (LightningDiT / RAE keep the statistics in fp32).
    `weight` starts at ones; with affine=False there is no parameter at all.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose statistics and affine are computed in fp32, output cast back to x.dtype.

    Same parameters (and state-dict keys) as nn.LayerNorm; used for QK-norm, where the authors
    (FlatDINO) normalise q and k in fp32 even under bf16 compute.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, affine: bool = True, bias: bool = True) -> nn.Module:
    """Build a norm over the last dim of size `dim`.

    Args:
        kind: "layernorm" (torch nn.LayerNorm) or "rmsnorm" (RMSNorm above).
        eps: added to the variance / mean square.
        affine: learn a per-channel scale (and, for LayerNorm, a bias).
        bias: LayerNorm only; ignored by RMSNorm, which has no bias.
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, affine=affine)
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")

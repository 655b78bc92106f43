"""Position tables (fixed sin-cos, RoPE cos/sin) and conditioning embedders (time, class label).

All tables are float32 tensors built on the CPU; models register them as buffers or frozen
parameters so they travel with checkpoints (RAE stores both its sin-cos table and RoPE buffers).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["sincos_1d", "sincos_2d", "rope_1d", "rope_2d",
           "GaussianFourierEmbedder", "LabelEmbedder"]


def _sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE 1-D table: pos (M,) -> (M, dim) = [sin(pos*omega), cos(pos*omega)], omega_k = 1e4^(-k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2); float64 as MAE's numpy code
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_1d(num_pos: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos table over positions 0..num_pos-1 -> (num_pos, dim) float32."""
    return _sincos(torch.arange(num_pos), dim).float()


def sincos_2d(h: int, w: int, dim: int, cls_token: bool = False, step: float = 1.0) -> torch.Tensor:
    """MAE-style 2-D sin-cos table -> (h*w, dim), or (1 + h*w, dim) with a zero CLS row first.

    Tokens are row-major (token n = row i * w + col j). As in MAE's meshgrid(grid_w, grid_h), the
    first dim/2 channels encode the COLUMN index j and the last dim/2 the ROW index i, each as
    [sin | cos] with omega_k = 1/10000^(k/(dim/4)). Bit-matches RAE's stored decoder_pos_embed.
    `step` spaces the positions (diffusers' rebuilt table uses 16 / side, interop/diffusers.py).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos dim must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    if step != 1.0:
        rows, cols = rows.float() * step, cols.float() * step
    emb = torch.cat([_sincos(cols.flatten(), dim // 2), _sincos(rows.flatten(), dim // 2)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def _rope_angles(num_pos: int, dim: int, theta: float) -> torch.Tensor:
    """(num_pos, dim) angles pos * theta^(-2k/dim), each frequency repeated twice (interleaved pairs)."""
    if dim % 2:
        raise ValueError(f"rope dim must be even, got {dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))  # (dim/2,)
    return (torch.arange(num_pos).float()[:, None] * freqs[None]).repeat_interleave(2, dim=-1)


def rope_1d(num_pos: int, head_dim: int, theta: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE over the full head dim (FlatDINO's flat DiT) -> cos, sin, each (num_pos, head_dim)."""
    ang = _rope_angles(num_pos, head_dim, theta)
    return ang.cos(), ang.sin()


def rope_2d(h: int, w: int, head_dim: int, theta: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE (RAE's VisionRotaryEmbeddingFast) -> cos, sin, each (h*w, head_dim), tokens row-major.

    The first head_dim/2 channels rotate with the ROW index, the last head_dim/2 with the COLUMN
    index; per axis the frequencies are 1/theta^(arange(0, d, 2)/d) with d = head_dim/2, each
    repeated twice (interleaved pairs).
    """
    if head_dim % 4:
        raise ValueError(f"2-D rope head_dim must be divisible by 4, got {head_dim}")
    d = head_dim // 2
    ang_r = _rope_angles(h, d, theta)[:, None, :].expand(h, w, d)  # (h, w, d)
    ang_c = _rope_angles(w, d, theta)[None, :, :].expand(h, w, d)  # (h, w, d)
    ang = torch.cat([ang_r, ang_c], dim=-1).reshape(h * w, head_dim)
    return ang.cos(), ang.sin()


class GaussianFourierEmbedder(nn.Module):
    """t (B,) in [0, 1] -> [sin 2pi t W, cos 2pi t W] (2*num_freqs) -> Linear -> SiLU -> Linear -> (B, hidden).

    `W` (num_freqs,) ~ N(0, 1) is a frozen nn.Parameter (requires_grad=False): random but stored in
    the state dict, as RAE's `t_embedder.W`, so a checkpoint reproduces the same embedding.
    Optimiser builders must skip parameters with requires_grad=False.
    """

    def __init__(self, hidden: int, num_freqs: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_freqs), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float()[:, None] * self.W.detach().float()[None] * (2 * math.pi)  # (B, num_freqs)
        return self.mlp(torch.cat([x.sin(), x.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, hidden), with label dropout to the null class for classifier-free guidance.

    `embedding_table` has num_classes + 1 rows; row num_classes is the null (unconditional) class.
    In training mode each label is replaced by the null class with probability dropout_prob; in eval
    mode never, unless `force_drop` (a (B,) bool/0-1 mask) says so (it applies in both modes).
    """

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def drop(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B,) long -> labels with the dropped entries set to num_classes."""
        if force_drop is not None:
            mask = force_drop.to(device=labels.device, dtype=torch.bool)
        elif self.training and self.dropout_prob > 0:
            mask = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        else:
            return labels
        return torch.where(mask, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding_table(self.drop(labels, force_drop))

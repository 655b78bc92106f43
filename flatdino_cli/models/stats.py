"""Latent statistics for RAE mode (`normalize: true`): per-position mean/var, one normalise/denormalise,
and RAE's stat.pt format.

RAE stores {"mean", "var"}, each (C, H, W); we use them per token, (N, C) with N = H*W. A 1-D token
sequence (no grid) is stored as (C, N, 1), so RAE's code and ours read each other's files.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from flatdino_cli.checkpoint import load_weights
from flatdino_cli.errors import UserError
from flatdino_cli.interop import diffusers as rae_folder
from flatdino_cli.utils import atomic_write

STATS_FILE = "stats.pt"  # the name train-dit writes in its run dir


class LatentStats(nn.Module):
    """Per-position mean/var of the training data, (N, C) in our token layout; RAE's eps 1e-5."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", (var.float() + eps).sqrt())

    @classmethod
    def from_std(cls, mean: torch.Tensor, std: torch.Tensor) -> "LatentStats":
        """Stats whose divisor is given as is (diffusers' std + 1e-5, interop/diffusers.py)."""
        stats = cls(mean, torch.zeros_like(std), eps=0.0)
        stats.std.copy_(std.float())
        return stats

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def tokens_to_chw(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C) per-token stats -> RAE's (C, H, W) on grid (H, W); the inverse of chw_to_tokens."""
    return t.T.reshape(-1, *grid)


def chw_to_tokens(t: torch.Tensor) -> torch.Tensor:
    """RAE's (C, H, W) -> (H*W, C); scalar / (C,) stats are returned as they are (they broadcast)."""
    return t.reshape(t.shape[0], -1).T if t.dim() == 3 else t


def load_rae_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """RAE's stat.pt -> (mean, var) in its stored (C, H, W) layout; a missing key means 0 / 1, as in RAE."""
    path = Path(path)
    stats = load_weights(path)
    if not {"mean", "var"} & set(stats):
        raise UserError(f"{path}: not an RAE statistics file (expected keys 'mean' and 'var', found {list(stats)[:3]})")
    mean, var = stats.get("mean"), stats.get("var")
    mean, var = torch.tensor(0.0) if mean is None else mean, torch.tensor(1.0) if var is None else var
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (0, 1, 3):
            raise UserError(f"{path}: '{name}' must be a (C, H, W) tensor, found {getattr(t, 'shape', type(t))}")
    return mean.float(), var.float()


def save_rae_stats(path: str | Path, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write RAE's exact format {"mean", "var"}, each (C, H, W), atomically; token-layout (P, C) input
    is taken to lie on a square grid."""
    def chw(t: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(t.shape[0])
        return tokens_to_chw(t, (side, side)) if t.dim() == 2 else t

    obj = {k: chw(t).detach().float().cpu().contiguous() for k, t in (("mean", mean), ("var", var))}
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_stats(path: Path, mean: torch.Tensor, var: torch.Tensor, grid: tuple[int, int] | None) -> None:
    """(N, C) stats -> RAE's (C, H, W) file; a 1-D token sequence (grid None) is stored as (C, N, 1)."""
    grid = grid or (mean.shape[0], 1)
    save_rae_stats(path, tokens_to_chw(mean, grid), tokens_to_chw(var, grid))


def load_stats(path: Path, grid: tuple[int, int] | None = None) -> LatentStats:
    """RAE's (C, H, W) file -> per-token stats (H*W, C); scalar / (C,) stats are used as given. A diffusers
    AutoencoderRAE folder gives its latents_mean / latents_std with diffusers' own epsilon (std + 1e-5,
    where RAE's stat.pt divides by sqrt(var + 1e-5))."""
    if rae_folder.is_rae_folder(path):
        return LatentStats.from_std(*map(chw_to_tokens, rae_folder.stats(path)))
    return LatentStats(*map(chw_to_tokens, load_rae_stats(path)))

"""Neighbouring cells of a row-major 2-D token grid as one token, and back (DiT-XL/2's patching)."""

from __future__ import annotations

import torch


def group_cells(x: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(B, h*w, d) cells of an (h, w) grid, row-major -> (B, h/p * w/p, p*p*d): one token per p x p block,
    its cells in row-major order."""
    if p == 1:
        return x
    (h, w), B, d = grid, x.shape[0], x.shape[-1]
    x = x.reshape(B, h // p, p, w // p, p, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (h // p) * (w // p), p * p * d)


def ungroup_cells(x: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """The inverse of group_cells: (B, h/p * w/p, p*p*d) -> (B, h*w, d)."""
    if p == 1:
        return x
    (h, w), B = grid, x.shape[0]
    x = x.reshape(B, h // p, w // p, p, p, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * w, -1)

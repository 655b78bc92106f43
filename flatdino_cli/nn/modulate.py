"""adaLN conditioning: `modulate` and the zero-initialised `AdaLN` projection (DiT's adaLN-Zero)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["modulate", "AdaLN"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift.

    Args:
        x: (B, N, D).
        shift, scale: (B, D) per-sample (broadcast over the N tokens) or (B, N, D) per-token.
    """
    if shift.dim() == x.dim() - 1:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)  # (B, 1, D)
    return x * (1 + scale) + shift


class AdaLN(nn.Sequential):
    """SiLU -> Linear(cond_dim, n_chunks*dim), zero-initialised; c (..., cond_dim) -> n_chunks x (..., dim).

    A Sequential so that, held as `adaLN_modulation`, its keys are `adaLN_modulation.1.{weight,bias}`
    as in DiT / LightningDiT / RAE checkpoints. Zero init makes every modulated block start as the
    identity (gate = 0) and the final layer output zero.
    """

    def __init__(self, cond_dim: int, dim: int, n_chunks: int):
        super().__init__(nn.SiLU(), nn.Linear(cond_dim, n_chunks * dim))
        self.n_chunks = n_chunks
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the projection (call again after any model-wide Linear re-initialisation)."""
        nn.init.zeros_(self[1].weight)
        nn.init.zeros_(self[1].bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return super().forward(c).chunk(self.n_chunks, dim=-1)

"""What each optimizer step of the training loop (train.py) is made of, as functions of the config and
the step: the learning rate, the weight-decay groups, the EMA update, the per-micro-batch seed and the
data order. Nothing here holds state, which is what makes a resume bitwise."""

from __future__ import annotations

import math

import torch
from torch import nn

from flatdino_cli.config import TrainConfig


def lr_at(step: int, total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate before optimizer step `step` (0-based)."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, total - 1 - warm)  # the last step (total - 1) runs at final_lr, as in wsd
        frac = min(1.0, (step - warm) / span)
        return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * frac))
    decay = int(round(cfg.decay_epochs * steps_per_epoch))  # wsd
    # the decay ends with the run, or at decay_until_epoch whatever the run's length (RAE's DiT-DH recipe
    # decays on an 800-epoch clock, so its 80-epoch runs end at 1.9e-4, not at final_lr)
    end = total if cfg.decay_until_epoch is None else int(round(cfg.decay_until_epoch * steps_per_epoch))
    start = end - decay
    if decay <= 0 or step < start:
        return cfg.lr
    frac = min(1.0, (step - start + 1) / decay)
    if cfg.decay_shape == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.lr + (cfg.final_lr - cfg.lr) * frac


def param_groups(model: nn.Module, weight_decay: float, decay_2d_only: bool) -> list[dict]:
    """decay_2d_only: weight decay on 2-D weight matrices only, the authors' `ndim == 2` rule. Biases,
    norm scales, and the (1, T, W) learned query tokens and position tables are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not decay_2d_only:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


class EpochBatches:
    """Micro-batch index lists of one epoch for one rank, from optimizer step `start` on.

    The epoch order is a permutation seeded by (seed, epoch); optimizer step s uses the global slice
    perm[s*B:(s+1)*B], of which rank r takes its contiguous share, split into `accum` micro-batches.
    """

    def __init__(self, n: int, batch: int, micro: int, seed: int, epoch: int, start: int, rank: int, world: int):
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        self.perm = torch.randperm(n, generator=g).tolist()
        self.batch, self.micro, self.start, self.rank, self.world = batch, micro, start, rank, world
        self.steps = n // batch

    def __iter__(self):
        per_rank = self.batch // self.world
        for s in range(self.start, self.steps):
            mine = self.perm[s * self.batch + self.rank * per_rank: s * self.batch + (self.rank + 1) * per_rank]
            for i in range(0, per_rank, self.micro):
                yield mine[i: i + self.micro]

    def __len__(self):
        return (self.steps - self.start) * (self.batch // self.world // self.micro)

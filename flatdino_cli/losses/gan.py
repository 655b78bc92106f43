"""Adversarial terms of RAE's decoder recipe (INTEROP.md A4): hinge loss, generator loss, the adaptive
weight, DiffAugment (translation + colour) applied to real and fake images alike, and the
discriminator's optimizer step."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["hinge_d_loss", "generator_loss", "adaptive_weight", "diff_augment", "discriminator_step"]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(logits_fake): the decoder pushes the discriminator's score of its images up."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    max_w: float) -> torch.Tensor:
    """||d rec / d W|| / (||d gan / d W|| + 1e-6), clamped to [0, max_w], detached (W: the decoder's last layer).

    Balances the GAN gradient against the reconstruction gradient where both enter the decoder; the
    graphs are kept for the real backward pass.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    w = g_rec.norm() / (g_gan.norm() + 1e-6)
    return w.clamp(0.0, max_w).detach()


def _translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shift each image by integers in [-ratio*H, ratio*H] x [-ratio*W, ratio*W]; vacated pixels are 0."""
    B, C, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1) + dy + sh  # (B, H, 1) into the padded image
    cols = torch.arange(W, device=x.device).view(1, 1, W) + dx + sw  # (B, 1, W)
    padded = F.pad(x, [sw, sw, sh, sh]).permute(0, 2, 3, 1)  # (B, H + 2sh, W + 2sw, C)
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def _colour(x: torch.Tensor) -> torch.Tensor:
    """DiffAugment's colour ops with per-image strengths: brightness, saturation, contrast."""
    B = x.shape[0]
    r = lambda: torch.rand(B, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (r() - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (r() + 0.5) + mean


def diff_augment(x: torch.Tensor, translation: float = 0.125) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) 'color,translation': differentiable, randomness from torch's RNG."""
    return _translate(_colour(x), translation)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images clamped and rounded to 8-bit levels, as fakes saved to disk would be."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def discriminator_step(disc: nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor,
                       autocast: Callable = contextlib.nullcontext,
                       grad_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One hinge-loss step of `disc` on real and (detached) fake images in [-1, 1], both DiffAugmented,
    the fakes quantised to 8 bits. grad_mean averages each gradient over the processes (a
    discriminator that is not DDP-wrapped); returns the loss and the mean logits."""
    with autocast():
        logits_real = disc(diff_augment(real))
        logits_fake = disc(diff_augment(_quantize(fake)))
        d_loss = hinge_d_loss(logits_real, logits_fake)
    opt.zero_grad(set_to_none=True)
    d_loss.backward()
    if grad_mean is not None:
        for p in disc.parameters():
            if p.grad is not None:
                p.grad.copy_(grad_mean(p.grad))
    opt.step()
    return {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item()}

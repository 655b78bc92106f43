"""Image metrics shared by reconstruct, train-decoder's validation and the noise analysis: PSNR, SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0  # dB reported for identical images (PSNR is +inf there), so JSON stays standard


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of (B, 3, H, W) pixels in [0, 1] (peak 1); +inf where the images are equal."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse)  # mse 0 -> +inf


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image of (B, 3, H, W) pixels in [0, 1] (Wang et al. 2004): 11x11 Gaussian window,
    sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1, statistics over 'valid' windows only (no
    padding), the SSIM map averaged per channel, then over the 3 channels. Images smaller than the
    window use the largest odd window that fits."""
    a, b = a.double(), b.double()
    size = min(window, min(a.shape[-2:]) - (1 - min(a.shape[-2:]) % 2))
    w = _gaussian_window(size, sigma).to(a.device).expand(a.shape[1], 1, size, size)
    blur = lambda x: F.conv2d(x, w, groups=a.shape[1])  # noqa: E731  (B, C, H', W')
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return s.flatten(2).mean(2).mean(1)  # per channel, then over channels: (B,)

"""Image metrics (metrics.py): SSIM against Wang et al.'s formula written out with scipy, and PSNR."""

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from flatdino_cli import metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest)


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM written out with scipy: Gaussian 11x11 (sigma 1.5), 'valid', mean per channel."""
    x = np.arange(11) - 5.0
    g = np.exp(-x**2 / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    out = []
    for ch in range(3):
        f = lambda im: convolve2d(im, win, mode="valid")  # noqa: E731
        x_, y_ = a[ch], b[ch]
        mx, my = f(x_), f(y_)
        vx, vy, cxy = f(x_ * x_) - mx**2, f(y_ * y_) - my**2, f(x_ * y_) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        out.append(s.mean())
    return float(np.mean(out))


def test_ssim_and_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    s = metrics.ssim(x, y)
    assert (s < 0.99).all() and torch.allclose(s, metrics.ssim(y, x))
    assert s[0].item() == pytest.approx(ssim_reference(x[0].numpy(), y[0].numpy()), abs=1e-10)
    assert metrics.psnr(x, x).isinf().all()  # identical: +inf (reports write PSNR_CAP instead)
    assert metrics.psnr(x * 0, x * 0 + 0.1).tolist() == pytest.approx([20.0, 20.0])
    assert metrics.ssim(x[:, :, :7, :7], y[:, :, :7, :7]).shape == (2,)  # smaller than the window

"""A small CNN that names toy-data classes: the quickstart's honest measure of sample quality.

It is trained on real toy images drawn from a split the pipeline never sees ("classifier-train"),
checked on another unseen split ("classifier-test"), and only then asked to label generated samples.
A classifier that cannot name real images (accuracy below `min_real_accuracy`) proves nothing, so
its sample accuracy is reported together with its real accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flatdino_cli.toydata import CLASS_NAMES, render


class ToyClassifier(nn.Module):
    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                          nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> logits (B, K)."""
        x = x - 0.5
        for conv in self.convs:
            x = F.max_pool2d(conv(x), 2)
        return self.head(x.mean((2, 3)))


def toy_images(split: str, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N,) labels of a toy split."""
    imgs, labels = [], []
    for c in range(len(CLASS_NAMES)):
        for i in range(per_class):
            imgs.append(np.asarray(render(c, i, size, seed, split=split)))
            labels.append(c)
    return np.stack(imgs), np.asarray(labels)


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class ids of (N, H, W, 3) uint8 images."""
    model.eval()
    out = [model(_tensor(images[i: i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def train_toy_classifier(size: int = 48, per_class: int = 150, epochs: int = 8, seed: int = 0,
                         test_per_class: int = 50) -> tuple[ToyClassifier, float]:
    """Train on the 'classifier-train' split; returns (model, accuracy on 'classifier-test')."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = toy_images("classifier-train", per_class, size, seed)
    xt, yt = _tensor(x), torch.from_numpy(y)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (len(xt) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="toy classifier", unit="step", leave=False, mininterval=2)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt) - 63, 64):
            idx = perm[i: i + 64]
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # shapes are flip-symmetric classes
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    test_x, test_y = toy_images("classifier-test", test_per_class, size, seed)
    acc = float((predict(model, test_x) == test_y).mean())
    return model, acc

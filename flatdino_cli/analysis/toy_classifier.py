"""A small CNN that names toy-data classes: the quickstart's honest measure of sample quality.

It is trained on real toy images drawn from a split the pipeline never sees ("classifier-train"),
checked on another unseen split ("classifier-test"), and only then asked to label generated samples.
A classifier that cannot name real images (accuracy below `min_real_accuracy`) proves nothing, so
its sample accuracy is reported together with its real accuracy.

It is trained with random Gaussian blur (sigma up to 1.5 px) as well as flips. Trained on sharp
images only, it is a sharpness detector rather than a shape judge: a 1-px blur of REAL test images
took it from 99.7% to 70% (1.5 px: 50%), so any decoder's slightly soft output was failed whatever
its shape. Its accuracy on blurred real images is reported beside the sharp one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from flatdino_cli.toydata import CLASS_NAMES, render
from flatdino_cli.utils import atomic_write_bytes, user_cache_dir
from flatdino_cli.viz import to_uint8


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


def named_right(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    """The share of (N, H, W, 3) uint8 images the judge names as their label, in all and per label."""
    named = predict(model, images)
    return float((named == labels).mean()), {int(c): float((named[labels == c] == c).mean()) for c in np.unique(labels)}


MAX_BLUR = 1.5  # px: the training blur's sigma is uniform in [0, MAX_BLUR]


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W, 3) uint8 images through a Gaussian blur of `sigma` px."""
    return to_uint8(gaussian_blur(_tensor(images), kernel_size=7, sigma=sigma))


def real_accuracy(model: nn.Module, size: int = 48, seed: int = 0, per_class: int = 50, blur: float = 0.0) -> float:
    """Accuracy on the unseen 'classifier-test' split, optionally blurred by `blur` px."""
    x, y = toy_images("classifier-test", per_class, size, seed)
    return float((predict(model, blurred(x, blur) if blur else x) == y).mean())


JUDGE_VERSION = 1  # bump when the judge's data, architecture or training changes: old caches are ignored


def cached_toy_classifier(size: int = 48, seed: int = 0, cache_dir: str | Path | None = None) -> tuple[ToyClassifier, float]:
    """train_toy_classifier(size, seed), trained once per machine: the judge is a pure function of
    (size, seed, JUDGE_VERSION), so its weights are kept in the user cache (XDG_CACHE_HOME/flatdino)
    and a second quickstart (e.g. `--laminator fae`) is judged by the very same network."""
    cache = Path(cache_dir) / "flatdino" if cache_dir else user_cache_dir()
    path = cache / f"toy-judge-v{JUDGE_VERSION}-size{size}-seed{seed}.safetensors"
    if path.exists():
        try:
            model = ToyClassifier()
            model.load_state_dict(load_file(path))
            return model.eval(), real_accuracy(model, size, seed)
        except Exception as e:  # noqa: BLE001 - a damaged cache file is retrained, never trusted
            tqdm.write(f"toy classifier: ignoring unreadable cache {path} ({type(e).__name__})")
    model, acc = train_toy_classifier(size=size, seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(model.state_dict()))
    except OSError as e:  # a read-only home must not fail the quickstart
        tqdm.write(f"toy classifier: not cached ({e})")
    return model, acc


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
            sigma = float(torch.rand((), generator=g)) * MAX_BLUR
            if sigma > 0.2:  # one blur per batch: about a seventh of the batches stay sharp
                xb = gaussian_blur(xb, kernel_size=7, sigma=sigma)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model, real_accuracy(model, size, seed, test_per_class)

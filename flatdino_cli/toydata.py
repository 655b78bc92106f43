"""The embedded toy dataset: procedurally drawn, class-labelled shapes the quickstart runs on.

Twelve classes, each a (colour family, shape) pair laid out so that every colour family comes with
four shapes and every shape with two colour families: no single cue (mean colour, or silhouette
alone) names the class. Each image is a function of (seed, split, class, index) only: a numpy
Generator is seeded per image, so any subset regenerates to identical bytes, in any order, and an
interrupted `write_toy_dataset` resumes by skipping files that already exist.

Backgrounds vary in luminance only (a grey level, a gentle gradient and smooth low-frequency
noise, all low contrast): every encoder patch feature is LayerNormed, so a busy per-channel
background would cost the downstream VAE as much as the object does.
"""

from __future__ import annotations

import colorsys
import io
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_bytes, check_out_dir

__all__ = ["CLASS_NAMES", "COLOUR_FAMILIES", "SHAPES", "render", "render_with_mask", "write_toy_dataset"]

# hue centre (degrees) of each colour family; each image jitters hue, saturation and value
COLOUR_FAMILIES = {"red": 0.0, "green": 120.0, "blue": 225.0}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
# (colour, shape) per class id: each colour has 4 shapes, each shape 2 colours
_CLASSES = [
    ("red", "circle"), ("red", "square"), ("red", "cross"), ("red", "star"),
    ("green", "circle"), ("green", "triangle"), ("green", "cross"), ("green", "ring"),
    ("blue", "square"), ("blue", "triangle"), ("blue", "ring"), ("blue", "star"),
]
# the 2-digit prefix makes the sorted folder order (ImageFolder's ids) equal to the class id
CLASS_NAMES = [f"{i:02d}_{c}_{s}" for i, (c, s) in enumerate(_CLASSES)]

_SUPERSAMPLE = 4  # draw at 4x and box-downsample: antialiased edges
_WIDTH_RANGE = (0.5, 0.85)  # object diameter as a fraction of the image width (spans several patches)


def _image_rng(seed: int, split: str | None, class_id: int, index: int) -> np.random.Generator:
    stream = 0 if split in (None, "train") else zlib.crc32(split.encode())
    return np.random.default_rng([seed, stream, class_id, index])


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` with circumradius r, centred at (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
               for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif shape == "cross":  # a plus sign whose arm corners touch the circumcircle
        w = 0.32
        L = math.sqrt(1 - w * w)
        pts = [(w, L), (w, w), (L, w), (L, -w), (w, -w), (w, -L),
               (-w, -L), (-w, -w), (-L, -w), (-L, w), (-w, w), (-w, L)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of one randomly placed, scaled and rotated shape."""
    S = size * _SUPERSAMPLE
    r = 0.5 * S * rng.uniform(*_WIDTH_RANGE)
    cx, cy = rng.uniform(r, S - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    canvas = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            ri = 0.55 * r
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    small = canvas.reduce(_SUPERSAMPLE)  # box filter = exact area coverage per output pixel
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float32 grey level: base + gentle linear gradient + smooth low-frequency noise."""
    base = rng.uniform(0.35, 0.6)
    theta = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.0, 0.12)
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = amp * (np.cos(theta) * u[None, :] + np.sin(theta) * u[:, None])
    grid = rng.integers(3, 6)
    coarse = rng.normal(0.0, 0.035, size=(grid, grid)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    return base + ramp + noise


def _colour(family: str, rng: np.random.Generator) -> np.ndarray:
    hue = (COLOUR_FAMILIES[family] + rng.uniform(-12, 12)) % 360 / 360
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.95), rng.uniform(0.65, 0.95)), np.float32)


def render_with_mask(class_id: int, index: int, size: int = 48, seed: int = 0,
                     split: str | None = None) -> tuple[Image.Image, np.ndarray]:
    """The image of (class_id, index) and its object coverage mask (size, size) in [0, 1]."""
    if not 0 <= class_id < len(CLASS_NAMES):
        raise ValueError(f"class_id must be in [0, {len(CLASS_NAMES)}), got {class_id}")
    family, shape = _CLASSES[class_id]
    rng = _image_rng(seed, split, class_id, index)
    # fixed draw order (colour, background, shape): the stream is part of the format
    colour = _colour(family, rng)
    bg = _background(size, rng)
    alpha = _mask(shape, size, rng)
    rgb = bg[..., None] * (1 - alpha[..., None]) + colour * alpha[..., None]  # (S, S, 3)
    img = Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), mode="RGB")
    return img, alpha


def render(class_id: int, index: int, size: int = 48, seed: int = 0, split: str | None = None) -> Image.Image:
    """Image number `index` of class `class_id` (RGB, size x size); a pure function of its arguments."""
    return render_with_mask(class_id, index, size, seed, split)[0]


def write_toy_dataset(out: str | Path, per_class: int, size: int = 48, seed: int = 0,
                      split: str | None = None, progress: bool = True) -> dict:
    """Write an ImageFolder tree `out/[split/]<class_name>/<index:05d>.png`; skip files already there.

    `split` (e.g. "val") selects an independent image stream (None and "train" share the default
    stream) and writes under `out/<split>/`. Returns a summary dict (root, count, classes, written,
    existing, class_names).
    """
    if per_class < 1:
        raise UserError(f"--per-class {per_class}: must be >= 1")
    if size < 8:
        raise UserError(f"--size {size}: must be >= 8")
    root = Path(out) / split if split else Path(out)
    check_out_dir(Path(out), "OUT")
    written = existing = 0
    jobs = [(c, i) for c in range(len(CLASS_NAMES)) for i in range(per_class)]
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for c, i in tqdm(jobs, desc=f"toy data -> {root}", unit="img", disable=not progress, leave=False):
        path = root / CLASS_NAMES[c] / f"{i:05d}.png"
        if path.exists():
            existing += 1
            continue
        buf = io.BytesIO()
        render(c, i, size, seed, split).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue(), durable=False)  # cheap to regenerate: no fsync
        written += 1
    return {"root": str(root), "count": len(jobs), "classes": len(CLASS_NAMES), "written": written,
            "existing": existing, "class_names": list(CLASS_NAMES)}

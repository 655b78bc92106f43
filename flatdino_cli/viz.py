"""Pictures: uint8 conversion, PNG read/write, labelled image grids (PIL), heatmap grids and line
plots (matplotlib, Agg backend, object API: no pyplot global state).

Image arrays are uint8 (H, W, 3) or stacks (N, H, W, 3), the layout of ADM's .npz files.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from flatdino_cli.utils import atomic_write_bytes

__all__ = ["to_uint8", "save_png", "load_png", "make_grid", "save_grid", "new_figure", "curve", "style_axes",
           "save_figure", "heatmap_grid"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) pixels in ~[0, 1] -> (B, H, W, 3) uint8: clip to [0, 1], x255, ROUND to nearest.

    Rounding (not truncation, as RAE's sampler does) keeps the mean unbiased: truncation darkens every
    image by half a grey level on average.
    """
    x = x.detach().float().clamp(0.0, 1.0).mul(255.0).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W, 3) image atomically; no fsync (thousands of small files: a power cut may
    lose a file, and readers re-check with load_png)."""
    atomic_write_bytes(Path(path), _png_bytes(image), durable=False)


def load_png(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file (fully decoded, so a damaged file raises here)."""
    with Image.open(path) as im:
        im.load()
        return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap font
        return ImageFont.load_default()


def _caption(tile: Image.Image, text: str) -> None:
    """Draw `text` in white on a black box at the tile's top-left, truncated to the tile width."""
    draw = ImageDraw.Draw(tile)
    font = _font(max(8, tile.height // 12))
    while text and draw.textlength(text, font=font) > tile.width - 4:
        text = text[:-1]
    if text:
        l, t, r, b = draw.textbbox((2, 1), text, font=font)
        draw.rectangle((0, 0, r + 2, b + 2), fill=(0, 0, 0))
        draw.text((2, 1), text, fill=(255, 255, 255), font=font)


def make_grid(images: np.ndarray, nrow: int, labels: Sequence[str] | None = None, pad: int = 2,
              pad_value: int = 255, row_labels: Sequence[str] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) uint8 image, `nrow` images per
    row (torchvision's meaning), filled row by row; labels[i] (if given and non-empty) captions image i.
    row_labels[r] (if given) is written in full in a column left of row r, as wide as the longest."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    n, h, w, _ = images.shape
    cols = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = images[i]
        if labels is not None and labels[i]:
            pil = Image.fromarray(tile)
            _caption(pil, str(labels[i]))
            tile = np.asarray(pil)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y: y + h, x: x + w] = tile
    return grid if not row_labels else _label_column(grid, row_labels, h, pad, pad_value)


def _label_column(grid: np.ndarray, row_labels: Sequence[str], h: int, pad: int, pad_value: int) -> np.ndarray:
    """`grid` with a column on its left holding row_labels[r] beside row r (black on the pad colour)."""
    font = _font(max(10, min(16, h // 3)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = int(max(measure.textlength(str(t), font=font) for t in row_labels)) + 2 * pad + 4
    column = Image.new("RGB", (width, grid.shape[0]), (pad_value,) * 3)
    draw = ImageDraw.Draw(column)
    for r, text in enumerate(row_labels):
        if text:
            _, top, _, bottom = draw.textbbox((0, 0), str(text), font=font)
            y = pad + r * (h + pad) + (h - (bottom - top)) // 2 - top
            draw.text((pad + 2, y), str(text), fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(column), grid], axis=1)


def save_grid(images: np.ndarray, path: str | Path, nrow: int, labels: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None) -> Path:
    """make_grid(images, nrow, labels, row_labels=...) written as a PNG at `path` (atomically)."""
    path = Path(path)
    save_png(make_grid(images, nrow, labels, row_labels=row_labels), path)
    return path


# ============================================================================ matplotlib figures
def new_figure(width: float, height: float, dpi: int = 150):
    """A matplotlib Figure (Agg canvas, not registered with pyplot, so nothing leaks between calls)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy
    from matplotlib.figure import Figure  # heavy

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def curve(ax, x, y, label: str | None = None, marker: str = "o", band=None, **kwargs):
    """Line plot of y over x (a marker per point unless marker=""); `band` shades y +- band."""
    x, y = np.asarray(x), np.asarray(y)
    (line,) = ax.plot(x, y, marker=marker or None, markersize=3, linewidth=1.4, label=label, **kwargs)
    if band is not None:
        band = np.asarray(band)
        ax.fill_between(x, y - band, y + band, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def style_axes(ax, xlabel: str, ylabel: str, title: str | None = None, logx: bool = False,
               logy: bool = False, legend: bool = True) -> None:
    """Labels, title, log scales, a light grid, and a legend when some artist has a label."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)


def save_figure(fig, path: str | Path) -> Path:
    """Tight layout, PNG written atomically at `path`."""

    path = Path(path)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def heatmap_grid(maps: np.ndarray, path: str | Path, titles: Sequence[str] | None = None,
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "hot",
                 colorbar_label: str | None = None, suptitle: str | None = None,
                 background: np.ndarray | None = None, alpha: float = 0.55, cols: int | None = None) -> Path:
    """(K, h, w) maps as K panels on ceil(sqrt(K)) columns, one shared colour scale (vmin/vmax, default
    the global min/max) and one colourbar. `background`: an (H, W, 3) image in [0, 1] (or uint8) drawn
    under every map, the map stretched over it with transparency `alpha`."""
    maps = np.asarray(maps, dtype=np.float32)
    K = maps.shape[0]
    cols = cols or math.ceil(math.sqrt(K))
    rows = math.ceil(K / cols)
    vmin = float(maps.min()) if vmin is None else vmin
    vmax = float(maps.max()) if vmax is None else vmax
    fig = new_figure(1.6 * cols + 1.0, 1.6 * rows + (0.5 if suptitle else 0.2))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    im = None
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= K:
            continue
        h, w = maps[k].shape
        if background is not None:
            ax.imshow(background, extent=(0, w, h, 0), interpolation="bilinear")
            im = ax.imshow(maps[k], cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, extent=(0, w, h, 0),
                           interpolation="nearest")
        else:
            im = ax.imshow(maps[k], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    # a fixed 1.1-inch strip on the right for the shared colourbar, its tick labels and its label
    # (a fixed fraction of the width clips the label on narrow grids of few panels)
    fig_w = fig.get_figwidth()
    right = 1.0 - 1.1 / fig_w
    fig.tight_layout(rect=(0, 0, right, 1))
    if im is not None:
        cbar = fig.colorbar(im, cax=fig.add_axes((right + 0.08 / fig_w, 0.15, 0.12 / fig_w, 0.7)), format="%.3g")
        if colorbar_label:
            cbar.set_label(colorbar_label, fontsize=8)

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path

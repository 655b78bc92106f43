"""Where images come from: listing a source (`ImageList`), robust decoding (`load_rgb`) and the
`ImageDataset` that never dies on one bad file."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from flatdino_cli.errors import UserError
from flatdino_cli.utils import sha256_strings

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageList:
    """Images in a fixed order: absolute paths, integer labels (-1: unlabelled), class names by id."""

    paths: list[str]
    labels: list[int]
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.paths[i], self.labels[i]

    def subset(self, idx) -> "ImageList":
        """The images at positions `idx`, in that order (same class names and source)."""
        return ImageList([self.paths[i] for i in idx], [self.labels[i] for i in idx], self.class_names, self.source)

    def source_hash(self) -> str:
        """Identity of the list (paths + labels, in order); a store records it to refuse mixing sources."""
        return source_hash(self.paths, self.labels)


def source_hash(paths: Sequence[str], labels: Sequence[int]) -> str:
    return sha256_strings(f"{p}\t{int(l)}" for p, l in zip(paths, labels))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _dir_key(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _images_under(folder: Path, seen: set | None = None) -> list[Path]:
    """Image files below `folder`, recursively, hidden entries skipped, in sorted order.

    Symlinked folders are followed, but every real folder once (`seen` holds their (device, inode)
    across calls; `folder` itself may be in it), so a link loop or a second link to the same folder
    adds no duplicates. A file name with a newline cannot be recorded in a store's paths.txt: it is
    skipped, with a warning."""
    seen = set() if seen is None else seen
    found, dup_dirs, odd = [], 0, []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        key = _dir_key(dirpath)
        if key in seen and dirpath != str(folder):
            dirnames[:] = []
            dup_dirs += 1
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if _is_image(Path(f)):
                (odd if "\n" in f or "\n" in dirpath else found).append(Path(dirpath) / f)
    if dup_dirs:
        warnings.warn(f"{folder}: skipped {dup_dirs} folder(s) reached again through symlinks (each real folder "
                      "is read once)")
    for p in odd:
        warnings.warn(f"{str(p)!r}: skipped, a newline in a file name cannot be recorded; rename the file")
    return found


def _read_class_index(path: str | Path) -> dict[str, int]:
    """{synset: id} from a JSON file ({synset: id}, or Keras-style {"0": [synset, name]}) or from
    `LOC_synset_mapping.txt`-style lines "n01440764 tench, Tinca tinca" (id = line order)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--class-index {p}: no such file (JSON {{synset: id}} or LOC_synset_mapping.txt)")
    text = p.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if obj is None:
        lines = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
        mapping = {s: i for i, s in enumerate(lines)}
    elif isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):
        mapping = dict(obj)
    elif isinstance(obj, dict) and all(isinstance(v, list) and v for v in obj.values()):
        mapping = {v[0]: int(k) for k, v in obj.items()}
    else:
        raise UserError(f"--class-index {p}: expected JSON {{synset: id}} or {{id: [synset, name]}}")
    if len(set(mapping.values())) != len(mapping) or min(mapping.values(), default=0) < 0:
        raise UserError(f"--class-index {p}: ids must be distinct non-negative integers")
    return mapping


def _names_from_index(mapping: dict[str, int]) -> list[str]:
    names = [""] * (max(mapping.values()) + 1)
    for s, i in mapping.items():
        names[i] = s
    return names


def list_images(source: str | Path, class_index: str | Path | None = None) -> ImageList:
    """List the images of `source`, in a deterministic order.

    source: an ImageFolder tree (sorted class folders -> ids 0..K-1, or the ids of `class_index`
    for synset-named folders), a flat folder of images (labels -1), a single image, or a text file
    of `path [label]` lines (relative paths resolve against the list file's folder; the label may be
    an int or, with `class_index`, a synset; lines starting with '#' are comments; file order is kept).
    Only IMAGE_EXTS count (case-insensitive); other files are ignored.
    """
    src = Path(source).expanduser().resolve()
    mapping = _read_class_index(class_index) if class_index is not None else None
    if not src.exists():
        raise UserError(f"{source}: no such file or folder (pass an image folder, an ImageFolder tree "
                        f"or a text file of 'path label' lines)")
    if src.is_file() and _is_image(src):
        return ImageList([str(src)], [-1], [], str(src))
    if src.is_file():
        return _list_file(src, mapping)
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:  # a flat folder of images, unlabelled
        paths = _images_under(src)
        if not paths:
            raise UserError(f"{src}: no images found (extensions: {' '.join(sorted(IMAGE_EXTS))})")
        return ImageList([str(p) for p in paths], [-1] * len(paths), [], str(src))
    loose = [p for p in src.iterdir() if p.is_file() and _is_image(p)]
    if loose:
        warnings.warn(f"{src}: ignoring {len(loose)} image(s) outside the class folders (e.g. {loose[0].name})")
    if mapping is None:
        ids = {d.name: i for i, d in enumerate(class_dirs)}
        names = [d.name for d in class_dirs]
    else:
        unknown = [d.name for d in class_dirs if d.name not in mapping]
        if unknown:
            raise UserError(f"{src}: class folder '{unknown[0]}' is not in --class-index {class_index} "
                            f"({len(unknown)} unknown folder(s)); pass the matching index file")
        ids, names = mapping, _names_from_index(mapping)
    # the root and every class folder are claimed up front: a link from one class into another (or
    # to the root) must not relabel that class's images
    paths, labels, seen = [], [], {_dir_key(src), *(_dir_key(d) for d in class_dirs)}
    for d in class_dirs:
        found = _images_under(d, seen)
        paths += [str(p) for p in found]
        labels += [ids[d.name]] * len(found)
    if not paths:
        raise UserError(f"{src}: no images found in its {len(class_dirs)} class folder(s)")
    return ImageList(paths, labels, names, str(src))


def _list_file(src: Path, mapping: dict[str, int] | None) -> ImageList:
    paths, labels = [], []
    for n, raw in enumerate(src.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label, path = -1, line
        if len(parts) == 2:
            tok = parts[1]
            if tok.lstrip("-").isdigit():
                label, path = int(tok), parts[0]
            elif mapping is not None and tok in mapping:
                label, path = mapping[tok], parts[0]
        p = Path(path).expanduser()
        paths.append(str(p if p.is_absolute() else (src.parent / p).resolve()))
        labels.append(label)
    if not paths:
        raise UserError(f"{src}: no 'path label' lines found")
    if mapping is not None:
        names = _names_from_index(mapping)
    else:
        names = [str(i) for i in range(max(labels) + 1)] if max(labels) >= 0 else []
    return ImageList(paths, labels, names, str(src))


class BadImage(UserError):
    """An image file that cannot be decoded (the message names the file and the reason)."""


class BadImageWarning(UserWarning):
    """Emitted when a bad image is skipped (non-strict mode)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Alpha is composited on WHITE (torchvision's loader just drops it, which exposes whatever colour
    the file stores under transparent pixels, often black); 16-bit greyscale is scaled (/257), not
    clipped. Only images with alpha (rare in ImageNet) differ from a plain convert("RGB").
    """
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)  # 16-bit (or 32-bit int holding 16-bit values)
        a = np.clip(a, 0, 65535) / 257.0
        img = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a  # float images: [0, 1] or [0, 255]
        img = Image.fromarray(np.rint(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8), mode="L")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` fully (truncated files fail here, not later) and return an upright 8-bit RGB image.

    Raises BadImage (naming the file and reason) for anything unreadable.
    """
    try:
        with Image.open(path) as im:
            im.load()
            # camera orientation tag -> upright pixels; a JPEG/PNG without EXIF has none (skipping the
            # lookup and copy matters when decoding is the bottleneck of a small encoder)
            needs_exif = im.format not in ("JPEG", "PNG") or "exif" in im.info
            img = ImageOps.exif_transpose(im) if needs_exif else im
            return _to_rgb(img)  # the decoded pixels outlive the closed file
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadImage(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


class ImageDataset(Dataset):
    """Items (index, (3, H, W) tensor, label); a bad image gives (index, None, label) and a warning
    naming the file (or raises BadImage when strict)."""

    def __init__(self, images: ImageList, transform: Callable[[Image.Image], torch.Tensor], strict: bool = False):
        self.images, self.transform, self.strict = images, transform, strict

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, int]:
        path, label = self.images[i]
        try:
            img = load_rgb(path)
        except BadImage as e:
            if self.strict:
                raise
            warnings.warn(f"skipping unreadable image: {e}", BadImageWarning, stacklevel=2)
            return i, None, label
        return i, self.transform(img), label


class ImageBatch(NamedTuple):
    indices: torch.Tensor  # (B,) int64 rows that loaded
    images: torch.Tensor | None  # (B, 3, H, W), None if every image of the batch was bad
    labels: torch.Tensor  # (B,) int64
    skipped: torch.Tensor  # (K,) int64 rows whose image could not be read


def collate_images(batch: list[tuple[int, torch.Tensor | None, int]]) -> ImageBatch:
    """Collate ImageDataset items, dropping bad images but keeping their row indices in `skipped`."""
    good = [b for b in batch if b[1] is not None]
    return ImageBatch(
        indices=torch.tensor([b[0] for b in good], dtype=torch.long),
        images=torch.stack([b[1] for b in good]) if good else None,
        labels=torch.tensor([b[2] for b in good], dtype=torch.long),
        skipped=torch.tensor([b[0] for b in batch if b[1] is None], dtype=torch.long),
    )

"""Image sources, robust loading, encoder preprocessing, and the on-disk feature/latent store.

Sources -> `ImageList` (paths + labels) -> `ImageDataset` (never dies on one bad file) -> encoder
input tensors; encoder outputs go into a `Store` (DESIGN.md "Files on disk"): a memory-mapped
`data.npy` + `labels.npy` + `paths.txt` + a per-row progress bitmap `done.npy` + `manifest.json`.
An extract that is killed at any moment and rerun ends byte-identical to an uninterrupted one.
A store may hold V > 1 views per row (view 0: the ADM centre crop, view 1: its mirror image); then
data.npy is (count, V, *item_shape), `Store.data` is view 0 and `FeatureDataset` draws the views.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from flatdino_cli.utils import sha256_strings as hash_strings

__all__ = [
    "IMAGE_EXTS", "IMAGENET_MEAN", "IMAGENET_STD", "BadImage", "BadImageWarning", "ImageList", "list_images",
    "load_rgb", "adm_center_crop", "adm_center_crop_tensor", "random_resized_crop_flip", "to_tensor", "resize", "normalize",
    "denormalize", "encoder_input", "EncoderTransform", "ImageDataset", "ImageBatch", "collate_images",
    "JpegFile", "device_decodable", "DeviceJpegDataset", "collate_device_jpegs", "crops_on_device",
    "Store", "FeatureDataset", "epoch_views", "first_view", "split_indices", "sha256_file", "hash_strings",
]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ============================================================================ image sources
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
        return _source_hash(self.paths, self.labels)


def _source_hash(paths: Sequence[str], labels: Sequence[int]) -> str:
    return hash_strings(f"{p}\t{int(l)}" for p, l in zip(paths, labels))


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


# ============================================================================ robust loading
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


# ============================================================================ transforms
def adm_center_crop(img: Image.Image, size: int = 256) -> Image.Image:
    """ADM's center_crop_arr: BOX-halve while the short side >= 2*size, BICUBIC-resize the short
    side to `size`, then center-crop size x size."""
    if img.size == (size, size):  # already the crop: the steps below would return a copy of it
        return img
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


# The ADM crop on uint8 tensors, for images decoded where the encoder runs (nvJPEG on a GPU): Pillow's
# resampling (Resample.c) reproduced integer for integer, so a crop equals adm_center_crop's on any
# device. Pillow turns each output pixel's filter weights into 22-bit fixed point, sums weight x pixel
# in integers, rounds (+2^21, >> 22) and clips to 0..255, horizontally then vertically (uint8 between
# the passes). The integer sums (< 2^40) are exact in float64 matmuls.
_PIL_BITS = 22
_PIL_FILTERS = {  # name -> (support, filter), Pillow's box and bicubic (a = -0.5)
    "box": (0.5, lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64)),
    "bicubic": (2.0, lambda x: np.where(np.abs(x) < 1.0, (1.5 * np.abs(x) - 2.5) * x * x + 1,
                                        np.where(np.abs(x) < 2.0,
                                                 (((np.abs(x) - 5) * np.abs(x) + 8) * np.abs(x) - 4) * -0.5, 0.0))),
}


@functools.lru_cache(maxsize=512)
def _pil_weights(in_size: int, out_size: int, kind: str, device: torch.device) -> torch.Tensor:
    """(out_size, in_size) float64: Pillow's fixed-point coefficients resizing in_size -> out_size."""
    support, filt = _PIL_FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    k = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C casts truncate; lo is clamped at 0 anyway
        hi = min(int(center + support + 0.5), in_size)
        w = filt((np.arange(hi - lo) + lo - center + 0.5) * (1.0 / filterscale))
        w = w / w.sum() if w.sum() != 0.0 else w
        k[xx, lo:hi] = np.trunc(w * (1 << _PIL_BITS) + np.where(w < 0, -0.5, 0.5))
    return torch.from_numpy(k).to(device)


def _pil_resize(x: torch.Tensor, width: int, height: int, kind: str) -> torch.Tensor:
    """uint8 (3, H, W) -> (3, height, width), bit-identical to PIL's Image.resize(..., BOX/BICUBIC)."""

    def fix(v: torch.Tensor) -> torch.Tensor:  # Pillow's clip8: round, drop the fraction bits, clip
        return torch.floor((v + (1 << (_PIL_BITS - 1))) / (1 << _PIL_BITS)).clamp_(0, 255)

    y = x.double()
    if width != x.shape[2]:
        y = fix(y @ _pil_weights(x.shape[2], width, kind, x.device).T)
    if height != x.shape[1]:
        y = fix(_pil_weights(x.shape[1], height, kind, x.device) @ y)
    return y.to(torch.uint8)


def adm_center_crop_tensor(x: torch.Tensor, size: int = 256) -> torch.Tensor:
    """adm_center_crop on a uint8 (3, H, W) tensor on any device: the same steps, the same pixels."""
    h, w = x.shape[1:]
    if (w, h) == (size, size):
        return x
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        x = _pil_resize(x, w, h, "box")
    scale = size / min(w, h)
    w, h = round(w * scale), round(h * scale)
    x = _pil_resize(x, w, h, "bicubic")
    left, top = (w - size) // 2, (h - size) // 2
    return x[:, top: top + size, left: left + size]


def random_resized_crop_flip(img: Image.Image, size: int, scale: tuple[float, float] = (0.3, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             generator: torch.Generator | None = None) -> Image.Image:
    """VAE augmentation: RandomResizedCrop (torchvision's sampling rule) + horizontal flip (p=0.5).

    The crop is resized with PIL's antialiased bilinear filter (close to the authors' INTER_AREA
    when shrinking). Randomness comes from `generator` (torch's global RNG if None).
    """
    W, H = img.size
    u = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    box = None
    for _ in range(10):
        area = H * W * (scale[0] + (scale[1] - scale[0]) * u())
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (), generator=generator))
            left = int(torch.randint(0, W - w + 1, (), generator=generator))
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fallback: the largest central crop with an allowed aspect ratio
        w, h = W, H
        if W / H < ratio[0]:  # too tall
            h = min(H, round(W / ratio[0]))
        elif W / H > ratio[1]:  # too wide
            w = min(W, round(H * ratio[1]))
        box = ((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)
    out = img.resize((size, size), resample=Image.BILINEAR, box=box)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if u() < 0.5 else out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def resize(x: torch.Tensor, size: int, interp: str = "bicubic") -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) -> size x size with antialias (as the authors' jax.image.resize).

    Bicubic may overshoot [0, 1] slightly; like the authors (who resize normalised pixels) we keep it.
    """
    if interp not in ("bicubic", "bilinear"):
        raise ValueError(f"interp must be 'bicubic' or 'bilinear', got {interp!r}")
    if x.shape[-2:] == (size, size):
        return x
    batched = x.dim() == 4
    y = F.interpolate(x if batched else x[None], size=(size, size), mode=interp, align_corners=False,
                      antialias=True)
    return y if batched else y[0]


@functools.lru_cache(maxsize=None)
def _mean_std(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(3, 1, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (..., 3, H, W) pixels in [0, 1]."""
    mean, std = _mean_std(x.dtype, x.device)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(x.dtype, x.device)
    return x * std + mean


def encoder_input(img: Image.Image, crop_size: int, input_size: int, interp: str = "bicubic") -> torch.Tensor:
    """The generator/extract pipeline: ADM center crop -> resize to the encoder input -> normalise.
    Returns (3, input_size, input_size) float32."""
    return EncoderTransform(crop_size, input_size, interp)(img)


@dataclass(frozen=True)
class EncoderTransform:
    """Picklable PIL -> normalised (3, input_size, input_size) transform for DataLoader workers.

    augment=False: `encoder_input` (ADM crop). augment=True: RandomResizedCrop(crop_size, scale)
    + flip instead of the ADM crop (VAE training on images), using torch's global RNG.
    """

    crop_size: int
    input_size: int
    interp: str = "bicubic"
    augment: bool = False
    scale: tuple[float, float] = (0.3, 1.0)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.finish(self.pixels(img))

    # The two halves, for loaders that move uint8 crops and finish whole batches where the encoder
    # runs (a quarter of the bytes through workers and to the GPU; one vectorised op per batch).
    def pixels(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> its (3, crop_size, crop_size) uint8 crop."""
        crop = random_resized_crop_flip(img, self.crop_size, self.scale) if self.augment else \
            adm_center_crop(img, self.crop_size)
        return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops (..., 3, crop, crop) -> normalised float32 (..., 3, input_size, input_size)."""
        return normalize(resize(x.float().div_(255), self.input_size, self.interp))

    def spec(self) -> dict:
        """What a store's manifest records as `preprocessing`."""
        return {"crop": "random_resized_crop_flip" if self.augment else "adm_center_crop",
                "crop_size": self.crop_size, "input_size": self.input_size, "interp": self.interp,
                "antialias": True, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "alpha": "composite_on_white", **({"scale": list(self.scale)} if self.augment else {})}


# ============================================================================ datasets
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


# ---------------------------------------------------------------------------- JPEGs decoded on the device
class JpegFile(NamedTuple):
    """An encoded JPEG, left for decoding where the encoder runs (a DeviceJpegDataset item)."""

    data: torch.Tensor  # (n,) uint8, the file's bytes


def device_decodable(data: bytes) -> bool:
    """A baseline/progressive JPEG of 1 or 3 components without EXIF: nvJPEG's pixels are then the
    ones Pillow decodes (EXIF may rotate, CMYK/YCCK convert differently: those stay on the CPU)."""
    if data[:2] != b"\xff\xd8" or b"Exif\x00\x00" in data[:65536]:
        return False
    i = 2
    while i + 9 < len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2: i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: the component count is its 8th byte
            return data[i + 9] in (1, 3)
        i += 2 + length
    return False


class DeviceJpegDataset(ImageDataset):
    """ImageDataset whose device-decodable JPEGs come as JpegFile (file bytes, read in the worker);
    every other file takes ImageDataset's CPU path (Pillow decode + transform)."""

    def __getitem__(self, i: int):
        path, label = self.images[i]
        try:
            data = Path(path).read_bytes()
        except OSError:
            return super().__getitem__(i)  # reported as unreadable there
        if device_decodable(data):
            return i, JpegFile(torch.frombuffer(bytearray(data), dtype=torch.uint8)), label
        return super().__getitem__(i)


def collate_device_jpegs(batch: list) -> ImageBatch:
    """collate_images for DeviceJpegDataset: `images` is the list of crops and JpegFiles (decoded by
    crops_on_device)."""
    good = [b for b in batch if b[1] is not None]
    return ImageBatch(indices=torch.tensor([b[0] for b in good], dtype=torch.long),
                      images=[b[1] for b in good] if good else None,
                      labels=torch.tensor([b[2] for b in good], dtype=torch.long),
                      skipped=torch.tensor([b[0] for b in batch if b[1] is None], dtype=torch.long))


def crops_on_device(batch: ImageBatch, crop_size: int, device: torch.device) -> ImageBatch:
    """A collate_device_jpegs batch with its JPEGs decoded on `device` in one batched call (nvJPEG on
    CUDA) and ADM-cropped there: images (B, 3, crop, crop) uint8 on `device`, the same pixels as the
    CPU path. A JPEG the batch call cannot decode is retried alone, then with Pillow; an unreadable one
    joins `skipped`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    items = batch.images
    if items is None:
        return batch
    jpegs = [k for k, it in enumerate(items) if isinstance(it, JpegFile)]
    try:
        decoded = decode_jpeg([items[k].data for k in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:  # one bad file fails the whole call
        decoded = []
        for k in jpegs:
            try:
                decoded.append(decode_jpeg(items[k].data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    crops, bad = list(items), []
    for k, img in zip(jpegs, decoded):
        if img is None:
            try:
                img = torch.from_numpy(np.asarray(load_rgb(io.BytesIO(items[k].data.numpy().tobytes())),
                                                  dtype=np.uint8).copy()).permute(2, 0, 1).to(device)
            except BadImage:
                bad.append(k)
                continue
        crops[k] = adm_center_crop_tensor(img, crop_size)
    keep = [k for k in range(len(items)) if k not in bad]
    images = torch.stack([crops[k].to(device) for k in keep]) if keep else None
    return ImageBatch(batch.indices[keep], images, batch.labels[keep],
                      torch.cat([batch.skipped, batch.indices[bad]]))


# ============================================================================ the store
FORMAT_VERSION = 1
PENDING, DONE, SKIPPED = 0, 1, 2  # done.npy values
_STORE_FILES = ("manifest.json", "data.npy", "labels.npy", "paths.txt", "done.npy")
# what must agree for a rerun to resume an existing store instead of refusing it
_IDENTITY_KEYS = ("format_version", "kind", "item_shape", "dtype", "count", "identity", "preprocessing",
                  "source_hash", "views")


def _jsonable(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists etc., so comparisons see what is on disk


def _diff(have, want, prefix: str) -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        return [d for k in sorted(set(have) | set(want)) for d in _diff(have.get(k), want.get(k), f"{prefix}.{k}")]
    return [] if have == want else [f"{prefix} ({have!r} on disk, {want!r} now)"]


def _runs(sorted_idx: np.ndarray):
    """(start, stop) position ranges of consecutive values in a sorted index array."""
    cuts = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    bounds = np.concatenate([[0], cuts, [len(sorted_idx)]])
    return zip(bounds[:-1].tolist(), bounds[1:].tolist())


def _pwrite_all(fd: int, buf: bytes | memoryview, offset: int) -> None:
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _new_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    m = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # header + sparse zeros
    m.flush()
    del m


def first_view(data: np.ndarray) -> np.ndarray:
    """(count, *item) of a store's data.npy: view 0 of a multi-view (count, V, P, C) array."""
    return data[:, 0] if data.ndim == 4 else data


def epoch_views(seed: int, epoch: int, count: int, views: int) -> np.ndarray:
    """(count,) uint8: the view each store row shows in `epoch`, a function of (seed, epoch, row) only."""
    return np.random.default_rng([seed, epoch]).integers(0, views, size=count, dtype=np.uint8)


class Store:
    """Rows of encoder features or VAE latents on disk; see the module docstring and DESIGN.md.

    Attributes: path, manifest, count, item_shape, views, dtype, all_views ((count, *row_shape)
    read-only memmap; row_shape = (views, *item_shape) if views > 1 else item_shape), data (view 0,
    (count, *item_shape)), labels ((count,) int64), paths (list[str]), status ((count,) uint8:
    0 pending, 1 done, 2 skipped = unreadable image, row left as zeros).
    """

    def __init__(self, path: Path, manifest: dict, writable: bool):
        self.path, self.manifest, self.writable = path, manifest, writable
        self.count = int(manifest["count"])
        self.item_shape = tuple(manifest["item_shape"])
        self.views = int(manifest.get("views", 1))  # stores written before the view axis hold one
        self.row_shape = (self.views, *self.item_shape) if self.views > 1 else self.item_shape
        self.dtype = np.dtype(manifest["dtype"])
        try:
            self.all_views = np.load(path / "data.npy", mmap_mode="r")
            self.labels = np.load(path / "labels.npy")
            self.status = np.array(np.load(path / "done.npy", mmap_mode="r"))
            self.paths = (path / "paths.txt").read_text().split("\n")[:-1]  # not splitlines: \r is legal in names
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: store files are damaged ({e}); rerun with --overwrite") from None
        if (self.all_views.shape != (self.count, *self.row_shape) or self.all_views.dtype != self.dtype
                or self.labels.shape != (self.count,) or self.status.shape != (self.count,)
                or len(self.paths) != self.count):
            raise UserError(f"{path}: store files disagree with manifest.json; rerun with --overwrite")
        self.data = first_view(self.all_views)
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape))
        self._data_fd = self._done_fd = None
        if writable:
            self._data_offset = self.all_views.offset
            self._done_offset = np.load(path / "done.npy", mmap_mode="r").offset
            self._data_fd = os.open(path / "data.npy", os.O_RDWR)
            self._done_fd = os.open(path / "done.npy", os.O_RDWR)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path: str | Path, kind: str, item_shape: Sequence[int], count: int, dtype: str,
               identity: dict, preprocessing: dict, paths: Sequence[str], labels: Sequence[int],
               extra: dict | None = None, overwrite: bool = False, views: int = 1) -> "Store":
        """A writable store at `path`: a new one, or the existing one (resumed) if its manifest agrees.
        views > 1: each row holds that many views of its image (rows of shape (views, *item_shape)).

        A disagreeing existing store is refused with a UserError unless overwrite=True, which
        replaces the store's own files (nothing else in the folder is touched).
        """
        path = Path(path).expanduser()
        if kind not in ("features", "latents"):
            raise ValueError(f"kind must be 'features' or 'latents', got {kind!r}")
        if dtype not in ("float16", "float32"):
            raise UserError(f"store dtype must be float16 or float32, got {dtype!r}")
        if count < 1 or len(paths) != count or len(labels) != count:
            raise ValueError(f"count={count} but {len(paths)} paths and {len(labels)} labels")
        if any("\n" in p for p in paths):
            raise ValueError("paths must not contain newlines")
        manifest = _jsonable({
            "format_version": FORMAT_VERSION, "kind": kind, "item_shape": list(item_shape), "dtype": dtype,
            "count": count, "identity": identity, "preprocessing": preprocessing,
            "source_hash": _source_hash(paths, labels), "complete": False, "skipped": [], "skipped_count": 0,
            "extra": extra or {}, "views": views,
        })
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file; a store is a folder: choose another --out")
        mf = path / "manifest.json"
        if mf.exists() and not overwrite:
            have = cls._read_manifest(path)
            diffs = [d for k in _IDENTITY_KEYS for d in _diff({"views": 1, **have}.get(k), manifest[k], k)]
            if diffs:
                raise UserError(f"{path}: an existing store differs in {'; '.join(diffs)}; pass --overwrite "
                                f"to replace it (or choose another --out)")
            return cls(path, have, writable=True)
        # new store (or overwrite, or a creation that died before its manifest): manifest goes first,
        # so a crash while wiping leaves files that the next create recognises as replaceable
        path.mkdir(parents=True, exist_ok=True)
        for name in _STORE_FILES:
            (path / name).unlink(missing_ok=True)
        buf = io.BytesIO()
        np.save(buf, np.asarray(labels, dtype=np.int64))
        atomic_write_bytes(path / "labels.npy", buf.getvalue())
        atomic_write_text(path / "paths.txt", "".join(f"{p}\n" for p in paths))
        # open_memmap sizes the files sparsely: untouched rows read as zeros, which is what skipped rows hold
        _new_npy(path / "data.npy", np.dtype(dtype), (count, *((views,) if views > 1 else ()), *item_shape))
        _new_npy(path / "done.npy", np.dtype(np.uint8), (count,))
        atomic_write_json(mf, manifest)  # last: its presence means the files above are complete
        return cls(path, manifest, writable=True)

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            m = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: not a store (no manifest.json); make one with `flatdino extract`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}/manifest.json is unreadable ({e}); rerun extract with --overwrite") from None
        if m.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: store format version {m.get('format_version')!r}, this flatdino reads "
                            f"{FORMAT_VERSION}; re-extract it with --overwrite")
        return m

    @classmethod
    def open(cls, path: str | Path, expect_kind: str | None = None) -> "Store":
        """A finished store, read-only. UserError if missing, incomplete or of the wrong kind."""
        path = Path(path).expanduser()
        m = cls._read_manifest(path)
        if expect_kind is not None and m.get("kind") != expect_kind:
            raise UserError(f"{path}: holds {m.get('kind')}, expected {expect_kind} (check the path)")
        store = cls(path, m, writable=False)
        n_left = int((store.status == PENDING).sum())
        if not m.get("complete") or n_left:
            raise UserError(f"{path}: incomplete store ({store.count - n_left} of {store.count} rows done); "
                            f"rerun the same extract command to finish it")
        return store

    # ------------------------------------------------------------------ writing
    def _need_writable(self) -> None:
        if not self.writable:
            raise RuntimeError(f"{self.path}: store opened read-only")

    def write_rows(self, indices, array) -> None:
        """Write rows `indices` (any order, unique) from `array` (len(indices), *row_shape), cast to
        the store dtype. Raises ValueError on non-finite values (e.g. float16 overflow)."""
        self._need_writable()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(array, torch.Tensor):  # cast where the tensor lives (GPU: fast, half the copy)
            array = array.detach().to(getattr(torch, self.dtype.name)).cpu().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught (and refused) below
            arr = np.asarray(array).astype(self.dtype, copy=False)
        if arr.shape != (len(idx), *self.row_shape):
            raise ValueError(f"rows have shape {arr.shape}, expected {(len(idx), *self.row_shape)}")
        if len(idx) == 0:
            return
        order = np.argsort(idx, kind="stable")
        idx, arr = idx[order], np.ascontiguousarray(arr[order])
        if idx[0] < 0 or idx[-1] >= self.count or (np.diff(idx) == 0).any():
            raise ValueError(f"row indices must be unique and in [0, {self.count})")
        if not np.isfinite(arr).all():
            bad = idx[~np.isfinite(arr.reshape(len(idx), -1)).all(1)]
            raise ValueError(f"non-finite values in rows {bad[:8].tolist()} (as {self.dtype}); not written")
        for a, b in _runs(idx):
            _pwrite_all(self._data_fd, memoryview(arr[a:b]).cast("B"), self._data_offset + int(idx[a]) * self._row_bytes)

    def mark_done(self, indices, status: int = DONE) -> None:
        """Flag rows finished. Data is fsynced before the bitmap is written, so no kill or crash ever
        leaves a row flagged whose data is not on disk."""
        self._need_writable()
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(idx) == 0:
            return
        os.fdatasync(self._data_fd)
        self.status[idx] = status
        for a, b in _runs(idx):
            lo, hi = int(idx[a]), int(idx[b - 1]) + 1
            _pwrite_all(self._done_fd, self.status[lo:hi].tobytes(), self._done_offset + lo)
        os.fdatasync(self._done_fd)

    def mark_skipped(self, indices) -> None:
        """Rows whose input could not be read: filled with zeros and flagged 2 (kept out of training)."""
        idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if len(idx):
            self.write_rows(idx, np.zeros((len(idx), *self.row_shape), self.dtype))
            self.mark_done(idx, SKIPPED)

    def pending(self) -> np.ndarray:
        """(K,) int64 row indices not yet done, ascending."""
        return np.flatnonzero(self.status == PENDING)

    def valid_indices(self) -> np.ndarray:
        """(K,) int64 rows that hold real data (done and not skipped)."""
        return np.flatnonzero(self.status == DONE)

    def finalize(self, skipped: Sequence[int] | None = None, extra: dict | None = None) -> "Store":
        """Mark `skipped` rows (if any), check every row is done, write the final manifest."""
        self._need_writable()
        if skipped is not None:
            self.mark_skipped(skipped)
        # re-read the bitmap: other processes (torchrun ranks) may have finished rows of their own
        self.status = np.array(np.load(self.path / "done.npy", mmap_mode="r"))
        left = self.pending()
        if len(left):
            raise RuntimeError(f"{self.path}: {len(left)} rows still pending (first {left[:5].tolist()})")
        bad = np.flatnonzero(self.status == SKIPPED).tolist()
        m = dict(self.manifest, complete=True, skipped=[{"index": i, "path": self.paths[i]} for i in bad],
                 skipped_count=len(bad))
        if extra:
            m["extra"] = _jsonable({**m.get("extra", {}), **extra})
        atomic_write_json(self.path / "manifest.json", m)
        self.manifest = m
        return self

    def manifest_hash(self) -> str:
        """sha256 of manifest.json: what downstream runs record as 'the input I used'."""
        return sha256_file(self.path / "manifest.json")

    def close(self) -> None:
        for fd in (self._data_fd, self._done_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._done_fd = None
        self.writable = False

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def store_identity(store: Store) -> dict:
    """What makes two stores the same data: kind, encoder (+ weights hash), preprocessing, source list.

    A run records it (inputs.json `data_identity`) and refuses to resume on a store that differs."""
    m = store.manifest
    return {"kind": m["kind"], "encoder": m["identity"], "preprocessing": m["preprocessing"],
            "source_hash": m["source_hash"]}


class FeatureDataset(Dataset):
    """Items ((*item_shape) float32 tensor, label) over store rows; skipped rows are left out.

    Of a multi-view store: view 0 (the centre crop), or with `view_seed` the view drawn for each row
    by `epoch_views(view_seed, epoch, ...)` after `set_epoch(epoch)`; `all_views=True` gives whole
    rows (*row_shape). Holds the store's path, not its memmap, so it pickles cheaply into workers.
    """

    def __init__(self, store: Store, indices: Sequence[int] | None = None, view_seed: int | None = None,
                 all_views: bool = False):
        idx = store.valid_indices() if indices is None else np.asarray(indices, dtype=np.int64)
        self.indices = idx[store.status[idx] == DONE]
        self.labels = store.labels[self.indices]
        self.data_path = store.path / "data.npy"
        self.count, self.views, self.view_seed, self.all_views = store.count, store.views, view_seed, all_views
        self.row_views: np.ndarray | None = None  # (count,) view per store row this epoch
        self._data = None

    def set_epoch(self, epoch: int) -> None:
        if self.view_seed is not None and self.views > 1:
            self.row_views = epoch_views(self.view_seed, epoch, self.count, self.views)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._data is None:
            self._data = np.load(self.data_path, mmap_mode="r")
        r = self.indices[i]
        if self.views > 1 and not self.all_views:
            r = (r, 0 if self.row_views is None else int(self.row_views[r]))
        row = np.array(self._data[r], dtype=np.float32)  # a writable copy
        return torch.from_numpy(row), int(self.labels[i])

    def __getstate__(self):
        return {**self.__dict__, "_data": None}


def split_indices(count: int, val_count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) split of range(count): val_count random rows, both sorted."""
    if not 0 <= val_count < count:
        raise UserError(f"validation size {val_count} must be in [0, {count}) for {count} rows")
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[val_count:]), np.sort(perm[:val_count])

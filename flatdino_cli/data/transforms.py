"""Encoder preprocessing: the ADM centre crop (on PIL images, and pixel-exact on uint8 tensors on any
device), the authors' k-NN transform (the whole image resized, no crop), the VAE's random crop + flip,
resizing and ImageNet normalisation."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# The authors' k-NN transform (noctrog/flatdino eval/knn.py: FlatDinoValAugmentations on train and val):
# albumentations' Resize of the WHOLE image to size x size (aspect ratio not kept, no crop) with cv2's
# INTER_AREA when the dataset's images are at least `size` (ImageNet and most of Table 10) and INTER_LINEAR
# when they are smaller (CIFAR). Reproduced here with cv2's own per-axis coefficients, in float64, rounded
# once: within one grey level of cv2 (which rounds its fixed-point passes), without depending on OpenCV.
WHOLE_IMAGE_INTERPS = ("area", "bilinear")


@functools.lru_cache(maxsize=512)
def _cv2_weights(in_size: int, out_size: int, kind: str, decimate: bool) -> tuple[np.ndarray, np.ndarray]:
    """cv2.resize's coefficients along one axis as (taps index (out, K), weights (out, K)) float64.

    area + decimate (both sides shrink or stay): each output pixel averages the input pixels its
    footprint [o*s, (o+1)*s) covers, weighted by the overlap (cv2's resizeArea). area otherwise: cv2's
    two-tap area weights (1 - f, f) on floor(o*s) and the next pixel. bilinear: INTER_LINEAR, pixel
    centres aligned, edges clamped."""
    s, o = in_size / out_size, np.arange(out_size)
    if kind == "area" and decimate:
        j = np.arange(in_size)
        k = np.clip(np.minimum(o[:, None] * s + s, j + 1) - np.maximum(o[:, None] * s, j), 0, None) / s
        lo = (k > 0).argmax(1)  # first covered pixel
        taps = int(math.ceil(s)) + 1
        idx = lo[:, None] + np.arange(taps)
        w = np.where(idx < in_size, np.take_along_axis(k, np.minimum(idx, in_size - 1), 1), 0.0)
        return np.minimum(idx, in_size - 1), w
    if kind == "area":
        sx = np.floor(o * s)
        f = (o + 1) - (sx + 1) / s
        f = np.where(f <= 0, 0.0, f - np.floor(f))
    else:
        x = (o + 0.5) * s - 0.5
        sx = np.floor(x)
        f = np.where(sx < 0, 0.0, x - sx)
        sx = np.maximum(sx, 0)
    idx = np.minimum(np.stack([sx, sx + 1], 1).astype(np.int64), in_size - 1)
    return idx, np.stack([1 - f, f], 1)


def whole_image_resize(img: Image.Image, size: int, interp: str = "area") -> Image.Image:
    """The authors' k-NN transform: the whole image resized to size x size (no crop, aspect ratio not
    kept), with cv2's INTER_AREA (interp "area") or INTER_LINEAR ("bilinear") coefficients."""
    if interp not in WHOLE_IMAGE_INTERPS:
        raise ValueError(f"interp must be one of {WHOLE_IMAGE_INTERPS}, got {interp!r}")
    W, H = img.size
    if (W, H) == (size, size):
        return img
    decimate = W >= size and H >= size  # cv2 averages areas only when no side grows
    (ih, wh), (iw, ww) = _cv2_weights(H, size, interp, decimate), _cv2_weights(W, size, interp, decimate)
    a = np.asarray(img, dtype=np.float64)  # (H, W, 3)
    a = (a[ih] * wh[:, :, None, None]).sum(1)  # rows: (size, W, 3)
    a = (a[:, iw] * ww[None, :, :, None]).sum(2)  # columns: (size, size, 3)
    # halves round up, as cv2's integer area sums (+1e-6: a float sum of thirds can land just under a half)
    return Image.fromarray(np.clip(np.floor(a + 0.5 + 1e-6), 0, 255).astype(np.uint8))


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
    whole_image=True: the authors' evaluation transform instead of the ADM crop: the whole image resized
    to crop_size x crop_size (interp "area" or "bilinear", as cv2), then, if the encoder input differs,
    antialiased bilinear to input_size (their jax.image.resize). Their k-NN feeds the 256-px image itself
    (input_size == crop_size: DINOv2/14 sees 18 x 18 = 324 patches).
    """

    crop_size: int
    input_size: int
    interp: str = "bicubic"
    augment: bool = False
    scale: tuple[float, float] = (0.3, 1.0)
    whole_image: bool = False

    def __post_init__(self):
        if self.whole_image and (self.augment or self.interp not in WHOLE_IMAGE_INTERPS):
            raise ValueError(f"whole_image: no augment, interp in {WHOLE_IMAGE_INTERPS}; got {self}")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.finish(self.pixels(img))

    # The two halves, for loaders that move uint8 crops and finish whole batches where the encoder
    # runs (a quarter of the bytes through workers and to the GPU; one vectorised op per batch).
    def pixels(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> its (3, crop_size, crop_size) uint8 crop."""
        if self.whole_image:
            crop = whole_image_resize(img, self.crop_size, self.interp)
        elif self.augment:
            crop = random_resized_crop_flip(img, self.crop_size, self.scale)
        else:
            crop = adm_center_crop(img, self.crop_size)
        return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops (..., 3, crop, crop) -> normalised float32 (..., 3, input_size, input_size)."""
        interp = "bilinear" if self.whole_image else self.interp  # after a whole-image resize: jax's linear
        return normalize(resize(x.float().div_(255), self.input_size, interp))

    def spec(self) -> dict:
        """What a store's manifest records as `preprocessing`."""
        crop = ("whole_image_resize" if self.whole_image else
                "random_resized_crop_flip" if self.augment else "adm_center_crop")
        return {"crop": crop, "crop_size": self.crop_size, "input_size": self.input_size, "interp": self.interp,
                "antialias": not (self.whole_image and self.interp == "bilinear"),  # cv2's INTER_LINEAR has none
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "alpha": "composite_on_white",
                **({"scale": list(self.scale)} if self.augment else {}),
                **({"resampling": "cv2 INTER_AREA" if self.interp == "area" else "cv2 INTER_LINEAR",
                    "to_input": "bilinear, antialias"} if self.whole_image else {})}


def is_whole_image(preprocessing: dict | None) -> bool:
    """Whether a store's recorded preprocessing is the authors' k-NN transform (whole image, no crop)."""
    return (preprocessing or {}).get("crop") == "whole_image_resize"

"""JPEGs decoded where the encoder runs (nvJPEG on a GPU): the loader ships file bytes, the device
decodes and ADM-crops whole batches, with the CPU path's pixels."""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from flatdino_cli.data.sources import BadImage, ImageBatch, ImageDataset, load_rgb
from flatdino_cli.data.transforms import adm_center_crop_tensor


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
    from torchvision.io import ImageReadMode, decode_jpeg  # heavy

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

"""Image sources, robust loading, encoder preprocessing, and the on-disk feature/latent store.

Sources -> `ImageList` (paths + labels) -> `ImageDataset` (never dies on one bad file) -> encoder
input tensors (transforms.py); encoder outputs go into a `Store` (store.py). jpeg.py decodes JPEGs
where the encoder runs; shapes.py fits a network's config to a store's shape (or checks it against
it); pairs.py pairs the pixel decoder's target images with their features. The public names are
re-exported here: `from flatdino_cli.data import X` (pairs.py, one stage's, is imported by name).
"""

from flatdino_cli.data.jpeg import DeviceJpegDataset, JpegFile, collate_device_jpegs, crops_on_device, device_decodable
from flatdino_cli.data.sources import (IMAGE_EXTS, BadImage, BadImageWarning, ImageBatch, ImageDataset, ImageList,
                                       collate_images, list_images, load_rgb, source_hash)
from flatdino_cli.data.shapes import check_feature_shape, with_store_shape
from flatdino_cli.data.store import (DONE, PENDING, SKIPPED, SUBSET_SEED, FeatureDataset, Store, epoch_views,
                                     first_view, split_indices, store_identity, subset_rows)
from flatdino_cli.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EncoderTransform, adm_center_crop,
                                          adm_center_crop_tensor, denormalize, encoder_input, is_whole_image,
                                          normalize, random_resized_crop_flip, resize, to_tensor,
                                          whole_image_resize)

__all__ = [
    "IMAGE_EXTS", "IMAGENET_MEAN", "IMAGENET_STD", "BadImage", "BadImageWarning", "ImageList", "list_images",
    "source_hash", "load_rgb", "adm_center_crop", "adm_center_crop_tensor", "random_resized_crop_flip", "to_tensor",
    "resize", "whole_image_resize", "is_whole_image", "normalize", "denormalize", "encoder_input", "EncoderTransform",
    "ImageDataset", "ImageBatch",
    "collate_images", "JpegFile", "device_decodable", "DeviceJpegDataset", "collate_device_jpegs", "crops_on_device",
    "Store", "FeatureDataset", "epoch_views", "first_view", "split_indices", "store_identity", "SUBSET_SEED",
    "subset_rows", "with_store_shape", "check_feature_shape",
    "PENDING", "DONE", "SKIPPED",
]

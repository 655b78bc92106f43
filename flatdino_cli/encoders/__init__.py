"""Frozen DINOv2-with-registers encoders (timm): the feature output and where the weights come from.

specs.py names the encoders, keys.py reads weight files and maps their key layouts to timm's,
hf_cache.py finds (or, when safe, downloads) the pretrained weights in the Hugging Face cache.

The feature every stage consumes (DESIGN.md "Conventions", INTEROP.md A1): last block output ->
LayerNorm WITHOUT affine (eps 1e-6) -> drop CLS + 4 registers -> (B, N, C) float32, N = grid h*w.
Input: images already resized to `spec.image_size` and normalised with ImageNet mean/std
(`flatdino_cli.data.normalize`; data/transforms.py owns the transforms).

Weights for `load_encoder(name, weights)`:
- `weights=FILE` (.safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True)) in the timm,
  the Hugging Face `Dinov2WithRegistersModel` or Meta's DINOv2 layout (keys.py).
- `weights=DIR`, a diffusers AutoencoderRAE folder: its encoder, with the sizes of its config.json
  (interop/diffusers.py).
- no file, a spec with hub repos (dinov2-b-reg4): the Hugging Face cache, never timm's download with its
  minute of retries; a miss downloads only when the hub provably answers (hf_cache.py).
- no file, no hub repos (tiny): random init from the spec's fixed seed, identical in every process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from flatdino_cli.encoders.hf_cache import pretrained_file
from flatdino_cli.encoders.keys import load_into, read_state_dict
from flatdino_cli.encoders.specs import NUM_PREFIX_TOKENS, EncoderSpec, get_spec
from flatdino_cli.interop import diffusers as rae_folder
from flatdino_cli.nn.embed import sincos_2d
from flatdino_cli.utils import sha256_file


def _build_vit(spec: EncoderSpec) -> nn.Module:
    """The timm model for `spec`, randomly initialised from `spec.seed` without touching the global RNG."""
    import timm  # heavy

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=spec.image_size,
                                 patch_size=spec.patch_size, embed_dim=spec.dim, depth=spec.depth,
                                 num_heads=spec.heads)


# Position share of a random-init encoder's features. Trained DINOv2 features carry the patch position
# strongly (their PCA shows smooth positional components); timm's random pos_embed (std 0.02 against a
# patch embedding of std ~0.6) carries almost none, and the VAE encoder, which has no position
# embedding of its own (as in the authors' code), would then see a near-unordered set of patches.
RANDOM_INIT_POSITION_SCALE = 0.5  # sin-cos entries have std ~0.7: position ~ half the feature signal


def _give_position(model: nn.Module, spec: EncoderSpec) -> None:
    """A smooth 2-D sin-cos position embedding in place of timm's near-zero random one."""
    g = spec.image_size // spec.patch_size
    with torch.no_grad():
        model.pos_embed.copy_(RANDOM_INIT_POSITION_SCALE * sincos_2d(g, g, spec.dim).view_as(model.pos_embed))


class FrozenEncoder(nn.Module):
    """Frozen timm DINOv2-reg4: normalised images (B, 3, S, S) -> patch features (B, N, C) float32."""

    def __init__(self, model: nn.Module, spec: EncoderSpec, weights_id: str):
        super().__init__()
        if model.num_prefix_tokens != NUM_PREFIX_TOKENS:
            raise ValueError(f"{spec.arch}: {model.num_prefix_tokens} prefix tokens, expected {NUM_PREFIX_TOKENS}")
        # timm's forward_features ends with the final norm; a non-affine LN in its place makes it return
        # exactly last-block -> LN(no gamma/beta) through timm's public path (pretrained gamma/beta unused)
        model.norm = nn.LayerNorm(spec.dim, eps=model.norm.eps, elementwise_affine=False)
        self.model = model.eval().requires_grad_(False)
        self.spec, self.grid, self.num_patches, self.dim = spec, spec.grid, spec.num_patches, spec.dim
        self.num_prefix_tokens = model.num_prefix_tokens
        self.weights_id = weights_id  # what a store manifest records as the weights' identity

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # frozen: always eval, whatever the caller's loop does

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.spec.image_size
        if images.dim() != 4 or tuple(images.shape[-3:]) != (3, s, s):
            raise ValueError(f"encoder {self.spec.name} expects (B, 3, {s}, {s}) images, got {tuple(images.shape)}")
        x = self.model.forward_features(images)  # (B, P + N, C), already non-affine LayerNormed
        return x[:, self.num_prefix_tokens:].float()  # (B, N, C)


def default_crop_size(encoder) -> int:
    """ADM center crop to 256 for the 224-px DINOv2 (REFERENCE.md); the input size for smaller encoders."""
    return 256 if encoder.spec.image_size == 224 else encoder.spec.image_size


def load_encoder(name: str | EncoderSpec, weights: str | Path | None = None, device="cpu",
                 input_size: int | None = None) -> FrozenEncoder:
    """A frozen encoder by name (or spec), with weights from `weights`, the HF cache, or the fixed seed.
    input_size: run it on images of that side instead of the spec's (the weights' position table resampled
    once to the new patch grid; 256 px -> 18 x 18 patches at patch 14, as the authors' k-NN)."""
    spec = name if isinstance(name, EncoderSpec) else get_spec(name)
    if weights is not None and rae_folder.is_rae_folder(Path(weights).expanduser()):
        # an AutoencoderRAE folder: its config gives the sizes, its encoder.* tensors are HF-layout DINOv2
        path = Path(weights).expanduser()
        spec = dataclasses.replace(spec, **rae_folder.encoder_sizes(path), hub_repos=(),
                                   description=f"DINOv2-with-registers encoder of the AutoencoderRAE folder {path}")
        sd, source = rae_folder.encoder_state_dict(path), f"--encoder-weights {path}"
        wid = f"sha256:{sha256_file(rae_folder.weights_path(path))}"
    elif weights is not None:
        path = Path(weights).expanduser()
        # the content hash, not the path: a store refuses other weights, and accepts a moved file
        sd, source, wid = read_state_dict(path), f"--encoder-weights {path}", f"sha256:{sha256_file(path)}"
    elif spec.hub_repos:
        path = pretrained_file(spec)  # resolved before building the model: a miss fails fast
        sd, source = read_state_dict(path, "cached weights"), f"cached weights {path}"
        repo = path.parent.parent.parent.name.removeprefix("models--").replace("--", "/")
        wid = f"hf:{repo}@{path.parent.name}"  # cache layout: models--org--name/snapshots/<rev>/file
    else:
        sd, source, wid = None, "", f"random-init(seed={spec.seed}, sincos-pos x{RANDOM_INIT_POSITION_SCALE}): for testing only"
    if input_size:
        spec = dataclasses.replace(spec, image_size=input_size)
    model = _build_vit(spec)
    if sd is not None:
        load_into(model, sd, source, spec)
    else:
        _give_position(model, spec)
    return FrozenEncoder(model, spec, wid).to(device)

"""Discriminators for the decoder's GAN term: images (B, 3, H, W) in [-1, 1] -> patch logits (B, N).

- `PatchDiscriminator` (default, `--disc patch`): a small trainable PatchGAN-style conv net (spectral
  norm, LeakyReLU 0.2). Needs no weights, so it works offline and on CPU at toy scale.
- `ViTDiscriminator` (`--disc dino-s8`): RAE's choice (INTEROP.md A4). A frozen ViT backbone (DINO
  ViT-S/8, timm `vit_small_patch8_224.dino`) seen at 224 px, with trainable 1-D conv heads on the
  tokens after blocks 2, 5, 8, 11 and on the final block output (5 heads; RAE's "final output" is the
  un-normed last block, so block 11 is seen twice). Heads: SNConv1d(k=1) + norm + LReLU, a residual
  SNConv1d(k=9, circular) block scaled by 1/sqrt(2), SNConv1d -> 1. RAE's per-sample BatchNormLocal
  over tokens is InstanceNorm1d with affine. The backbone is pluggable (any timm ViT with
  `forward_intermediates`) and is kept out of the state dict: checkpoints hold only the heads.
  Differences from RAE: timm's blocks use exact GELU (RAE's copy uses the tanh approximation); RAE's
  zeroing of the qkv key bias is skipped because a key bias shifts every logit of a query equally and
  cancels in the softmax. Weights come only from `--disc-weights FILE` or the Hugging Face cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from flatdino_cli.checkpoint import load_into
from flatdino_cli.data import IMAGENET_MEAN, IMAGENET_STD
from flatdino_cli.encoders.hf_cache import cached_hub_weights, hf_cache_dir
from flatdino_cli.encoders.keys import read_state_dict
from flatdino_cli.errors import UserError

__all__ = ["PatchDiscriminator", "ViTDiscriminator", "DISCRIMINATORS", "DINO_S8_REPO", "resolve_dino_s8_weights",
           "build_discriminator"]

DISCRIMINATORS = ("patch", "dino-s8")
DINO_S8_REPO = "timm/vit_small_patch8_224.dino"


class PatchDiscriminator(nn.Module):
    """PatchGAN: `layers` stride-2 4x4 convs (width doubling from `channels`) -> 3x3 conv to one logit per patch.

    48 px -> 6x6 logits, 256 px -> 32x32 logits (with layers=3).
    """

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        convs: list[nn.Module] = []
        c_in = 3
        for i in range(layers):
            c_out = channels * 2 ** i
            convs += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = c_out
        convs.append(spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1)))
        self.net = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)  # (B, h*w)


def _sn_conv1d(c_in: int, c_out: int, k: int) -> nn.Module:
    return spectral_norm(nn.Conv1d(c_in, c_out, k, padding=k // 2, padding_mode="circular"))


class _ConvNormAct(nn.Sequential):
    def __init__(self, dim: int, k: int):
        super().__init__(_sn_conv1d(dim, dim, k), nn.InstanceNorm1d(dim, eps=1e-6, affine=True), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class _Head(nn.Sequential):
    """Tokens (B, C, L) -> logits (B, 1, L)."""

    def __init__(self, dim: int, k: int):
        super().__init__(_ConvNormAct(dim, 1), _Residual(_ConvNormAct(dim, k)), _sn_conv1d(dim, 1, 1))


class ViTDiscriminator(nn.Module):
    """Frozen timm ViT `backbone` + trainable heads on the tokens of blocks `key_depths` and the final block."""

    def __init__(self, backbone: nn.Module, key_depths: tuple[int, ...] = (2, 5, 8, 11), kernel_size: int = 9,
                 input_size: int = 224):
        super().__init__()
        backbone.requires_grad_(False).eval()
        self._backbone = (backbone,)  # a tuple: not a submodule, so neither trained nor checkpointed
        self.key_depths = [d for d in key_depths if d < len(backbone.blocks)]
        self.input_size = input_size
        self.heads = nn.ModuleList(_Head(backbone.embed_dim, kernel_size) for _ in range(len(self.key_depths) + 1))
        # [-1, 1] -> ImageNet-normalised: ((x + 1) / 2 - mean) / std = x * scale + shift
        std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("x_scale", 0.5 / std, persistent=False)
        self.register_buffer("x_shift", (0.5 - mean) / std, persistent=False)

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.backbone._apply(fn, *args, **kwargs)  # .to(device) moves the unregistered backbone too
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        last = len(self.backbone.blocks) - 1
        depths = sorted({*self.key_depths, last})
        outs = self.backbone.forward_intermediates(x, indices=depths, norm=False, output_fmt="NLC",
                                                   intermediates_only=True)  # (B, L, C) each, no prefix tokens
        by_depth = dict(zip(depths, outs))
        tokens = [by_depth[last], *(by_depth[d] for d in self.key_depths)]
        return torch.cat([head(t.transpose(1, 2)).flatten(1) for head, t in zip(self.heads, tokens)], 1)  # (B, 5L)


# ----------------------------------------------------------------------------- construction
def resolve_dino_s8_weights(weights: str | Path | None = None) -> Path:
    """`weights` if given, else the cached timm DINO ViT-S/8; never downloads. One-line UserError when absent."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--disc-weights {path}: no such file")
        return path
    cached = cached_hub_weights(DINO_S8_REPO)
    if cached is not None:
        return cached
    raise UserError(f"--disc dino-s8: no weights of {DINO_S8_REPO} in the Hugging Face cache {hf_cache_dir()} "
                    f"(nothing is downloaded); pass --disc-weights FILE (DINO ViT-S/8 .pth/.safetensors), or use --disc patch")


def _dino_s8(weights: str | Path | None) -> nn.Module:
    path = resolve_dino_s8_weights(weights)  # first: a missing file fails before timm is even imported
    import timm  # heavy

    sd = read_state_dict(path, "--disc-weights")
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.")) and k not in ("x_scale", "x_shift")}
    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    load_into(vit, sd, path)
    return vit


def build_discriminator(kind: str = "patch", weights: str | Path | None = None) -> nn.Module:
    """A discriminator by name (DISCRIMINATORS); dino-s8 resolves its weights first and fails fast."""
    if kind == "patch":
        return PatchDiscriminator()
    if kind == "dino-s8":
        return ViTDiscriminator(_dino_s8(weights))
    raise UserError(f"--disc {kind}: unknown discriminator (valid: {', '.join(DISCRIMINATORS)})")

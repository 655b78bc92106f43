"""Feature extractors for `flatdino fid`: the TF Inception-v3 (ADM's evaluator numbers) and our encoder.

The Inception is the torchscript port of TF's 2015-12-05 graph that clean-fid and StyleGAN2-ADA use
(`inception-2015-12-05.pt`). clean-fid's `legacy_tensorflow` mode (`resize_inside=True`) is the one
that reproduces the ADM evaluator: both feed the raw uint8 image to a TF1-style bilinear resize to
299 (no half-pixel offset, no antialias) followed by (x - 128) / 128. ADM's three outputs map onto
the port's modules as follows:

    pool_3:0                 -> output of `layers` (B, 2048)                      FID, precision/recall
    softmax(pool_3 @ W)      -> pool @ output.weight.T, no bias (B, 1008)          Inception Score
    mixed_6/conv:0 [..., :7] -> layers.mixed_6.conv (B, 192, 17, 17), first 7 channels,
                                flattened in TF's (h, w, c) order (B, 2023)         sFID

(mixed_6.conv is the port's conv+BN+ReLU block named after TF's op, the module the PyTorch sFID
ports hook; not checked against TF's own numbers here, as neither the real weights nor TF are at hand.)
Finding the weights file (never downloading it) is `inception_weights.find_inception_weights`, which needs no torch.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from flatdino_cli.analysis.inception_weights import INCEPTION_FILE
from flatdino_cli.data import normalize, resize
from flatdino_cli.errors import UserError
from flatdino_cli.utils import sha256_file

__all__ = ["FeatureExtractor", "TFInception", "EncoderFeatures", "load_inception", "tf1_resize"]

_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
           "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 numbers per image


@runtime_checkable
class FeatureExtractor(Protocol):
    """uint8 images (B, H, W, 3) -> {"pool": (B, D), optional "logits": (B, C), "spatial": (B, D_s)}.

    name: what the JSON reports. cache_tag: identity of weights + preprocessing (part of cache file
    names, so features of different networks never mix). adm_compatible: its pool/spatial features
    are TF Inception's, so precomputed ADM / clean-fid statistics may be compared with them.
    """

    name: str
    cache_tag: str
    adm_compatible: bool

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def tf1_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) like TF1 `resize_bilinear(align_corners=False)`.

    Output pixel j samples input coordinate j * H / size (no half-pixel centres), clamped at the
    border; this is the affine grid the torchscript port builds (theta computed in float32 as there).
    """
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / size
    grid = F.affine_grid(theta.to(x.dtype)[None].repeat(B, 1, 1), [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _module_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TFInception:
    """The three ADM features from a network laid out like the torchscript port.

    net: module with `layers` (children named as in `_LAYERS`, `layers.mixed_6.conv` the spatial
    branch) and `output` (Linear 2048 -> classes). size: resize target (299 = ADM; tests use less).
    """

    def __init__(self, net: torch.nn.Module, device: str | torch.device = "cpu", size: int = 299,
                 name: str = "Inception-v3", adm_compatible: bool = False, cache_tag: str | None = None):
        children = dict(net.layers.named_children())
        missing = [n for n in _LAYERS if n not in children]
        if missing or not hasattr(children["mixed_6"], "conv") or not hasattr(net, "output"):
            raise UserError(f"{name}: not laid out like clean-fid's {INCEPTION_FILE} (missing layer "
                            f"{(missing or ['mixed_6.conv / output'])[0]}); pass that torchscript file")
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.head = [children[n] for n in _LAYERS[:_LAYERS.index("mixed_6")]]
        self.mixed_6 = children["mixed_6"]
        self.tail = [children[n] for n in _LAYERS[_LAYERS.index("mixed_6") + 1:]]
        self.size, self.name, self.adm_compatible = size, name, adm_compatible
        self.cache_tag = cache_tag or f"inception{size}-{_module_digest(net)[:12]}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        x = (tf1_resize(x, self.size) - 128) / 128  # (B, 3, 299, 299), TF graph's Sub/Mul
        for m in self.head:
            x = m(x)
        spatial = self.mixed_6.conv(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
        x = self.mixed_6(x)
        for m in self.tail:
            x = m(x)
        pool = x.reshape(len(x), -1)  # (B, 2048)
        logits = pool @ self.net.output.weight.T  # (B, 1008): ADM's softmax input has no bias
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)  # TF's NHWC flattening
        return {k: v.float().cpu().numpy() for k, v in (("pool", pool), ("logits", logits), ("spatial", spatial))}

    @torch.no_grad()
    def verify(self, atol: float = 1e-3) -> None:
        """Check our layer-by-layer pass against the network's own forward (resize + normalisation
        + layers) on two images, so a differently built file fails loudly instead of giving wrong FIDs."""
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (2, 64, 48, 3), generator=gen, dtype=torch.uint8).numpy()  # non-square
        ours = self(images)["pool"]
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()
        theirs = self.net(x, return_features=True).reshape(2, -1).float().cpu().numpy()
        err = float(np.abs(ours - theirs).max() / max(1.0, np.abs(theirs).max()))
        if not err <= atol:
            raise UserError(f"{self.name}: its own forward disagrees with the layer-by-layer features "
                            f"(relative error {err:.2g}); pass clean-fid's {INCEPTION_FILE}")


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> TFInception:
    """The ADM-compatible extractor from clean-fid's torchscript file (see `inception_weights.find_inception_weights`)."""
    p = Path(path)
    try:
        with warnings.catch_warnings():  # torch >= 2.9 flags torchscript as deprecated; it is the file's format
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # not a torchscript archive, truncated download, ...
        raise UserError(f"{p}: cannot load as torchscript ({type(e).__name__}); pass clean-fid's "
                        f"{INCEPTION_FILE}") from e
    h = sha256_file(p)
    ext = TFInception(net, device, 299, name=f"TF Inception-v3 ({p.name}, clean-fid legacy_tensorflow = ADM)",
                      adm_compatible=True, cache_tag=f"tfinception-{h[:12]}")
    ext.verify()
    return ext


class EncoderFeatures:
    """FD-DINOv2 features from our frozen encoder: the mean over its output tokens.

    The encoder takes ImageNet-normalised (B, 3, S, S) images at its input size S (bicubic,
    antialiased resize, as `flatdino extract`) and returns (B, N, D) patch tokens (CLS and registers
    already dropped by our convention) or (B, D). We mean-pool the patch tokens because that is what
    our encoder outputs; the FD-DINOv2 of the literature (Stein et al. 2023, EDM2) uses the CLS token
    of DINOv2 ViT-L/14, so our numbers are comparable with each other, not with published ones.
    """

    adm_compatible = False

    def __init__(self, encoder, device: str | torch.device = "cpu", image_size: int | None = None):
        spec = getattr(encoder, "spec", None)
        self.size = image_size or getattr(spec, "image_size", None) or getattr(encoder, "image_size", 224)
        self.encoder, self.device = encoder, torch.device(device)
        label = getattr(encoder, "name", None) or getattr(spec, "name", None) or type(encoder).__name__
        self.name = f"mean-pooled tokens of {label} at {self.size}px"
        digest = _module_digest(encoder) if isinstance(encoder, torch.nn.Module) else \
            f"{label}|{getattr(encoder, 'weights_id', '')}"
        self.cache_tag = f"encoder{self.size}-{hashlib.sha256(digest.encode()).hexdigest()[:12]}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        f = self.encoder(normalize(resize(x, self.size, "bicubic")))  # (B, N, D) or (B, D)
        f = f.float().mean(1) if f.dim() == 3 else f.float()
        return {"pool": f.cpu().numpy()}

"""LPIPS-VGG16 (Zhang et al. 2018, v0.1): a learned perceptual distance, built here from local weights only.

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )

f_l: VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input after LPIPS's
scaling layer ((x - shift) / scale on [-1, 1] pixels); n: unit length along channels; w_l: the
learned non-negative 1x1 weights `lin0..lin4`.

Two files are needed and neither is ever downloaded:
- torchvision's VGG16 ImageNet weights `vgg16-397923af.pth` (keys features.N.weight/bias), from
  `vgg_weights=FILE` or torchvision's hub cache `torch.hub.get_dir()/checkpoints/`;
- the LPIPS linear layers `vgg.pth` of the lpips package v0.1 (keys linK.model.1.weight), from
  `lpips_weights=FILE` (`--lpips-weights`) or the pip `lpips` package's bundled copy if installed.
When one is missing `resolve_lpips_files` raises a one-line UserError (naming both and `--no-lpips`)
before anything is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from flatdino_cli.checkpoint import load_into, load_weights
from flatdino_cli.errors import UserError

__all__ = ["LPIPS", "VGG_FILE", "LPIPS_CHANNELS", "default_vgg_path", "bundled_lpips_path",
           "resolve_lpips_files", "load_lpips"]

VGG_FILE = "vgg16-397923af.pth"
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_CONVS_PER_STAGE = (2, 2, 3, 3, 3)  # VGG16 ("D"); a max-pool separates the stages
# LPIPS's ScalingLayer constants: maps [-1, 1] inputs to ImageNet-normalised VGG inputs
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def default_vgg_path() -> Path:
    """Where torchvision keeps (or would keep) the VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE


def bundled_lpips_path() -> Path | None:
    """The `vgg.pth` shipped inside the pip `lpips` package, if that package is installed (not imported)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def resolve_lpips_files(lpips_weights: str | Path | None = None,
                        vgg_weights: str | Path | None = None) -> tuple[Path, Path]:
    """(VGG16 file, LPIPS linear-layer file), or one UserError naming both sources and --no-lpips."""
    vgg = Path(vgg_weights).expanduser() if vgg_weights else default_vgg_path()
    lin = Path(lpips_weights).expanduser() if lpips_weights else bundled_lpips_path()
    missing = []
    if not vgg.is_file():
        missing.append(f"VGG16 weights {vgg} (torchvision's {VGG_FILE}: put it in {vgg.parent}/ or pass --vgg-weights FILE)")
    if lin is None or not lin.is_file():
        where = lin if lin is not None else "not given, and no pip `lpips` package with its bundled weights/v0.1/vgg.pth"
        missing.append(f"LPIPS linear weights {where} (lpips v0.1 vgg.pth: pass --lpips-weights FILE)")
    if missing:
        raise UserError("LPIPS needs local weights, nothing is downloaded; missing " + " and ".join(missing)
                        + "; or train without LPIPS: --no-lpips")
    return vgg, lin


def _vgg16_features() -> nn.Sequential:
    """VGG16 conv layers through relu5_3, with torchvision's module indices (features.0 ... features.29)."""
    layers: list[nn.Module] = []
    c_in = 3
    for stage, (c_out, n) in enumerate(zip(LPIPS_CHANNELS, _CONVS_PER_STAGE)):
        if stage:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(n):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            c_in = c_out
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16: (x, y) images (B, 3, H, W) in [-1, 1] -> distances (B,). Gradients reach x and y."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.taps = {i for i, m in enumerate(self.features) if isinstance(m, nn.ReLU)
                     and (i + 1 == len(self.features) or isinstance(self.features[i + 1], nn.MaxPool2d))}
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen: no dropout, whatever the caller's mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)  # (B, C_l, H_l, W_l)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self._taps((x - self.shift) / self.scale)
        fy = self._taps((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for a, b, lin in zip(fx, fy, self.lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b) ** 2).mean((1, 2, 3))  # (B,)
        return total


def _lpips_state_dict(vgg_sd: dict, lin_sd: dict, vgg_path: Path, lin_path: Path) -> dict[str, torch.Tensor]:
    """torchvision VGG16 keys (features.N.*; the classifier is dropped) + lpips keys (linK.model.1.weight)."""
    out = {k: v for k, v in vgg_sd.items() if k.startswith("features.")}
    if not out:
        raise UserError(f"{vgg_path}: no 'features.N.weight' keys; expected torchvision's VGG16 state dict ({VGG_FILE})")
    for k in range(len(LPIPS_CHANNELS)):
        w = lin_sd.get(f"lin{k}.model.1.weight", lin_sd.get(f"lin{k}.weight"))
        if w is None:
            raise UserError(f"{lin_path}: no 'lin{k}.model.1.weight'; expected the lpips v0.1 vgg.pth "
                            f"(keys lin0.model.1.weight ... lin4.model.1.weight)")
        out[f"lins.{k}.weight"] = w
    return {k: v.float() for k, v in out.items()}


def load_lpips(lpips_weights: str | Path | None = None, vgg_weights: str | Path | None = None,
               device: torch.device | str = "cpu") -> LPIPS:
    """A frozen LPIPS on `device` from local files (see the module docstring); fails fast when one is missing."""
    vgg_path, lin_path = resolve_lpips_files(lpips_weights, vgg_weights)
    sd = _lpips_state_dict(load_weights(vgg_path), load_weights(lin_path), vgg_path, lin_path)
    model = LPIPS()
    load_into(model, sd, f"{vgg_path} + {lin_path}")
    return model.to(device)

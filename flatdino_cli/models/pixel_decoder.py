"""RAE's ViT-MAE-style pixel decoder: DINOv2 patch features (B, P, C) -> images (B, 3, S, S) in ~[0, 1].

embed (C -> W) -> prepend a trainable CLS token -> + fixed 2-D sin-cos table (CLS row zero) ->
`depth` pre-LN blocks (exact GELU, LN eps 1e-12) -> LN -> pred (W -> p*p*3) -> drop CLS ->
unpatchify -> x * std + mean (ImageNet). Loads RAE's released `model.pt` key by key (q/k/v fused).
RAE's latent statistics file `stat.pt` is models/stats.py's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from flatdino_cli.checkpoint import load_into, load_weights, weights_file
from flatdino_cli.config import DecoderModelConfig
from flatdino_cli.data import IMAGENET_MEAN, IMAGENET_STD
from flatdino_cli.errors import UserError
from flatdino_cli.interop import diffusers as rae_folder
from flatdino_cli.nn import Block, sincos_2d
from flatdino_cli.rundir import is_run_dir, run_config
from flatdino_cli.utils import grid_side

__all__ = ["PixelDecoder", "rae_state_dict_to_ours", "ours_to_rae_state_dict", "load_decoder", "check_features"]

# RAE's decoder widths -> heads (ViT-XL / L / B); heads cannot be read off the weights
RAE_HEADS = {1152: 16, 1024: 16, 768: 12}


class PixelDecoder(nn.Module):
    def __init__(self, cfg: DecoderModelConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim, self.num_patches, self.patch_size = cfg.in_dim, cfg.num_patches, cfg.patch_size
        self.grid = grid_side(cfg.num_patches, "pixel decoder: model.num_patches")
        self.embed = nn.Linear(cfg.in_dim, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        # fixed, but a Parameter (not a buffer) so it is in the state dict exactly as RAE stores it
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_hidden, norm="layernorm", norm_eps=cfg.ln_eps, mlp="gelu",
                  qkv_bias=True) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.pred = nn.Linear(cfg.width, cfg.patch_size ** 2 * 3)
        # pixel de-normalisation; not persistent, RAE's decoder state dict has no such entries
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE sin-cos table (CLS row zero) and a zero CLS token; Linear/LN keep torch defaults, as in
        RAE's GeneralDecoder (a plain nn.Module that never applies HF's init)."""
        self.pos_embed.copy_(sincos_2d(self.grid, self.grid, self.pos_embed.shape[-1], cls_token=True)[None])
        self.cls_token.zero_()

    def forward_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, P, in_dim) -> per-patch normalised pixels (B, P, p*p*3), before unpatchify."""
        B, P, C = feats.shape
        if P != self.num_patches or C != self.in_dim:
            # RAE would bilinearly resize a different token grid; we refuse rather than guess
            raise ValueError(f"pixel decoder expects (B, {self.num_patches}, {self.in_dim}) features, "
                             f"got {tuple(feats.shape)}")
        x = self.embed(feats)  # (B, P, W)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1) + self.pos_embed  # (B, 1+P, W)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # (B, P, p*p*3), CLS position dropped

    def unpatchify(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, P, p*p*3) with each vector ordered (row-in-patch, col-in-patch, channel) -> (B, 3, S, S)."""
        B, g, p = logits.shape[0], self.grid, self.patch_size
        x = logits.reshape(B, g, g, p, p, 3)  # (B, gh, gw, ph, pw, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)  # (B, c, gh, ph, gw, pw) -> image

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, P, in_dim) raw DINOv2 features -> images (B, 3, S, S), ~[0, 1], not clamped."""
        return self.unpatchify(self.forward_logits(feats)) * self.std + self.mean


# ----------------------------------------------------------------------------- RAE key map
_NAMES = [  # (RAE key, our key); {i} is a layer index, {p} weight|bias; q/k/v are fused separately
    ("decoder_embed.{p}", "embed.{p}"),
    ("decoder_pos_embed", "pos_embed"),
    ("trainable_cls_token", "cls_token"),
    ("decoder_layers.{i}.layernorm_before.{p}", "blocks.{i}.norm1.{p}"),
    ("decoder_layers.{i}.attention.output.dense.{p}", "blocks.{i}.attn.proj.{p}"),
    ("decoder_layers.{i}.layernorm_after.{p}", "blocks.{i}.norm2.{p}"),
    ("decoder_layers.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("decoder_layers.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("decoder_norm.{p}", "norm.{p}"),
    ("decoder_pred.{p}", "pred.{p}"),
]
_RAE_QKV = "decoder_layers.{i}.attention.attention.{part}.{p}"
_OUR_QKV = "blocks.{i}.attn.qkv.{p}"


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern.replace(r"\{part\}", r"(?P<part>query|key|value)"))


_TO_OURS = [(_regex(rae), ours) for rae, ours in _NAMES]
_TO_RAE = [(_regex(ours), rae) for rae, ours in _NAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        if m := pattern.fullmatch(key):
            return template.format(**m.groupdict())
    return None


def _unwrap(sd: dict) -> dict:
    """Training-checkpoint wrappers ({"ema"|"model"|"state_dict": sd}, EMA first), DDP/compile
    prefixes, and the "decoder." prefix of a whole RAE stage-1 model (its encoder keys are dropped)."""
    for wrapper in ("ema", "model", "state_dict"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    if "decoder.decoder_embed.weight" in out:
        out = {k[len("decoder."):]: v for k, v in out.items() if k.startswith("decoder.")}
    return out


def rae_state_dict_to_ours(sd: dict, source: str = "RAE decoder state dict") -> dict[str, torch.Tensor]:
    """RAE GeneralDecoder keys -> PixelDecoder keys; separate query/key/value are fused into attn.qkv."""
    qkv_re, out, qkv, unknown = _regex(_RAE_QKV), {}, {}, []
    for k, v in _unwrap(sd).items():
        if m := qkv_re.fullmatch(k):
            qkv.setdefault((m["i"], m["p"]), {})[m["part"]] = v
        elif (name := _rename(k, _TO_OURS)) is not None:
            out[name] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"{source}: unknown keys for RAE's pixel decoder {unknown[:3]} ({len(unknown)} in all); "
                        "expected RAE's GeneralDecoder state dict (decoder_embed.*, decoder_layers.*, ...)")
    for (i, p), parts in qkv.items():
        if len(parts) != 3:
            raise UserError(f"{source}: decoder_layers.{i} has only {sorted(parts)} of query/key/value {p}")
        out[_OUR_QKV.format(i=i, p=p)] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def ours_to_rae_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PixelDecoder keys -> RAE GeneralDecoder keys (inverse of rae_state_dict_to_ours)."""
    qkv_re, out = _regex(_OUR_QKV), {}
    for k, v in _unwrap(sd).items():
        if m := qkv_re.fullmatch(k):
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[_RAE_QKV.format(part=part, **m.groupdict())] = t.clone()
        elif (name := _rename(k, _TO_RAE)) is not None:
            out[name] = v
        else:
            raise KeyError(f"no RAE name for pixel-decoder key {k!r}")
    return out


# ----------------------------------------------------------------------------- loading
def _infer_config(sd: dict[str, torch.Tensor], heads: int | None, ln_eps: float, source: str) -> DecoderModelConfig:
    """Architecture from tensor shapes (PixelDecoder keys); heads cannot be inferred (see RAE_HEADS)."""
    try:
        width, in_dim = sd["embed.weight"].shape
        num_patches = sd["pos_embed"].shape[1] - 1
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        out_dim = sd["pred.weight"].shape[0]
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{source}: incomplete pixel-decoder weights (no {e}); is the file truncated?") from None
    patch = math.isqrt(out_dim // 3)
    heads = heads or RAE_HEADS.get(width)
    if heads is None or width % heads or patch * patch * 3 != out_dim or math.isqrt(num_patches) ** 2 != num_patches:
        raise UserError(f"{source}: cannot infer the decoder architecture (width {width}, out {out_dim}, "
                        f"{num_patches} patches); pass the number of heads / a matching config")
    return DecoderModelConfig(in_dim=in_dim, num_patches=num_patches, patch_size=patch, width=width, depth=depth,
                              heads=heads, mlp_hidden=mlp_hidden, ln_eps=ln_eps)


def load_decoder(path: str | Path, cfg: DecoderModelConfig | None = None, device: torch.device | str = "cpu",
                 heads: int | None = None) -> PixelDecoder:
    """An eval-mode PixelDecoder (gradients untouched) from RAE's released `model.pt`, a diffusers
    AutoencoderRAE folder, a weights file of ours, or a train-decoder run directory (EMA weights of the
    latest checkpoint).

    For a weights file the architecture is read off the tensor shapes; heads come from `heads`, else
    `cfg.heads` when cfg has the same width, else RAE_HEADS. `cfg` also supplies ln_eps (default 1e-12).
    """
    path = Path(path)
    expected = ("expected RAE's decoder model.pt, a diffusers AutoencoderRAE folder or a flatdino train-decoder "
                "run directory")
    if rae_folder.is_rae_folder(path):
        rae_sd, arch = rae_folder.decoder_rae_state_dict(path)
        sd = rae_state_dict_to_ours(rae_sd, str(path))
        grid = grid_side(rae_folder.read_config(path)["num_patches"], f"{path}: encoder patches")
        sd["pos_embed"] = sincos_2d(grid, grid, sd["embed.weight"].shape[0], cls_token=True,  # not stored
                                    step=rae_folder.pos_step(grid))[None]
        model = PixelDecoder(_infer_config(sd, arch["heads"], arch["ln_eps"], str(path)))
        load_into(model, sd, path)
        return model.eval().to(device)
    if path.is_dir() and not is_run_dir(path) and (path / "model.pt").is_file():
        path = path / "model.pt"  # RAE's release directory, e.g. .../ViTXL_n08/
    if path.is_dir():
        if not is_run_dir(path):
            raise UserError(f"{path}: holds neither config.yaml nor model.pt; {expected}")
        run_cfg = run_config(path, "decoder")
        model, wpath = PixelDecoder(run_cfg.model), weights_file(path, "decoder", prefer_ema=True)
        load_into(model, load_weights(wpath), wpath)
        return model.eval().to(device)
    if not path.is_file():
        raise UserError(f"{path}: not found; {expected}")
    sd = _unwrap(load_weights(path))
    if "decoder_embed.weight" in sd:
        sd = rae_state_dict_to_ours(sd, str(path))
    elif "embed.weight" not in sd or "pred.weight" not in sd:
        raise UserError(f"{path}: not a pixel-decoder checkpoint (keys {list(sd)[:3]}); {expected}")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # RAE may export fp16/bf16
    if heads is None and cfg is not None and cfg.width == sd["embed.weight"].shape[0]:
        heads = cfg.heads
    inferred = _infer_config(sd, heads, cfg.ln_eps if cfg is not None else 1e-12, str(path))
    model = PixelDecoder(inferred)
    load_into(model, sd, path)
    return model.eval().to(device)


def check_features(decoder: PixelDecoder, num_patches: int, dim: int, what: str = "the features") -> None:
    """One-line UserError when the decoder was trained on other features than (num_patches, dim)."""
    if (decoder.num_patches, decoder.in_dim) != (num_patches, dim):
        raise UserError(f"pixel decoder expects {decoder.num_patches} x {decoder.in_dim} features but {what} are "
                        f"{num_patches} x {dim}; use a decoder trained on this encoder's features")

"""RAE's stage-2 DiT checkpoints (bytetriper/RAE) in and out of our DiT (building block).

RAE's LightningDiT / DiTwDDTHead (src/stage2/models) and our DiT are the same network under other key
names (INTEROP.md B5), living in the mirrored time frame: RAE's net u(x, t_R) has t_R = 1 - t and
u = -v. Both maps are folded into the weights, so a converted checkpoint is an ordinary DiT of ours
(every sampler, guidance and export path works unchanged):
- time: the Gaussian-Fourier features of 1 - t are a fixed linear mix of those of t,
  sin(a(1-t)) = s cos(at) - c sin(at), cos(a(1-t)) = c cos(at) + s sin(at) with a = 2 pi W,
  s = sin a, c = cos a; the mix goes into t_embedder.mlp.0.weight;
- sign: the final projection is negated.
The map is its own inverse, so import and export use the same function.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatdino_cli.checkpoint import load_into, load_weights
from flatdino_cli.config import DiTModelConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.errors import UserError
from flatdino_cli.flow import default_shift
from flatdino_cli.models import build_model
from flatdino_cli.rundir import is_run_dir
from flatdino_cli.utils import grid_side

RAE_DIT_FILE = "stage2_model.pt"  # RAE's released name
RAE_STATS_FILES = ("stat.pt", "stats.pt")  # RAE's release name, then the one train-dit writes


def mirror_time_frame(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiT state dict (our keys) for v(x, t) -> one for -v(x, 1 - t) (and back); float64 arithmetic."""
    sd = dict(sd)
    a = 2 * math.pi * sd["t_embedder.W"].double()  # (F,)
    s, c = a.sin(), a.cos()
    w0 = sd["t_embedder.mlp.0.weight"]
    ws, wc = w0.double().chunk(2, dim=1)  # columns acting on [sin | cos]
    sd["t_embedder.mlp.0.weight"] = torch.cat([wc * s - ws * c, ws * s + wc * c], dim=1).to(w0.dtype)
    for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
        sd[k] = -sd[k]
    return sd


def _rae_name(key: str, cfg: DiTModelConfig) -> str:
    """Our DiT key -> RAE's (LightningDiT, or DiTwDDTHead when the model has a head)."""
    if cfg.head_depth:
        if key.startswith("x_embedder."):
            return "s_embedder.proj." + key.removeprefix("x_embedder.")
        if key.startswith("head_embedder."):
            return "x_embedder.proj." + key.removeprefix("head_embedder.")
        if m := re.match(r"head_blocks\.(\d+)\.(.*)", key):
            return f"blocks.{cfg.depth + int(m[1])}.{m[2]}"
    elif key.startswith("x_embedder."):
        return "x_embedder.proj." + key.removeprefix("x_embedder.")
    return key


def _rope_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """RAE's persistent RoPE buffers (VisionRotaryEmbeddingFast), which equal our rope_2d tables."""
    if model.has_head:
        return {"enc_feat_rope.freqs_cos": model.rope_cos, "enc_feat_rope.freqs_sin": model.rope_sin,
                "dec_feat_rope.freqs_cos": model.head_rope_cos, "dec_feat_rope.freqs_sin": model.head_rope_sin}
    return {"feat_rope.freqs_cos": model.rope_cos, "feat_rope.freqs_sin": model.rope_sin}


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """PatchEmbed's conv weight (W, d, p, p) -> our Linear (W, p*p*d) over (row, col, channel) tokens."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _linear_to_conv(w: torch.Tensor, p: int) -> torch.Tensor:
    return w.reshape(w.shape[0], p, p, -1).permute(0, 3, 1, 2).contiguous()


def to_rae_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our (2-D grid) DiT -> the state dict RAE's LightningDiT / DiTwDDTHead load with strict=True."""
    cfg = model.cfg
    out = {}
    for k, v in mirror_time_frame(model.state_dict()).items():
        if k in ("x_embedder.weight", "head_embedder.weight"):
            v = _linear_to_conv(v, cfg.patch)
        out[_rae_name(k, cfg)] = v.detach().float().cpu().contiguous()
    out.update({k: v.detach().float().cpu().contiguous() for k, v in _rope_tables(model).items()})
    return out


def _infer_rae_config(sd: dict[str, torch.Tensor], source: Path) -> DiTModelConfig:
    """Architecture from RAE's key layout and tensor shapes (one-line UserError when it is not one)."""
    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise UserError(f"{source}: not an RAE stage-2 checkpoint (no '{key}'); expected RAE's "
                            f"{RAE_DIT_FILE} (LightningDiT or DiT-DH), raw or as {{'ema': ...}}")
        return sd[key]

    dh = "s_embedder.proj.weight" in sd
    trunk = need("s_embedder.proj.weight" if dh else "x_embedder.proj.weight")  # (W, d, p, p)
    W, d, p = trunk.shape[0], trunk.shape[1], trunk.shape[-1]
    n = need("pos_embed").shape[1]  # trunk tokens
    side = grid_side(n, f"{source}: pos_embed")
    blocks = sorted({int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    cos = need("enc_feat_rope.freqs_cos" if dh else "feat_rope.freqs_cos")
    head_dim = cos.shape[-1]
    for key, ok, what in [
        ("blocks.0.norm1.weight", "blocks.0.norm1.weight" in sd, "use_rmsnorm: True"),
        ("blocks.0.adaLN_modulation.1.weight", need("blocks.0.adaLN_modulation.1.weight").shape[0] == 6 * W,
         "wo_shift: False"),
        ("final_layer.linear.weight", need("final_layer.linear.weight").shape[0] == p * p * d, "learn_sigma: False"),
    ]:
        if not ok:
            raise UserError(f"{source}: {key} shows an RAE model without {what}; only RAE's released settings "
                            "(RMSNorm, adaLN with shift, no learned sigma) are supported")
    kw = dict(tokens=n * p * p, in_dim=d, grid=(side * p, side * p), patch=p, width=W,
              heads=W // head_dim, mlp_hidden=need("blocks.0.mlp.w3.weight").shape[1],
              num_classes=need("y_embedder.embedding_table.weight").shape[0] - 1,
              pos_embed="sincos", rope=True, qk_norm="blocks.0.attn.q_norm.weight" in sd)
    if dh:
        H = need("x_embedder.proj.weight").shape[0]
        projector = "s_projector.weight" in sd  # RAE: nn.Identity (no keys) when the head is as wide as the trunk
        if not projector and H != W:
            need("s_projector.weight")
        depth = _trunk_depth(sd, blocks, W, H, source)
        kw.update(depth=depth, head_width=H, head_depth=len(blocks) - depth, head_projector=projector,
                  head_heads=H // need("dec_feat_rope.freqs_cos").shape[-1],
                  head_mlp_hidden=need(f"blocks.{depth}.mlp.w3.weight").shape[1])
    else:
        kw.update(depth=len(blocks))
    try:
        return DiTModelConfig(**kw)
    except UserError as e:
        raise UserError(f"{source}: unsupported RAE architecture ({e})") from None


def _trunk_depth(sd: dict[str, torch.Tensor], blocks: list[int], W: int, H: int, source: Path) -> int:
    """How many of RAE's DiT-DH blocks.{i} are trunk blocks (the rest are the head): told by the block
    widths, or for a head as wide as the trunk by the SwiGLU widths; when even those agree, the weights
    cannot tell, and RAE's own configs (every one has a 2-block head) are assumed, with a warning."""
    if H != W:
        return sum(1 for i in blocks if sd[f"blocks.{i}.norm1.weight"].shape[0] == W)
    hidden = [sd[f"blocks.{i}.mlp.w3.weight"].shape[1] for i in blocks]
    if hidden[-1] != hidden[0]:
        return next(i for i, h in enumerate(hidden) if h != hidden[0])  # the trunk is the leading run
    warnings.warn(f"{source}: a DiT-DH head as wide as its trunk: the {len(blocks)} blocks look alike, so the "
                  f"last 2 are taken as the head (RAE's DDT configs); a checkpoint with another split samples "
                  "garbage", stacklevel=3)
    return len(blocks) - 2


def read_rae_dit(path: str | Path) -> tuple[Any, nn.Module, bool]:
    """(stage config, eval-mode DiT in our frame, whether the checkpoint's "ema" entry was used) from
    RAE's stage2_model.pt: a raw state dict or a training checkpoint whose "ema" RAE itself loads."""
    path = Path(path)
    sd = load_weights(path)
    used_ema = isinstance(sd.get("ema"), dict)
    if used_ema:
        sd = sd["ema"]
    elif isinstance(sd.get("model"), dict):
        raise UserError(f"{path}: a training checkpoint without an 'ema' entry; RAE loads only 'ema' or a raw "
                        "state dict (re-save the weights you want as a raw state dict)")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    mcfg = _infer_rae_config(sd, path)
    base = load_preset("rae-dh-xl-256x768" if mcfg.head_depth else "rae-xl-256x768")  # RAE's recipe
    flow = dataclasses.replace(base.flow, shift=default_shift(mcfg.tokens, mcfg.in_dim), grid="rae")
    cfg = dataclasses.replace(base, model=mcfg, flow=flow, normalize=True)
    model = build_model(cfg)
    ours = {}
    names = {_rae_name(k, mcfg): k for k in model.state_dict()}
    for k, v in sd.items():
        if k in _rope_tables(model):
            continue
        if k in names and v.dim() == 4:
            v = _conv_to_linear(v)
        ours[names.get(k, k)] = v
    load_into(model, ours, path)  # key set and shapes checked here, then the frame is mirrored
    model.load_state_dict(mirror_time_frame(model.state_dict()))
    for k, table in _rope_tables(model).items():
        if k not in sd or sd[k].shape != table.shape or not torch.allclose(sd[k].float(), table, atol=1e-5):
            raise UserError(f"{path}: {k} differs from the 2-D RoPE table of a {mcfg.grid[0]}x{mcfg.grid[1]} grid "
                            "(RAE's VisionRotaryEmbeddingFast, theta 1e4); this checkpoint is not supported")
    return cfg, model.requires_grad_(False).eval(), used_ema


def rae_mlp_ratio(m: DiTModelConfig, source) -> float:
    """RAE's one mlp_ratio r giving our SwiGLU widths: hidden = int(2/3 * int(width * r)), trunk and head."""
    pairs = [(m.width, m.mlp_hidden)] + ([(m.head_width, m.head_mlp_hidden)] if m.head_depth else [])
    for r in (4.0, (math.ceil(1.5 * m.mlp_hidden) + 0.5) / m.width):
        if all(int(2 / 3 * int(w * r)) == h for w, h in pairs):
            return r
    raise UserError(f"{source}: no RAE mlp_ratio gives SwiGLU widths {[h for _, h in pairs]} for widths "
                    f"{[w for w, _ in pairs]} (RAE uses int(2/3 * int(width * mlp_ratio)))")


def rae_checkpoint(path: Path) -> Path | None:
    """The RAE stage-2 file `path` names (the file, or a folder holding one), None for a run dir."""
    if path.is_file():
        return path
    if not path.is_dir() or is_run_dir(path):
        return None
    if (path / RAE_DIT_FILE).is_file():
        return path / RAE_DIT_FILE
    pts = sorted(path.glob("*.pt"))
    if len(pts) == 1 and pts[0].name not in ("stat.pt", "stats.pt"):
        return pts[0]
    raise UserError(f"{path}: neither a flatdino run directory (no config.yaml) nor a folder holding RAE's "
                    f"{RAE_DIT_FILE}")

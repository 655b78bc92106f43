"""Encoder weight files: a .safetensors or torch file read as a tensor state dict, its key layout (timm,
Hugging Face Dinov2WithRegistersModel old and new, Meta's DINOv2 release) mapped to timm's, a pos-embed
grid that differs from the model's resampled bicubic + antialias like HF, and the result loaded into
the timm model with one-line UserErrors for a file that does not fit."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from flatdino_cli.encoders.specs import EncoderSpec
from flatdino_cli.errors import UserError


def read_state_dict(path: str | Path, label: str = "--encoder-weights") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / torch file (weights_only), unwrapped and with wrapper prefixes stripped.
    `label` names the file's origin in error messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{label} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:  # weights_only: a pickle that wants to build arbitrary objects is refused, never executed
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{label} {path}: not a readable tensor state dict ({type(e).__name__}: {msg})")
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{label} {path}: holds no tensor state dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "dinov2_with_registers.", "backbone."):
        sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def _fold_cls_pos(cls: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF/Meta add pos[0] to CLS only (registers get none); timm's no_embed_class layout stores
    cls + pos[0] as its cls_token and the patch rows alone as pos_embed."""
    return cls + pos[:, :1], pos[:, 1:]


# HF Dinov2WithRegistersModel -> timm, applied after q/k/v are fused; first match wins
_HF_RENAMES = [
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    # SwiGLU MLP (ViT-g): transformers <5 packs [gate; up] in weights_in like timm's fc1; >=5 see _HF_GLU
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.", r"blocks.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
    (r"layernorm\.", "norm."),
]
_HF_GLU = re.compile(r"encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$")
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)$")


def _from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF key layout (transformers <5 `attention.attention.query` or >=5 `attention.q_proj`) -> timm."""
    out, qkv, glu = {}, {}, {}
    for k, v in sd.items():
        if m := _HF_QKV.match(k):
            qkv.setdefault((m[1], m[4]), {})[(m[2] or m[3])[0]] = v  # 'query' and 'q' -> 'q'
        elif m := _HF_GLU.match(k):
            glu.setdefault((m[1], m[3]), {})[m[2]] = v
        elif k.startswith("embeddings.") and not k.startswith("embeddings.patch_embeddings."):
            continue  # tokens and pos-embed handled below; mask_token is unused
        else:
            for pat, rep in _HF_RENAMES:
                if re.match(pat, k):
                    out[re.sub(pat, rep, k, count=1)] = v
                    break
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:  # timm's fused qkv Linear stacks q, k, v along the output dim
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    for (layer, kind), parts in glu.items():
        if set(parts) == {"gate", "up"}:  # timm's packed SwiGLU fc1: silu(first half) * second half
            out[f"blocks.{layer}.mlp.fc1.{kind}"] = torch.cat([parts["gate"], parts["up"]], 0)
    if {"embeddings.cls_token", "embeddings.position_embeddings"} <= sd.keys():
        out["cls_token"], out["pos_embed"] = _fold_cls_pos(sd["embeddings.cls_token"],
                                                           sd["embeddings.position_embeddings"])
    if "embeddings.register_tokens" in sd:
        out["reg_token"] = sd["embeddings.register_tokens"]
    return out


def _to_timm_layout(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Any accepted layout -> timm keys, with pos_embed resampled to the model's patch grid."""
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        sd = _from_hf(sd)
    elif "register_tokens" in sd and "pos_embed" in sd:  # Meta's DINOv2 release layout
        sd = {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v
              for k, v in sd.items()}  # ViT-g's SwiGLUFFNFused, as timm's own filter renames it
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"], sd["pos_embed"] = _fold_cls_pos(sd["cls_token"], sd["pos_embed"])
    pos = sd.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape[1] != model.pos_embed.shape[1]:
        old = math.isqrt(pos.shape[1])
        if old * old == pos.shape[1]:  # square source grid (37x37 for the 518-px release)
            from timm.layers import resample_abs_pos_embed  # heavy

            sd = {**sd, "pos_embed": resample_abs_pos_embed(
                pos.float(), new_size=list(model.patch_embed.grid_size), old_size=[old, old],
                num_prefix_tokens=0, interpolation="bicubic", antialias=True)}
    return sd


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, spec: EncoderSpec) -> None:
    sd = _to_timm_layout(sd, model)
    own = model.state_dict()
    needed = [k for k in own if not k.startswith(("norm.", "head."))]  # final-norm affine is dropped by design
    missing = [k for k in needed if k not in sd]
    if len(missing) == len(needed):
        raise UserError(f"{source}: matches neither the timm nor the Hugging Face DINOv2-with-registers key "
                        f"layout (its first keys: {list(sd)[:3]}; expected e.g. {needed[:3]})")
    if missing:
        raise UserError(f"{source}: {len(missing)} key(s) missing for encoder {spec.name}, first: {missing[:4]}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in needed if sd[k].shape != own[k].shape]
    if bad:
        raise UserError(f"{source}: shapes do not fit encoder {spec.name} (wrong --encoder?): {bad[:2]}")
    model.load_state_dict({k: sd[k] for k in needed}, strict=False)

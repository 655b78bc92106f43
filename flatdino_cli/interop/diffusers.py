"""diffusers' AutoencoderRAE folders (config.json with "_class_name": "AutoencoderRAE" and one
diffusion_pytorch_model.safetensors), read into flatdino's layouts. Facts from diffusers 0.42
(models/autoencoders/autoencoder_rae.py):

- keys: `encoder.` + a transformers Dinov2WithRegistersModel (final LayerNorm without affine, as RAE;
  heads = encoder_hidden_size / 64, position table built for 518 px and interpolated at run time);
  `decoder.` + RAE's GeneralDecoder with diffusers attention names (`attention.to_q|to_k|to_v|to_out.0`);
  `decoder.decoder_pos_embed` is not stored (a fixed MAE sin-cos table, rebuilt); `encoder_mean` /
  `encoder_std` (image normalisation) and `_latents_mean` / `_latents_std` (latent statistics).
- latent statistics: diffusers normalises z_n = (z - mean) / (std + 1e-5), the epsilon added to the
  STANDARD DEVIATION; RAE's stat.pt stores the variance and divides by sqrt(var + 1e-5). Both are
  per position on the (C, H, W) grid. A folder read here keeps diffusers' convention exactly
  (`stats()` returns mean and std + 1e-5), so latents match diffusers' `encode` bit for bit in float32.
- the decoder's sin-cos table is rebuilt by diffusers with positions spaced 16 / side (its
  get_2d_sincos_pos_embed base_size 16): on the 16 x 16 grid of the 256-px releases it is RAE's table
  exactly; on other grids it is not, and a folder read here decodes as diffusers does (`pos_step`).
- `scaling_factor` multiplies the normalised latents (1.0 in NYU's releases); other values are refused.

This module reads tensors and config only; encoders/, models/pixel_decoder.py and models/stats.py
build the networks from what it returns.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flatdino_cli.errors import UserError

CLASS_NAME = "AutoencoderRAE"
CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
STD_EPS = 1e-5  # diffusers: (z - mean) / (latents_std + 1e-5)
HEAD_DIM = 64  # diffusers builds every encoder with heads = hidden / 64
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def is_rae_folder(path) -> bool:
    """A diffusers AutoencoderRAE folder (its config.json names the class)."""
    p = Path(path) if path is not None else None
    if p is None or not (p / CONFIG).is_file():
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder) -> dict:
    """config.json with diffusers' defaults filled in; one-line UserError for what we cannot read."""
    folder = Path(folder)
    cfg = json.loads((folder / CONFIG).read_text())
    defaults = dict(encoder_type="dinov2", encoder_hidden_size=768, encoder_patch_size=14, encoder_num_hidden_layers=12,
                    decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                    decoder_intermediate_size=2048, patch_size=16, encoder_input_size=224, num_channels=3,
                    scaling_factor=1.0)
    cfg = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg["encoder_type"] != "dinov2":
        raise UserError(f"{folder}: an AutoencoderRAE with a {cfg['encoder_type']} encoder; flatdino reads the "
                        "DINOv2-with-registers ones (nyu-visionx/RAE-dinov2-*)")
    if cfg["scaling_factor"] != 1.0:
        raise UserError(f"{folder}: scaling_factor {cfg['scaling_factor']} is not supported (RAE's releases use 1.0)")
    for key, want in zip(("encoder_norm_mean", "encoder_norm_std"), IMAGENET):
        if cfg.get(key) is not None and any(abs(a - b) > 1e-6 for a, b in zip(cfg[key], want)):
            raise UserError(f"{folder}: {key} {cfg[key]} is not ImageNet's; flatdino normalises images with {want}")
    grid = cfg["encoder_input_size"] // cfg["encoder_patch_size"]
    cfg["num_patches"] = grid * grid
    cfg["image_size"] = cfg.get("image_size") or cfg["patch_size"] * grid
    return cfg


def _tensors(folder: Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise UserError(f"{folder}: AutoencoderRAE folder without {WEIGHTS}")
    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    if prefix is None:
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def weights_path(folder) -> Path:
    return Path(folder) / WEIGHTS


def tensor_shapes(folder) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the folder's weights, from the safetensors header alone (nothing loaded)."""
    path = weights_path(folder)
    if not path.is_file():
        raise UserError(f"{folder}: AutoencoderRAE folder without {WEIGHTS}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's fault
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None


# ----------------------------------------------------------------------------- encoder
def encoder_sizes(folder) -> dict:
    """image_size, patch_size, dim, depth, heads of the folder's DINOv2 encoder."""
    c = read_config(folder)
    dim = c["encoder_hidden_size"]
    return dict(image_size=c["encoder_input_size"], patch_size=c["encoder_patch_size"], dim=dim,
                depth=c["encoder_num_hidden_layers"], heads=max(dim // HEAD_DIM, 1))


def encoder_state_dict(folder) -> dict[str, torch.Tensor]:
    """The encoder's transformers Dinov2WithRegistersModel state dict (encoders/keys.py maps it to timm)."""
    sd = _tensors(Path(folder), "encoder.")
    if not sd:
        raise UserError(f"{folder}: AutoencoderRAE weights without encoder.* tensors")
    return sd


# ----------------------------------------------------------------------------- decoder
POS_BASE = 16  # diffusers' get_2d_sincos_pos_embed(base_size=16): positions arange(side) * 16 / side


def pos_step(side: int) -> float:
    return POS_BASE / side

_ATTN = {"to_q": "attention.attention.query", "to_k": "attention.attention.key",
         "to_v": "attention.attention.value", "to_out.0": "attention.output.dense"}


def decoder_rae_state_dict(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """(the decoder in RAE's GeneralDecoder key layout, {heads, ln_eps}); the sin-cos table diffusers does
    not store is left to the caller's rebuild."""
    folder = Path(folder)
    c = read_config(folder)
    out = {}
    for k, v in _tensors(folder, "decoder.").items():
        for ours, rae in _ATTN.items():
            k = k.replace(f".attention.{ours}.", f".{rae}.")
        out[k] = v
    if "decoder_embed.weight" not in out:
        raise UserError(f"{folder}: AutoencoderRAE weights without decoder.decoder_embed.weight")
    return out, {"heads": c["decoder_num_attention_heads"], "ln_eps": 1e-12}


def decoder_diffusers_state_dict(rae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RAE GeneralDecoder keys -> AutoencoderRAE's `decoder.*` keys (no pos table: diffusers rebuilds it)."""
    out = {}
    for k, v in rae_sd.items():
        if k == "decoder_pos_embed":
            continue
        for ours, rae in _ATTN.items():
            k = k.replace(f".{rae}.", f".attention.{ours}.")
        out["decoder." + k] = v.detach().float().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------- latent statistics
def stats(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std + 1e-5) in RAE's (C, H, W) layout: exactly diffusers' divisor (module docstring)."""
    folder = Path(folder)
    sd = _tensors(folder)
    mean, std = sd.get("_latents_mean"), sd.get("_latents_std")
    if mean is None or std is None or (mean.numel() == 1 and std.numel() == 1):
        raise UserError(f"{folder}: this AutoencoderRAE holds no latent statistics (latents_mean / latents_std); "
                        "pass RAE's stat.pt with --stats, or compute them with train-dit --compute-stats")
    c = read_config(folder)
    side = math.isqrt(c["num_patches"])
    out = []
    for name, t in (("latents_mean", mean), ("latents_std", std)):
        t = t.float()
        while t.dim() > 3 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[1:] != (side, side) and t.shape[1:] != (1, 1):
            raise UserError(f"{folder}: {name} has shape {tuple(t.shape)}; expected (C, {side}, {side}) or (C, 1, 1)")
        out.append(t)
    return out[0], out[1] + STD_EPS


# ----------------------------------------------------------------------------- writing a folder
ENCODER_TABLE_SIZE = 518  # diffusers builds the DINOv2 encoder's position table for 518 px (37 x 37 at patch 14)


def encoder_table_grid(patch_size: int) -> int:
    return ENCODER_TABLE_SIZE // patch_size


def transformers_major() -> int:
    """The installed transformers' major version (its DINOv2 attention names changed at 5); 5 without it."""
    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 5


def encoder_diffusers_state_dict(timm_sd: dict[str, torch.Tensor], new_names: bool = True) -> dict[str, torch.Tensor]:
    """A timm DINOv2-reg4 state dict (position table on the 518-px grid) -> AutoencoderRAE's `encoder.*`
    keys (transformers' Dinov2WithRegistersModel; new_names: transformers >= 5's q_proj / o_proj, else
    attention.attention.query / attention.output.dense). timm folds the CLS position into cls_token
    and stores the patch rows only; the HF table gets a zero CLS row. The final norm's affine, unused
    (non-affine LayerNorm), is left out as diffusers does."""
    q, k, v, o = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj") if new_names else
                  ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                   "attention.output.dense"))
    out = {}
    for key, t in timm_sd.items():
        t = t.detach().float().cpu()
        parts = key.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, chunk in zip((q, k, v), t.chunk(3, dim=0)):
                    out[pre + name + "." + parts[-1]] = chunk
                continue
            rest = (rest.replace("attn.proj.", o + ".").replace("ls1.gamma", "layer_scale1.lambda1")
                    .replace("ls2.gamma", "layer_scale2.lambda1"))
            out[pre + rest] = t
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + parts[-1]] = t
        elif key == "cls_token":
            out["embeddings.cls_token"] = t
        elif key == "reg_token":
            out["embeddings.register_tokens"] = t
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)
        elif not key.startswith(("norm.", "head.")):
            raise KeyError(f"no AutoencoderRAE name for encoder key {key!r}")
    out["embeddings.mask_token"] = torch.zeros(1, timm_sd["cls_token"].shape[-1])  # unused by RAE, stored by HF
    return {"encoder." + k: v.contiguous() for k, v in out.items()}


def folder_config(enc: dict, dec: dict, stats: tuple[torch.Tensor, torch.Tensor] | None, version: str) -> dict:
    """config.json of an AutoencoderRAE: enc = encoder_sizes' keys, dec = {width, depth, heads, mlp_hidden,
    patch_size}; stats (mean, latents_std) of shape (C, H, W) or None."""
    return {"_class_name": CLASS_NAME, "_diffusers_version": version, "encoder_type": "dinov2",
            "encoder_hidden_size": enc["dim"], "encoder_patch_size": enc["patch_size"],
            "encoder_num_hidden_layers": enc["depth"], "encoder_input_size": enc["image_size"],
            "decoder_hidden_size": dec["width"], "decoder_num_hidden_layers": dec["depth"],
            "decoder_num_attention_heads": dec["heads"], "decoder_intermediate_size": dec["mlp_hidden"],
            "patch_size": dec["patch_size"], "num_channels": 3, "image_size": None,
            "encoder_norm_mean": IMAGENET[0], "encoder_norm_std": IMAGENET[1],
            "latents_mean": stats[0].tolist() if stats else None, "latents_std": stats[1].tolist() if stats else None,
            "noise_tau": 0.0, "reshape_to_2d": True, "scaling_factor": 1.0, "use_encoder_loss": False}


def extra_tensors(stats: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The image normalisation and latent statistics buffers (diffusers' no-op 0 / 1 without statistics)."""
    mean, std = stats if stats else (torch.zeros(1), torch.ones(1))
    return {"encoder_mean": torch.tensor(IMAGENET[0]).view(1, 3, 1, 1), "encoder_std": torch.tensor(IMAGENET[1]).view(1, 3, 1, 1),
            "_latents_mean": mean.float().contiguous(), "_latents_std": std.float().contiguous()}

"""Frozen DINOv2-with-registers encoders (timm): named specs, weights resolution, the feature output.

The feature every stage consumes (DESIGN.md "Conventions", INTEROP.md A1): last block output ->
LayerNorm WITHOUT affine (eps 1e-6) -> drop CLS + 4 registers -> (B, N, C) float32, N = grid h*w.
Input: images already resized to `spec.image_size` and normalised with ImageNet mean/std
(`flatdino_cli.data.normalize`; data/transforms.py owns the transforms).

Weights for `load_encoder(name, weights)`:
- `weights=FILE` (.safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True)) in the timm,
  the Hugging Face `Dinov2WithRegistersModel` (old and new attention key names) or Meta's DINOv2
  layout; a pos-embed grid that differs from the spec's is resampled bicubic + antialias like HF.
- `weights=DIR`, a diffusers AutoencoderRAE folder: its encoder, with the sizes of its config.json
  (interop/diffusers.py).
- no file, a spec with hub repos (dinov2-b-reg4): the Hugging Face cache (HF_HUB_CACHE / HF_HOME),
  looked up by us, never through timm's download with its minute of retries. On a cache miss we
  download only if HF_HUB_OFFLINE is unset and one HEAD request for the file succeeds within 2 s;
  otherwise a one-line UserError naming `--encoder-weights FILE` and the cache directory.
- no file, no hub repos (tiny): random init from the spec's fixed seed, identical in every process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from flatdino_cli.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from flatdino_cli.errors import UserError
from flatdino_cli.interop import diffusers as rae_folder
from flatdino_cli.nn.embed import sincos_2d
from flatdino_cli.utils import sha256_file

__all__ = ["NUM_REGISTERS", "NUM_PREFIX_TOKENS", "IMAGENET_MEAN", "IMAGENET_STD", "normalize", "EncoderSpec",
           "ENCODERS", "get_spec", "FrozenEncoder", "default_crop_size", "load_encoder", "read_state_dict", "hf_cache_dir", "cached_hub_weights"]

NUM_REGISTERS = 4
NUM_PREFIX_TOKENS = 1 + NUM_REGISTERS  # CLS + registers; FrozenEncoder checks timm's own count against it


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder: the timm DINOv2-reg4 family at a given size, and where its weights come from."""

    name: str
    image_size: int  # square input side in pixels
    patch_size: int
    dim: int
    depth: int
    heads: int
    description: str
    interpolation: str = "bicubic"  # default resize to image_size (generator pipeline, DESIGN.md)
    hub_repos: tuple[str, ...] = ()  # HF repos whose cached weights fit; the first one is downloadable
    seed: int = 0  # random init when there are no weights (tiny)
    arch: str = "vit_base_patch14_reg4_dinov2"  # timm family; width/depth/heads/patch/size from the spec

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in [
    EncoderSpec("dinov2-b-reg4", image_size=224, patch_size=14, dim=768, depth=12, heads=12,
                description="DINOv2 ViT-B/14 + 4 registers (LVD-142M), 224 px -> 16x16 patches",
                hub_repos=("timm/vit_base_patch14_reg4_dinov2.lvd142m", "facebook/dinov2-with-registers-base")),
    # RAE's DiT-XL anchor numbers (seed 002) were measured on DINOv2-S features (16x16 x 384)
    EncoderSpec("dinov2-s-reg4", image_size=224, patch_size=14, dim=384, depth=12, heads=6,
                description="DINOv2 ViT-S/14 + 4 registers (LVD-142M), 224 px -> 16x16 patches x 384",
                hub_repos=("timm/vit_small_patch14_reg4_dinov2.lvd142m", "facebook/dinov2-with-registers-small"),
                arch="vit_small_patch14_reg4_dinov2"),
    # FAE's ImageNet numbers (seed 004) use DINOv2-g/14 (1536-d); its MLP is SwiGLU (hidden 4096)
    EncoderSpec("dinov2-g-reg4", image_size=224, patch_size=14, dim=1536, depth=40, heads=24,
                description="DINOv2 ViT-g/14 + 4 registers (LVD-142M), 224 px -> 16x16 patches x 1536",
                hub_repos=("timm/vit_giant_patch14_reg4_dinov2.lvd142m", "facebook/dinov2-with-registers-giant"),
                arch="vit_giant_patch14_reg4_dinov2"),
    # Same timm architecture (LayerScale, registers, no pos-embed on prefix tokens), CPU-sized: width 64,
    # 4 blocks, 4 heads, 48 px / patch 8 -> 6x6 = 36 patches. Random DINOv2 init has LayerScale 1e-5,
    # so the blocks are near identity and features are ~ LN(patch embedding + pos embedding), with a
    # sin-cos pos embedding in place of timm's near-zero random one (see _give_position).
    EncoderSpec("tiny", image_size=48, patch_size=8, dim=64, depth=4, heads=4,
                description="for testing only: random weights (fixed seed), DINOv2-reg4 architecture"),
    # The same tiny encoder at patch 4: a 12x12 = 144-patch grid, long against a 16-token laminator as
    # DINOv2-B's 256 patches are against FlatDINO's 32 tokens (9x vs 8x): `flatdino compare`'s toy grid.
    EncoderSpec("tiny-p4", image_size=48, patch_size=4, dim=64, depth=4, heads=4,
                description="for testing only: the tiny encoder at patch 4, 48 px -> 12x12 patches x 64"),
]}


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise UserError(f"--encoder {name!r}: unknown encoder; valid names: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def _build_vit(spec: EncoderSpec) -> nn.Module:
    """The timm model for `spec`, randomly initialised from `spec.seed` without touching the global RNG."""
    import timm

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


# ============================================================================ weight files
def read_state_dict(path: str | Path, label: str = "--encoder-weights") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / torch file (weights_only), unwrapped and with wrapper prefixes stripped.
    `label` names the file's origin in error messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{label} {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

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
            from timm.layers import resample_abs_pos_embed

            sd = {**sd, "pos_embed": resample_abs_pos_embed(
                pos.float(), new_size=list(model.patch_embed.grid_size), old_size=[old, old],
                num_prefix_tokens=0, interpolation="bicubic", antialias=True)}
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, spec: EncoderSpec) -> None:
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


# ============================================================================ the HF cache
def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment now (not at import time)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def cached_hub_weights(*repos: str) -> Path | None:
    """The first cached weights file (model.safetensors, else pytorch_model.bin) of `repos`, in order;
    None when none is cached. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    for repo in repos:
        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname, cache_dir=hf_cache_dir())
            if isinstance(hit, str):
                return Path(hit)
    return None


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hub_serves(url: str, timeout: float = 2.0) -> bool:
    """One HEAD request (no retries, proxies from the environment), bounded even if DNS hangs. A bare TCP
    connect is not enough: sandboxes and captive proxies accept any connection and then answer 404."""
    import urllib.request

    ok: list[bool] = []

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                ok.append(r.status < 400)
        except Exception:  # noqa: BLE001 - any failure means "do not try to download"
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return any(ok)


def _pretrained_file(spec: EncoderSpec) -> Path:
    """The cached weights file of spec's hub repos; downloads only when the hub is provably reachable."""
    cached = cached_hub_weights(*spec.hub_repos)
    if cached is not None:
        return cached
    cache = hf_cache_dir()
    repo, endpoint = spec.hub_repos[0], _hub_endpoint()
    if _hub_offline():
        why = "HF_HUB_OFFLINE is set"
    elif not _hub_serves(f"{endpoint}/{repo}/resolve/main/model.safetensors"):
        why = f"{endpoint} unreachable"
    else:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo, "model.safetensors", cache_dir=cache, endpoint=endpoint))
        except Exception as e:  # noqa: BLE001
            why = f"download failed: {type(e).__name__}"
    raise UserError(f"encoder {spec.name}: no pretrained weights of {repo} in the Hugging Face cache {cache} "
                    f"({why}); pass --encoder-weights FILE (.safetensors/.pth, timm or HF layout)")


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
        path = _pretrained_file(spec)  # resolved before building the model: a miss fails fast
        sd, source = read_state_dict(path, "cached weights"), f"cached weights {path}"
        repo = path.parent.parent.parent.name.removeprefix("models--").replace("--", "/")
        wid = f"hf:{repo}@{path.parent.name}"  # cache layout: models--org--name/snapshots/<rev>/file
    else:
        sd, source, wid = None, "", f"random-init(seed={spec.seed}, sincos-pos x{RANDOM_INIT_POSITION_SCALE}): for testing only"
    if input_size:
        spec = dataclasses.replace(spec, image_size=input_size)
    model = _build_vit(spec)
    if sd is not None:
        _load_into(model, sd, source, spec)
    else:
        _give_position(model, spec)
    return FrozenEncoder(model, spec, wid).to(device)

"""Analytic FLOPs (Appendix H of the FlatDINO paper) and measured DiT throughput.

Convention (the paper's): one multiply-add = 1 FLOP, batch 1, forward pass. A transformer layer of
width D over S tokens costs 2·S·D·(6D + S): QKV + output projections 4SD², the two attention matmuls
2S²D, and a SwiGLU MLP with hidden 8D/3 (= a ratio-4 MLP) 8SD². Embeddings, norms, adaLN modulation
and output heads are ignored. GFLOPs = 1e9 FLOPs. A training step costs 3 x forward (backward ~ 2 x
forward) plus the per-image encoding: DINOv2-B for every generator, plus the VAE encoder for a
generator on latents.

Rounding: the paper quotes the encoder costs as 23.4 (DINOv2-B) and 26.0 (FlatDINO encoder) GFLOPs
and adds those quoted numbers to 3 x forward. With `paper_rounding=True` (default) we do the same
(each encoder's cost rounded to 0.1 GFLOPs before the sum), which reproduces every cell of Tables
7-9; with exact encoder costs two training-step cells would print 0.1 higher (DiT-XL on RAE 378.6
instead of 378.5, DiT-L on FlatDINO 78.6 instead of 78.5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from flatdino_cli.config_yaml import load_preset
from flatdino_cli.errors import UserError
from flatdino_cli.flow import network_evaluations
from flatdino_cli.models import build_model
from flatdino_cli.runtime import Runtime, synchronize
from flatdino_cli.utils import atomic_write_json

GIGA = 1e9  # decimal GFLOPs: binary 2^30 would give DiT-L 75.0 instead of the paper's 80.5

# DINOv2-B/14 with 4 registers at 224 px: 256 patches + CLS + 4 registers, ViT-B.
DINO_TOKENS, DINO_WIDTH, DINO_DEPTH = 261, 768, 12
DINO_FEATURE_DIM, DINO_PATCHES = 768, 256

# the vae-32x128 encoder architecture (ViT-B) used when no VAE config is given
DEFAULT_ENC_WIDTH, DEFAULT_ENC_DEPTH = 768, 12

TRAIN_FORWARD_FACTOR = 3  # forward + backward ~ 3 x forward

_SIZES = {(384, 12): "S", (768, 12): "B", (1024, 24): "L", (1152, 28): "XL"}


# ----------------------------------------------------------------------------- per-layer / per-model
def layer_flops(S: int, D: int) -> float:
    """FLOPs of one transformer layer of width D over S tokens: 2·S·D·(6D + S)."""
    return float(2 * S * D * (6 * D + S))


def attention_flops(S: int, D: int) -> float:
    """FLOPs of an attention sub-layer alone (QKV + output projections, QK^T and AV): 2·S·D·(2D + S)."""
    return float(2 * S * D * (2 * D + S))


def _model(cfg: Any) -> Any:
    """A stage config (with .model) or a model config -> the model config (duck-typed)."""
    return getattr(cfg, "model", cfg)


def dit_forward_flops(model_cfg: Any) -> float:
    """DiT trunk (depth x width) plus the optional DDT head (head_depth x head_width), over its sequence
    (cfg.tokens, or tokens / patch^2 for a patched grid)."""
    m = _model(model_cfg)
    S = getattr(m, "seq_len", m.tokens)
    f = m.depth * layer_flops(S, m.width)
    if getattr(m, "head_depth", 0):
        f += m.head_depth * layer_flops(S, m.head_width)
    return f


def dinov2_flops() -> float:
    """DINOv2-B encoding of one image: 12 layers, D=768, S=261 (paper eq. 12: 23.4 GFLOPs)."""
    return DINO_DEPTH * layer_flops(DINO_TOKENS, DINO_WIDTH)


def vae_encoder_flops(vae_cfg: Any) -> float:
    """The laminator's encoder on one image.

    kind "flat": enc_depth ViT layers of enc_width over num_patches + tokens (paper eq. 13: 26.0); at
    patch_group g, over num_patches / g^2 + tokens (the in and out projections are not counted).
    kind "fae": FAE's encoder is a single self-attention layer (no MLP) over the P patches that
    attends in a space of width I = enc_width from features of width C = feature_dim (models/fae.py):
    QKV + output projections 4·P·C·I plus the two attention matmuls 2·P²·I, i.e. 2·P·I·(2C + P)
    (= attention_flops(P, D) when I = C = D); the latent projection (a head) is ignored.
    """
    m = _model(vae_cfg)
    if getattr(m, "kind", "flat") == "fae":
        C = getattr(m, "feature_dim", m.enc_width)
        return 2.0 * m.num_patches * m.enc_width * (2 * C + m.num_patches)
    return m.enc_depth * layer_flops(flat_vae_sequence(m), m.enc_width)


def flat_vae_sequence(m: Any) -> int:
    """The flat laminator's sequence: its T tokens beside the patches, g x g of them a token at patch_group g."""
    return m.num_patches // getattr(m, "patch_group", 1) ** 2 + m.tokens


def encoder_flops(vae_cfg: Any | None = None, *, dino: bool = True) -> float:
    """Per-image encoding: DINOv2-B (if dino) plus the VAE encoder of vae_cfg (if given)."""
    return (dinov2_flops() if dino else 0.0) + (vae_encoder_flops(vae_cfg) if vae_cfg is not None else 0.0)


def train_step_flops(forward: float, encoding: float) -> float:
    """One training sample: 3 x forward (forward + backward) + its encoding."""
    return TRAIN_FORWARD_FACTOR * forward + encoding


def train_flops_per_image(dit_cfg: Any, vae_cfg: Any | None = None, dino: bool = True) -> float:
    """Exact training FLOPs of one image for a DiT: 3 x forward + the encoding (DINOv2-B if `dino`, plus the
    laminator's encoder when the DiT trains on its latents, i.e. when vae_cfg is given)."""
    return train_step_flops(dit_forward_flops(dit_cfg), encoder_flops(vae_cfg, dino=dino))


def dit_step_flops(dit_cfg: Any, vae_model: Any | None = None) -> float:
    """Training FLOPs of one optimizer step (the global batch) of a DiT stage config, shaped to its store, on
    the latents of a laminator with model config `vae_model` (None: on raw features). DINOv2-B's encoding
    is counted only when the features are its 256 x 768, so toy runs on a tiny encoder are not swamped."""
    m = vae_model if vae_model is not None else dit_cfg.model
    shape = (m.num_patches, m.feature_dim) if vae_model is not None else (m.tokens, m.in_dim)
    dino = shape == (DINO_PATCHES, DINO_FEATURE_DIM)
    return dit_cfg.train.batch_size * train_flops_per_image(dit_cfg, vae_model, dino=dino)


# ----------------------------------------------------------------------------- sampling
def vae_decoder_flops(vae_cfg: Any) -> float:
    """The laminator's decoder on one latent: dec_depth layers of dec_width over num_patches + tokens
    (models/vae.py: the P patch queries attend with the T latent tokens)."""
    m = _model(vae_cfg)
    return m.dec_depth * layer_flops(flat_vae_sequence(m), m.dec_width)


def pixel_decoder_flops(dec_cfg: Any) -> float:
    """The pixel decoder on one image: depth layers of width over the P patches + CLS."""
    m = _model(dec_cfg)
    return m.depth * layer_flops(m.num_patches + 1, m.width)


def dit_forwards_per_image(flow: Any) -> float:
    """DiT forwards per image of one sampling run: one per velocity evaluation of the sampler, two
    (conditional + unconditional halves) where guidance is on (a weight != 1 at that time)."""
    return float(network_evaluations(flow))


def sample_flops(dit_cfg: Any, flow: Any, dec_cfg: Any, vae_cfg: Any | None = None) -> dict[str, float]:
    """FLOPs of the whole sampling pipeline per image, by stage: DiT forwards x forwards per image,
    the VAE decoder (FlatDINO; None for an RAE-mode DiT) and the pixel decoder."""
    parts = {"dit": dit_forward_flops(dit_cfg) * dit_forwards_per_image(flow),
             "vae_decoder": vae_decoder_flops(vae_cfg) if vae_cfg is not None else 0.0,
             "pixel_decoder": pixel_decoder_flops(dec_cfg)}
    return {**parts, "total": sum(parts.values())}


# ----------------------------------------------------------------------------- tables
def is_raw_feature_dit(model_cfg: Any) -> bool:
    """An RAE-style generator: a 2-D grid of raw 768-d DINOv2 features (no VAE in the loop)."""
    m = _model(model_cfg)
    return getattr(m, "grid", None) is not None and m.in_dim == DINO_FEATURE_DIM


def dit_name(model_cfg: Any) -> str:
    """Display name: DiT-XL, DiT-DH-XL, or DiT-<width>x<depth> for sizes that are not S/B/L/XL."""
    m = _model(model_cfg)
    size = _SIZES.get((m.width, m.depth), f"{m.width}x{m.depth}")
    return f"DiT-DH-{size}" if getattr(m, "head_depth", 0) else f"DiT-{size}"


def default_vae(tokens: int = 32) -> SimpleNamespace:
    """The vae-32x128 encoder architecture (ViT-B over 256 patches + T queries) with T tokens."""
    return SimpleNamespace(kind="flat", tokens=tokens, num_patches=DINO_PATCHES,
                           enc_width=DEFAULT_ENC_WIDTH, enc_depth=DEFAULT_ENC_DEPTH)


def _quote(flops: float, paper_rounding: bool) -> float:
    """An encoder cost as the paper quotes it (0.1 GFLOPs), or exact."""
    return round(flops / GIGA, 1) * GIGA if paper_rounding else flops


def _column(model_cfg: Any, vae_cfg: Any | None, paper_rounding: bool) -> dict[str, Any]:
    m = _model(model_cfg)
    raw = is_raw_feature_dit(m)
    parts = {"dinov2": _quote(dinov2_flops(), paper_rounding)}
    extra: dict[str, int] = {}
    if not raw:
        vae = _model(vae_cfg) if vae_cfg is not None else default_vae(m.tokens)
        parts["vae_encoder"] = _quote(vae_encoder_flops(vae), paper_rounding)
        extra["vae_encoder_tokens"] = vae.num_patches if getattr(vae, "kind", "flat") == "fae" else flat_vae_sequence(vae)
    forward = dit_forward_flops(m)
    encoding = sum(parts.values())
    return {
        "model": dit_name(m),
        "label": f"{'RAE' if raw else 'FlatDINO'}, {m.tokens} tokens",
        "tokens": m.tokens,
        "forward": forward,
        "encoding": encoding,
        "encoding_parts": parts,
        "train_step": train_step_flops(forward, encoding),
        **extra,
    }


def flops_table(a_cfg: Any, b_cfg: Any, vae_cfg: Any | None = None, *, paper_rounding: bool = True) -> dict:
    """FLOPs of two DiT generators side by side (JSON-ready; values in FLOPs, not GFLOPs).

    a_cfg/b_cfg: DiTStageConfig or DiTModelConfig (duck-typed). A raw-feature DiT (grid set, in_dim
    768) is encoded by DINOv2 only; a latent DiT by DINOv2 + the VAE encoder of vae_cfg (default: the
    vae-32x128 encoder architecture, ViT-B, with T = the DiT's token count). Ratios are a / b.
    """
    a, b = _column(a_cfg, vae_cfg, paper_rounding), _column(b_cfg, vae_cfg, paper_rounding)
    return {
        "unit": "FLOPs per image (1 multiply-add = 1 FLOP, batch 1)",
        "paper_rounding": paper_rounding,
        "a": a,
        "b": b,
        "ratio": {k: a[k] / b[k] for k in ("forward", "encoding", "train_step")},
    }


def appendix_h_tables(paper_rounding: bool = True) -> list[dict]:
    """The paper's Tables 7-9: DiT-L, DiT-XL, DiT-DH-XL on RAE (256 x 768) vs FlatDINO (vae-32x128).

    There is no RAE DiT-L preset: it is rae-xl-256x768 at the L size (1024 wide, 24 layers).
    """
    rae_xl = load_preset("rae-xl-256x768").model
    rae_l = replace(rae_xl, width=1024, depth=24, heads=16, mlp_hidden=2731)
    vae = load_preset("vae-32x128")
    pairs = [(rae_l, load_preset("l-32x128")), (rae_xl, load_preset("xl-32x128")),
             (load_preset("rae-dh-xl-256x768"), load_preset("dh-xl-32x128"))]
    return [flops_table(a, b, vae, paper_rounding=paper_rounding) for a, b in pairs]


def _g(x: float) -> str:
    return f"{x / GIGA:.1f}"


def format_table(table: dict | Sequence[dict]) -> str:
    """A readable GFLOPs table (1 decimal, ratios "8.3x"); a list of tables shares one header per
    distinct pair of column labels, as in the paper's Tables 7-9."""
    tables = [table] if isinstance(table, dict) else list(table)
    rows: list[tuple[str, str, str, str]] = []
    last_labels = None
    for tb in tables:
        a, b, r = tb["a"], tb["b"], tb["ratio"]
        labels = (a["label"], b["label"])
        if labels[0] == labels[1]:  # same kind of generator: tell the columns apart by model
            labels = (f"{a['model']}, {a['label']}", f"{b['model']}, {b['label']}")
        if labels != last_labels:
            if rows:
                rows.append(("", "", "", ""))
            rows.append(("GFLOPs", *labels, "ratio"))
            last_labels = labels
        name = a["model"] if a["model"] == b["model"] else f"{a['model']} / {b['model']}"
        rows.append((f"{name} forward", _g(a["forward"]), _g(b["forward"]), f"{r['forward']:.1f}x"))
    # encoding rows: one per distinct encoding, as the paper lists it once
    seen, notes = set(), []
    for tb in tables:
        a, b = tb["a"], tb["b"]
        key = (a["encoding"], b["encoding"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(("encoding per image", _g(a["encoding"]), _g(b["encoding"]), ""))
        pa, pb = _parts(a), _parts(b)
        notes.append(f"encoding: {pa}" if pa == pb else f"encoding: {pa} | {pb}")
    for tb in tables:
        a, b, r = tb["a"], tb["b"], tb["ratio"]
        name = a["model"] if a["model"] == b["model"] else f"{a['model']} / {b['model']}"
        rows.append((f"{name} training step (3 x fwd + enc)", _g(a["train_step"]), _g(b["train_step"]),
                     f"{r['train_step']:.1f}x"))
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{row[0]:<{w[0]}}  {row[1]:>{w[1]}}  {row[2]:>{w[2]}}  {row[3]:>{w[3]}}".rstrip() for row in rows]
    lines += notes
    lines.append("1 multiply-add = 1 FLOP, batch 1, GFLOPs = 1e9 FLOPs; layer = 2·S·D·(6D + S)")
    return "\n".join(lines)


def _parts(col: dict) -> str:
    out = f"DINOv2-B (S={DINO_TOKENS}) {_g(col['encoding_parts']['dinov2'])}"
    if "vae_encoder" in col["encoding_parts"]:
        out += f" + VAE encoder (S={col['vae_encoder_tokens']}) {_g(col['encoding_parts']['vae_encoder'])}"
    return out


# ----------------------------------------------------------------------------- measured throughput
def measure_throughput(build_model: Callable[[], nn.Module], batch_sizes: Sequence[int], tokens: int, in_dim: int,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seconds: float = 1.0, warmup: int = 2) -> list[dict]:
    """Forward passes per second of model(x (B, N, d), t (B,), y (B,)) for each batch size.

    The model is built once, put in eval mode on `device`; a non-fp32 dtype runs under autocast.
    Each batch size gets `warmup` untimed passes, then passes are timed (synchronised) until
    `seconds` have elapsed (at least one). A batch that runs out of memory ends the sweep and is
    recorded with "oom": True.
    """
    device = torch.device(device)
    model = build_model().to(device).eval()
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    out: list[dict] = []
    for B in batch_sizes:
        x = torch.randn(B, tokens, in_dim, device=device)  # (B, N, d)
        t = torch.rand(B, device=device)  # (B,)
        y = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        try:
            with torch.no_grad(), torch.autocast(**amp):
                for _ in range(warmup):
                    model(x, t, y)
                synchronize(device)
                n, start = 0, time.perf_counter()
                while True:
                    model(x, t, y)
                    n += 1
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                    if elapsed >= seconds:
                        break
        except torch.OutOfMemoryError:
            out.append({"batch": B, "oom": True})
            break
        out.append({"batch": B, "forward_per_s": n / elapsed, "samples_per_s": B * n / elapsed,
                    "ms_per_forward": 1e3 * elapsed / n, "iters": n})
    return out


def plot_throughput(results_a: list[dict], results_b: list[dict], labels: Sequence[str], path: str | Path,
                    key: str = "forward_per_s") -> Path:
    """Log-log throughput (key) vs batch size for two sweeps of measure_throughput; writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy
    from matplotlib.figure import Figure  # heavy

    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for res, label, marker in zip((results_a, results_b), labels, ("o", "s")):
        pts = [(r["batch"], r[key]) for r in res if not r.get("oom") and r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel({"forward_per_s": "forward passes / s", "samples_per_s": "samples / s"}.get(key, key))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------- `flatdino flops`
def run_flops(preset: str | None = None, vs: str | None = None, vae: str | None = None, exact: bool = False,
              sizes: Sequence[int] | None = None, seconds: float = 1.0, out: Path = Path("flops"),
              rt: Runtime | None = None) -> dict:
    """{"tables": ...}: the paper's three tables, or PRESET against VS (defaults xl-32x128 against
    rae-xl-256x768). With `sizes`: also "measured", the forward throughput of both presets over that
    batch sweep on `rt`, plotted to OUT/throughput.png; the whole result goes to OUT/flops.json."""
    vae_cfg = load_preset(vae).model if vae else None
    names = (preset or "xl-32x128", vs or "rae-xl-256x768")
    if preset is None and vs is None:
        tables = appendix_h_tables(paper_rounding=not exact)
    else:
        a, b = (load_preset(n) for n in names)
        for name, c in ((preset, a), (vs, b)):
            if c.stage != "dit":
                raise UserError(f"flops: preset {name} is a {c.stage} preset; pass DiT presets")
        # the paper's layout: the baseline (--vs) first, ratio = baseline / preset = the preset's speedup
        tables = [flops_table(b, a, vae_cfg, paper_rounding=not exact)]
    result: dict = {"tables": tables}
    if sizes is None:
        return result
    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
    runs = []
    for name in names:
        cfg = load_preset(name)
        runs.append(measure_throughput(lambda c=cfg: build_model(c).eval(), sizes, cfg.model.tokens,
                                       cfg.model.in_dim, rt.device, dtype, seconds))
    out.mkdir(parents=True, exist_ok=True)
    plot_throughput(runs[0], runs[1], list(names), out / "throughput.png")
    speed = [ra["forward_per_s"] / rb["forward_per_s"] for ra, rb in zip(*runs)
             if "forward_per_s" in ra and "forward_per_s" in rb]  # preset over --vs
    result["measured"] = {"dtype": str(dtype), "device": str(rt.device), names[0]: runs[0], names[1]: runs[1],
                          "speedup": speed}
    atomic_write_json(out / "flops.json", result)
    return result

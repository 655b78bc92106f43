"""`flatdino info PATH`: what a run, an exported model, a store, a sample set or one of RAE's released
files (model.pt, stat.pt, or a diffusers AutoencoderRAE folder) is.

Returns ordered (label, value) facts; the CLI prints them aligned, or as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from flatdino_cli.checkpoint import load_weights, weights_file
from flatdino_cli.config_yaml import list_presets, load_preset, to_dict
from flatdino_cli.data import DONE, SKIPPED
from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import quality_summary
from flatdino_cli.hub import is_export, resolve
from flatdino_cli.interop import diffusers as D
from flatdino_cli.interop.diffusers import is_rae_folder
from flatdino_cli.models import count_parameters
from flatdino_cli.models.pixel_decoder import rae_state_dict_to_ours
from flatdino_cli.rundir import is_run_dir, read_metrics, run_config, run_inputs
from flatdino_cli.runs import run_summary
from flatdino_cli.utils import disk_use, human_bytes, read_json

RAE_LOADS = {
    "decoder": "RAE's pixel decoder (features -> pixels): pass it as --decoder FILE (sample, reconstruct, train-dit)",
    "stats": "RAE's latent statistics (mean/var per position): copy it into an rae-* DiT run as stats.pt",
    "dit": "an RAE stage-2 DiT checkpoint (model/ema state dicts)",
}


def matching_preset(cfg: Any) -> str | None:
    """The shipped preset whose model section this config's equals (a run records its resolved config),
    or one that differs only in the VAE's patch_group, named with it (the quickstart's VAE on tiny-p4)."""
    model = to_dict(cfg.model)
    presets = []
    for name in list_presets():
        try:
            p = load_preset(name)
        except UserError:
            continue
        if p.stage == cfg.stage:
            presets.append((name, to_dict(p.model)))
    for name, preset in presets:
        if _same_model(preset, model):
            return name
    for name, preset in presets:
        if "patch_group" in model and _same_model(preset, model, also=("patch_group",)):
            return f"{name} with model.patch_group={model['patch_group']}"
    return None


def _same_model(preset: dict, run: dict, also: tuple[str, ...] = ()) -> bool:
    """Equal, except the input sizes train-vae takes from the features (num_patches, feature_dim) and `also`."""
    skip = {"num_patches", "feature_dim", *also}
    return {k: v for k, v in preset.items() if k not in skip} == {k: v for k, v in run.items() if k not in skip}


def _params(cfg: Any) -> str:
    return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in count_parameters(cfg).items())


def _row(row: dict | None) -> str | None:
    if not row:
        return None
    vals = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, float))
    return f"{vals} (step {row['step']})"


def _encoder_name(*candidates: Any) -> str | None:
    """The first encoder name among identities ({"encoder": name, ...}) or plain names."""
    for c in candidates:
        name = c.get("encoder") if isinstance(c, dict) else c
        if isinstance(name, str):
            return name
    return None


def _data_identity(inputs: dict) -> str | None:
    """Where a run's data came from (inputs.json, and the store's manifest when it is still there)."""
    for key in ("latents", "features", "images"):
        v = inputs.get(key)
        if v is None:
            continue
        v = v if isinstance(v, dict) else {"path": v}
        manifest = read_json(Path(v["path"]) / "manifest.json") if v.get("path") else {}
        ident = v.get("identity") or manifest.get("identity") or {}
        parts = [f"{key} {v.get('path') or '(path not recorded)'}"]
        if ident.get("vae_run"):
            parts.append(f"from VAE {ident['vae_run']}")
        encoder = _encoder_name(ident, v.get("encoder"), inputs.get("encoder"),
                                manifest.get("extra", {}).get("encoder"))
        if encoder:
            parts.append(f"encoder {encoder}")
        if "count" in manifest:
            parts.append(f"{manifest['count']:,} items")
        elif inputs.get("train_images"):
            parts.append(f"{inputs['train_images']:,} training images")
        return ", ".join(parts)
    return None


def describe_run(path: Path) -> list[tuple[str, Any]]:
    cfg = run_config(path)
    export = is_export(path)
    facts: list[tuple[str, Any]] = [("what", f"{'exported ' if export else ''}{cfg.stage} run"),
                                    ("preset", matching_preset(cfg) or "custom (no shipped preset has this model)"),
                                    ("parameters", _params(cfg))]
    if cfg.stage == "vae":
        facts.append(("latents", f"{cfg.model.tokens} tokens x {cfg.model.latent_dim} ({cfg.model.kind}) from "
                                 f"{cfg.model.num_patches} x {cfg.model.feature_dim} features"))
    elif cfg.stage == "dit":
        k = cfg.model.num_classes
        facts.append(("generates", f"{cfg.model.tokens} x {cfg.model.in_dim}, "
                                   + (f"{k} classes" if k else "unconditional (trained without labels)")))
    else:
        facts.append(("decodes", f"{cfg.model.num_patches} x {cfg.model.in_dim} features -> "
                                 f"{cfg.model.image_size} px images"))
    facts.append(("data", _data_identity(run_inputs(path)) or "not recorded"))
    if export:
        meta = json.loads((path / "config.json").read_text())
        facts += [("steps", f"{meta.get('step')} / {meta.get('planned_steps') or '?'}"),
                  ("best val", _row((meta.get("metrics") or {}).get("best_val")) or "none"),
                  ("weights", f"{path / 'model.safetensors'} ({meta['weights']['source']} of the run)")]
    else:
        s = run_summary(path)
        facts += [("steps", f"{s['step']} / {s['planned_steps'] or '?'} (batch {cfg.train.batch_size})"),
                  ("last train", _row(s["last_train"]) or "none"),
                  ("best val", _row(s["best_val"]) or "none"),
                  ("checkpoint", s["checkpoint"] or "none yet")]
        if cfg.stage == "dit":
            q = quality_summary(read_metrics(path))
            facts.append(("fd_rep", f"{q['last']:.4g} at step {q['step']:,} (best {q['best']:.4g} at step "
                                    f"{q['best_step']:,})" if q else "no evaluations (eval.every=0, or none yet)"))
        if s["checkpoint"]:
            facts.append(("weights read", str(weights_file(path, cfg.stage))))
    facts.append(("disk", human_bytes(disk_use(path))))
    return facts


def describe_store(path: Path) -> list[tuple[str, Any]]:
    m = json.loads((path / "manifest.json").read_text())
    status = np.load(path / "done.npy", mmap_mode="r") if (path / "done.npy").is_file() else None
    done = int((status == DONE).sum()) if status is not None else 0
    skipped = int((status == SKIPPED).sum()) if status is not None else 0
    ident = m.get("identity", {})
    source = (f"VAE {ident['vae_run']} on {ident.get('features')}" if "vae_run" in ident
              else f"encoder {ident.get('encoder')} ({ident.get('weights') or 'no weights file'})")
    facts = [("what", f"{m['kind']} store"), ("items", f"{m['count']:,} x {tuple(m['item_shape'])} {m['dtype']}"),
             ("progress", f"{done:,} done, {skipped:,} unreadable, {m['count'] - done - skipped:,} pending"),
             ("made by", source)]
    if (path / "val" / "manifest.json").is_file():
        facts.append(("val split", f"{json.loads((path / 'val' / 'manifest.json').read_text())['count']:,} items"))
    facts.append(("disk", human_bytes(disk_use(path))))
    return facts


def _named(ident: Any) -> str | None:
    """A recorded model's path (identities are {"path": ..., "weights": ..., ...})."""
    return ident.get("path") if isinstance(ident, dict) else ident


def describe_samples(path: Path) -> list[tuple[str, Any]]:
    """A `flatdino sample` folder, from its samples.json: what made it, the solver and its cost."""
    m = read_json(path / "samples.json")
    ident, flow = m.get("identity") or {}, (m.get("identity") or {}).get("flow") or {}
    if not ident:
        raise UserError(f"{path / 'samples.json'}: unreadable or without an identity; rerun the sample command")
    classes = m.get("classes") or ident.get("classes") or []
    made = ", ".join(f"{k} {_named(ident[k])}" for k in ("dit", "vae", "decoder", "guide") if ident.get(k))
    solver = f"{flow.get('sampler')}, {flow.get('steps')} steps, shift {flow.get('shift')}"
    if flow.get("grid"):
        solver += f", {flow['grid']} time grid"
    if flow.get("cfg_schedule"):
        guidance = f"schedule {flow['cfg_schedule']}"
    else:
        lo, hi = flow.get("cfg_interval") or (0.0, 1.0)
        guidance = f"w {flow.get('cfg_scale')} on t in [{lo}, {hi}]"
    guidance = ("AutoGuidance " if ident.get("guide") else "CFG ") + guidance
    nfe, tally = m.get("network_evaluations"), m.get("adaptive_evaluations")
    evaluations = f"{nfe:g} network evaluations per image (a guided one counts 2)" if nfe is not None else "not recorded"
    if nfe is not None and tally:  # an adaptive solver (dopri5): the mean over what it made, chunk by chunk
        evaluations += f"; adaptive: mean over {tally['images']:,} images, {tally['min']}-{tally['max']} per chunk"
    if m.get("paper_sampler"):
        solver += " (the paper's setting, --paper-sampler)"
    return [("what", f"sample set ({'complete' if m.get('complete') else 'incomplete: rerun its sample command'})"),
            ("images", f"{ident.get('count', 0):,} at {ident.get('image_size')} px, {len(classes)} classes, "
                       f"seed {ident.get('seed')}"),
            ("made by", made or "not recorded"),
            ("solver", solver),
            ("guidance", guidance),
            ("evaluations", evaluations),
            ("disk", human_bytes(disk_use(path)))]


def describe_rae_file(path: Path) -> list[tuple[str, Any]]:
    sd = load_weights(path)
    keys = set(sd)
    if "decoder_embed.weight" in keys or ("embed.weight" in keys and "pred.weight" in keys):
        ours = rae_state_dict_to_ours(sd, str(path)) if "decoder_embed.weight" in keys else sd
        width, in_dim = ours["embed.weight"].shape
        patches = ours["pos_embed"].shape[1] - 1
        depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
        side = math.isqrt(patches) * math.isqrt(ours["pred.weight"].shape[0] // 3)
        kind, detail = "decoder", f"ViT width {width}, depth {depth}: {patches} x {in_dim} features -> {side} px images"
    elif keys & {"mean", "var"}:
        kind = "stats"
        detail = ", ".join(f"{k} {tuple(sd[k].shape)}" for k in ("mean", "var") if k in sd)
    elif keys & {"ema", "model"}:
        kind, detail = "dit", f"top-level keys {sorted(keys)[:6]}"
    else:
        raise UserError(f"{path}: not a file flatdino recognises (keys {sorted(keys)[:4]}): expected RAE's "
                        "decoder model.pt, stat.pt or a stage-2 checkpoint")
    n = sum(v.numel() for v in sd.values() if hasattr(v, "numel")) if kind == "decoder" else None
    facts = [("what", RAE_LOADS[kind]), ("contents", detail)]
    if n:
        facts.append(("parameters", f"{n / 1e6:.2f}M"))
    facts.append(("disk", human_bytes(disk_use(path))))
    return facts


def describe_rae_folder(path: Path) -> list[tuple[str, Any]]:
    """A diffusers AutoencoderRAE folder (NYU's RAE releases): its encoder, decoder and statistics."""
    c, shapes = D.read_config(path), D.tensor_shapes(path)
    enc = D.encoder_sizes(path)
    side = math.isqrt(c["num_patches"])
    count = {part: sum(math.prod(s) for k, s in shapes.items() if k.startswith(part + "."))
             for part in ("encoder", "decoder")}
    mean = shapes.get("_latents_mean", ())
    stats = (f"latents_mean / latents_std {mean}, applied as (z - mean) / (std + {D.STD_EPS:g})"
             if math.prod(mean) > 1 else "none (a DiT on it needs --stats stat.pt or train-dit --compute-stats)")
    return [
        ("what", f"diffusers {D.CLASS_NAME} folder: pass it as --encoder-weights DIR, --decoder DIR and --stats DIR"),
        ("encoder", f"DINOv2 with registers, width {enc['dim']}, depth {enc['depth']}, {enc['heads']} heads, "
                    f"patch {enc['patch_size']} at {enc['image_size']} px -> {side} x {side} = {c['num_patches']} "
                    f"patches ({count['encoder'] / 1e6:.2f}M parameters)"),
        ("decoder", f"ViT width {c['decoder_hidden_size']}, depth {c['decoder_num_hidden_layers']}, "
                    f"{c['decoder_num_attention_heads']} heads, mlp {c['decoder_intermediate_size']}, patch "
                    f"{c['patch_size']}: {c['num_patches']} x {enc['dim']} features -> {c['image_size']} px images "
                    f"({count['decoder'] / 1e6:.2f}M parameters)"),
        ("statistics", stats),
        ("disk", human_bytes(disk_use(path))),
    ]


def describe_pipeline_folder(path: Path) -> list[tuple[str, Any]]:
    """A DiT run exported as a diffusers pipeline (`export --format diffusers`)."""
    index = json.loads((path / "model_index.json").read_text())
    stage = json.loads((path / "transformer" / "config.json").read_text()).get("stage_config", {})
    m, flow = stage.get("model", {}), stage.get("flow", {})
    k = m.get("num_classes")
    parts = [name for name, v in index.items() if not name.startswith("_") and isinstance(v, list) and v[0]]
    return [("what", "a flatdino DiT as a diffusers pipeline: DiffusionPipeline.from_pretrained(DIR, "
                     "trust_remote_code=True) (its code imports flatdino)"),
            ("components", ", ".join(parts)),
            ("generates", f"{m.get('tokens')} x {m.get('in_dim')}, " + (f"{k} classes" if k else "unconditional")),
            ("sampling", f"{flow.get('sampler')}, {flow.get('steps')} steps, guidance {flow.get('cfg_scale')}"),
            ("disk", human_bytes(disk_use(path)))]


def describe(path: str | Path) -> list[tuple[str, Any]]:
    p = Path(resolve(str(path)))
    if not p.exists():
        raise UserError(f"{path}: not found")
    if p.is_dir() and is_run_dir(p):
        return [("path", str(p))] + describe_run(p)
    if p.is_dir() and (p / "manifest.json").is_file():
        return [("path", str(p))] + describe_store(p)
    if p.is_dir() and (p / "samples.json").is_file():
        return [("path", str(p))] + describe_samples(p)
    if p.is_dir() and (p / "model_index.json").is_file() and (p / "transformer" / "config.json").is_file():
        return [("path", str(p))] + describe_pipeline_folder(p)
    if p.is_dir():
        if is_rae_folder(p):
            return [("path", str(p))] + describe_rae_folder(p)
    if p.is_dir() and (p / "model.pt").is_file():  # RAE's release folder, e.g. ViTXL_n08/
        p = p / "model.pt"
    if p.is_file() and p.suffix in (".pt", ".pth", ".safetensors"):
        return [("path", str(p))] + describe_rae_file(p)
    raise UserError(f"{path}: not a flatdino run, exported model, store, sample set, RAE release file or "
                    "AutoencoderRAE folder (run dirs hold config.yaml, stores manifest.json, sample sets samples.json)")

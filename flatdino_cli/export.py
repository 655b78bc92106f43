"""`flatdino export RUN OUT`: a run's weights as a Hugging Face model folder (the format: hub.py)."""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flatdino_cli.checkpoint import weights_file
from flatdino_cli.config_yaml import config_from_dict, to_dict
from flatdino_cli.encoders import load_encoder
from flatdino_cli.encoders.hf_cache import cached_hub_weights
from flatdino_cli.encoders.keys import read_state_dict
from flatdino_cli.encoders.specs import get_spec
from flatdino_cli.errors import UserError
from flatdino_cli.hub import CONFIG_JSON, WEIGHTS, is_export
from flatdino_cli.interop import diffusers as D
from flatdino_cli.interop.rae import rae_mlp_ratio, to_rae_state_dict
from flatdino_cli.models import build_model, count_parameters
from flatdino_cli.models.pixel_decoder import load_decoder, ours_to_rae_state_dict
from flatdino_cli.models.stats import STATS_FILE, load_stats, tokens_to_chw
from flatdino_cli.nn import sincos_2d
from flatdino_cli.pipeline.load import load_pipeline
from flatdino_cli.rundir import run_config, run_inputs, write_config, write_inputs
from flatdino_cli.runs import load_run, run_summary
from flatdino_cli.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

LIBRARY = "flatdino"
CARD = "README.md"
LOCAL_PATH_KEYS = ("path", "vae_run", "features", "images")  # provenance that only means something here
_STAGE_FLAGS = (("features", "--features"), ("images", "--images"), ("latents", "--latents"))


def _portable(obj: Any) -> Any:
    """inputs.json without the paths of the machine that trained the run (hashes and kinds stay)."""
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items() if k not in LOCAL_PATH_KEYS or not isinstance(v, str)}
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    return obj


def train_command(stage: str, inputs: dict) -> str:
    """The command that trains this run again from its resolved config (paths as recorded)."""
    parts = [f"flatdino train-{stage} --preset config.yaml"]
    for key, flag in _STAGE_FLAGS:
        value = inputs.get(key)
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str):
            parts.append(f"{flag} {path}")
    images = inputs.get("images")
    encoder = inputs.get("encoder") or (images.get("encoder") if isinstance(images, dict) else None)
    name = encoder.get("encoder") if isinstance(encoder, dict) else encoder  # decoder runs: a store identity
    if isinstance(name, str):
        parts.append(f"--encoder {name}")
    return " ".join(parts + ["--out RUN"])


def _card(name: str, cfg: Any, meta: dict) -> str:
    what = {"vae": "a FlatDINO laminator (beta-VAE): frozen DINOv2 patch features -> a few 1-D latent tokens "
                   "and back", "dit": "a LightningDiT flow-matching generator of latents",
            "decoder": "an RAE-style pixel decoder: encoder features -> pixels"}[cfg.stage]
    option = {"vae": "--vae", "dit": "--dit", "decoder": "--decoder"}[cfg.stage]
    params = ", ".join(f"{k} {v:,}" for k, v in meta["parameters"].items())
    metrics = meta["metrics"]
    lines = [
        "---", f"library_name: {LIBRARY}", "tags: [flatdino, dinov2, flow-matching]", "---", "",
        f"# {name}", "", f"This is {what}, exported from a flatdino {cfg.stage} run.", "",
        f"- architecture: `{meta['architecture']}` ({params} parameters)",
        f"- weights: `{meta['weights']['source']}` of the run (EMA: {meta['weights']['ema']}), "
        f"sha256 `{meta['weights']['sha256'][:16]}...`",
        f"- trained {meta['step']} of {meta['planned_steps'] or '?'} optimizer steps", "",
        "## How it was made", "", "```", meta["command"], "```", "",
        "`config.yaml` in this folder is the resolved config; `inputs.json` the provenance of the data.", "",
        "## Metrics", "",
    ]
    shown = {"last training row": metrics["last_train"], "best validation": metrics["best_val"]}
    for title, row in shown.items():
        if row:
            lines.append(f"- {title} (step {row['step']}): " + ", ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, float)))
    lines += ["", "## How to load it", "", "```",
              "flatdino info hf:ORG/NAME            # after `hf download ORG/NAME`, or a local folder",
              f"flatdino sample ... {option} hf:ORG/NAME   # any {option} option takes this folder or hf: name",
              "```", "", "In Python: `flatdino_cli.runs.load_run(folder, \"" + cfg.stage + "\")` returns "
              "(config, eval-mode model, weights sha256).", ""]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the run's weights as a Hugging Face model folder at `out` (built aside, then renamed)."""
    run_dir, out = Path(run_dir), Path(out)
    if is_export(run_dir):
        raise UserError(f"{run_dir}: is already an exported folder; copy it instead")
    cfg = run_config(run_dir)
    weights = weights_file(run_dir, cfg.stage)
    if out.exists() and (not overwrite or not is_export(out)):
        raise UserError(f"{out}: exists; pick a new folder" + (" or pass --overwrite" if is_export(out) else ""))
    inputs = run_inputs(run_dir)
    summary = run_summary(run_dir)
    built = build_arch_name(cfg)
    meta = {
        "library_name": LIBRARY, "stage": cfg.stage, "architecture": built,
        "parameters": count_parameters(cfg), "model": to_dict(cfg.model), "config": to_dict(cfg),
        "weights": {"source": str(weights.relative_to(run_dir)), "ema": weights.name.startswith("ema"),
                    "sha256": sha256_file(weights)},
        "step": summary["step"], "planned_steps": summary["planned_steps"],
        "metrics": {k: summary[k] for k in ("last_train", "best_val", "last_val")},
        "command": train_command(cfg.stage, inputs),
    }

    def fill(tmp: Path) -> None:
        shutil.copyfile(weights, tmp / WEIGHTS)  # byte copy: the sha256 (provenance checks) is unchanged
        atomic_write_json(tmp / CONFIG_JSON, meta)
        write_config(tmp, cfg)  # the run's own form: the folder is read as a run
        write_inputs(tmp, _portable(inputs))
        if (run_dir / STATS_FILE).is_file():
            shutil.copyfile(run_dir / STATS_FILE, tmp / STATS_FILE)
        atomic_write_text(tmp / CARD, _card(run_dir.name, cfg, meta))

    _write_folder(out, fill)
    return {"out": str(out), "stage": cfg.stage, "step": meta["step"], "weights": meta["weights"],
            "files": sorted(p.name for p in out.iterdir())}


def _write_folder(out: Path, fill) -> None:
    """`fill(tmp)` writes the folder beside `out`; then it replaces `out` (a killed export leaves no half folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_arch_name(cfg: Any) -> str:
    """The model class build_model makes for this config (built on the meta device: instant)."""
    with torch.device("meta"):
        return type(build_model(cfg)).__name__


# ============================================================================ diffusers AutoencoderRAE
def _rae_encoder(ident: dict, encoder_weights, run_dir: Path):
    """(spec, weights path or None) of the encoder a decoder run was trained on; one-line UserError when
    AutoencoderRAE cannot hold it (its DINOv2 encoders have 64-wide heads and a GELU MLP)."""
    name, wid = ident.get("encoder"), ident.get("weights")
    if not isinstance(name, str):
        raise UserError(f"{run_dir}/inputs.json: records no encoder; this decoder cannot be exported with one")
    folder = Path(encoder_weights).expanduser() if encoder_weights is not None else None
    if folder is not None and D.is_rae_folder(folder):
        return None, folder
    spec = get_spec(name)
    why = None
    if spec.dim != 64 * spec.heads:
        why = (f"has {spec.heads} heads of {spec.dim // spec.heads} channels; AutoencoderRAE builds DINOv2 encoders "
               f"with heads of 64 (width {spec.dim} -> {max(spec.dim // 64, 1)} heads)")
    elif "giant" in spec.arch:
        why = "has a SwiGLU MLP; AutoencoderRAE's DINOv2 encoder has a GELU one"
    elif str(wid).startswith("random-init") and folder is None:
        why = "has random test weights, which no AutoencoderRAE folder holds"
    if why:
        raise UserError(f"{run_dir}: trained on encoder {name}, which {why}; it cannot be exported as an "
                        "AutoencoderRAE (--format flatdino can)")
    if folder is not None:
        return spec, folder
    if str(wid).startswith("hf:") and (path := cached_hub_weights(*spec.hub_repos)) is not None:
        repo = path.parent.parent.parent.name.removeprefix("models--").replace("--", "/")
        if f"hf:{repo}@{path.parent.name}" == wid:  # the HF cache layout: models--org--name/snapshots/<rev>/file
            return spec, path
    raise UserError(f"{run_dir}: pass --encoder-weights FILE|DIR, the weights of encoder {name} it was trained on "
                    f"({wid or 'not recorded'} in inputs.json)")


def _rae_encoder_tensors(spec, path: Path, ident: dict, run_dir: Path) -> tuple[dict, dict]:
    """(AutoencoderRAE `encoder.*` tensors, encoder_sizes) from a weights file or an AutoencoderRAE folder."""
    file = D.weights_path(path) if spec is None else path
    wid = ident.get("weights")
    if not file.is_file():
        raise UserError(f"--encoder-weights {path}: no such file")
    if str(wid).startswith("sha256:") and sha256_file(file) != wid.removeprefix("sha256:"):
        raise UserError(f"--encoder-weights {path}: not the weights {run_dir} was trained on (its sha256 differs "
                        "from the one in inputs.json)")
    if spec is None:  # an AutoencoderRAE folder's encoder: its tensors as they are
        return {"encoder." + k: v for k, v in D.encoder_state_dict(path).items()}, D.encoder_sizes(path)
    sd = read_state_dict(file)
    table = sd.get("pos_embed", sd.get("embeddings.position_embeddings"))
    want = D.encoder_table_grid(spec.patch_size)
    rows = table.shape[-2] if table is not None else 0
    if want * want not in (rows, rows - 1):
        side = math.isqrt(rows) if rows else 0
        raise UserError(f"--encoder-weights {path}: its position table is {side} x {side}; AutoencoderRAE stores "
                        f"DINOv2's {want} x {want} one ({D.ENCODER_TABLE_SIZE} px) and resamples it at run time, "
                        "so it could not give back this one")
    big = load_encoder(dataclasses.replace(spec, image_size=want * spec.patch_size), file)  # the table as stored
    sizes = dict(image_size=spec.image_size, patch_size=spec.patch_size, dim=spec.dim, depth=spec.depth,
                 heads=spec.heads)
    return D.encoder_diffusers_state_dict(big.model.state_dict(), D.transformers_major() >= 5), sizes


def export_diffusers(run_dir: str | Path, out: str | Path, encoder_weights: str | Path | None = None,
                     stats: str | Path | None = None, overwrite: bool = False, vae: str | Path | None = None,
                     decoder: str | Path | None = None) -> dict:
    """A train-decoder run (EMA weights) with the encoder it was trained on, as a diffusers AutoencoderRAE
    folder (config.json + diffusion_pytorch_model.safetensors); `stats` (RAE's stat.pt, an rae-* run's
    stats.pt or an AutoencoderRAE folder) become its latent statistics, converted to diffusers' divisor
    std + 1e-5 (interop/diffusers.py). Refused in one line where AutoencoderRAE would decode otherwise."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = run_config(run_dir)
    if cfg.stage == "dit":
        if encoder_weights is not None or stats is not None:
            raise UserError("export: a DiT pipeline takes --vae and --decoder (its statistics are the run's); "
                            "--encoder-weights and --stats go with decoder runs")
        return export_pipeline(run_dir, out, vae, decoder, overwrite)
    if cfg.stage != "decoder":
        raise UserError(f"{run_dir}: is a {cfg.stage} run; --format diffusers writes train-decoder runs (as an "
                        "AutoencoderRAE with their encoder) and train-dit runs (as a pipeline)")
    if vae is not None or decoder is not None:
        raise UserError("export: --vae and --decoder go with DiT runs; a decoder run is the decoder")
    if out.exists() and (not overwrite or not D.is_rae_folder(out)):
        raise UserError(f"{out}: exists; pick a new folder" + (" or pass --overwrite" if D.is_rae_folder(out) else ""))
    ident = run_inputs(run_dir).get("encoder") or {}
    ident = ident if isinstance(ident, dict) else {"encoder": ident}  # {"encoder": name, "weights": id, ...}
    spec, path = _rae_encoder(ident, encoder_weights, run_dir)
    m = cfg.model
    if m.ln_eps != 1e-12:
        raise UserError(f"{run_dir}: decoder LayerNorm eps {m.ln_eps:g}; AutoencoderRAE's decoder uses 1e-12")
    dec = load_decoder(run_dir)
    g = dec.grid
    table = sincos_2d(g, g, m.width, cls_token=True, step=D.pos_step(g))[None]
    if not torch.allclose(dec.pos_embed.detach(), table, atol=1e-6, rtol=0):
        raise UserError(f"{run_dir}: the decoder's sin-cos position table is not the one diffusers rebuilds for a "
                        f"{g} x {g} grid (positions spaced 16 / {g}; equal on the 16 x 16 grid of 224-px encoders), "
                        "so an AutoencoderRAE would decode differently")
    tensors, enc = _rae_encoder_tensors(spec, path, ident, run_dir)
    if (m.num_patches, m.in_dim) != ((enc["image_size"] // enc["patch_size"]) ** 2, enc["dim"]):
        raise UserError(f"{run_dir}: the decoder takes {m.num_patches} x {m.in_dim} features, the encoder gives "
                        f"{(enc['image_size'] // enc['patch_size']) ** 2} x {enc['dim']}; pass its own --encoder-weights")
    chw = None
    if stats is not None:
        s = load_stats(Path(stats), (g, g))
        if tuple(s.mean.shape) != (m.num_patches, m.in_dim):
            raise UserError(f"--stats {stats}: statistics of shape {tuple(s.mean.shape)}; this decoder's features "
                            f"are {m.num_patches} x {m.in_dim} per position")
        chw = (tokens_to_chw(s.mean, (g, g)), tokens_to_chw(s.std - D.STD_EPS, (g, g)))  # diffusers adds 1e-5 back
    tensors.update(D.decoder_diffusers_state_dict(ours_to_rae_state_dict(dec.state_dict())))
    tensors.update(D.extra_tensors(chw))
    try:
        made_with = version("diffusers")
    except PackageNotFoundError:
        made_with = "0.42.1"
    config = D.folder_config(enc, {"width": m.width, "depth": m.depth, "heads": m.heads, "mlp_hidden": m.mlp_hidden,
                                   "patch_size": m.patch_size}, chw, made_with)
    summary = run_summary(run_dir)
    card = "\n".join([
        "---", "library_name: diffusers", "tags: [flatdino, rae, dinov2, autoencoder]", "---", "",
        f"# {run_dir.name}", "", f"An `AutoencoderRAE` (diffusers): the pixel decoder of the flatdino train-decoder "
        f"run `{run_dir.name}` (step {summary['step']}, EMA weights) with the DINOv2 encoder it was trained on "
        f"(`{ident.get('encoder')}`, weights `{ident.get('weights') or 'not recorded'}`).",
        "", f"Latent statistics: {'included' if chw else 'none (latents are the raw features)'}.", "", "```python",
        "from diffusers import AutoencoderRAE", "vae = AutoencoderRAE.from_pretrained(FOLDER)", "```", "",
        "flatdino reads it back as `--decoder FOLDER`, `--encoder-weights FOLDER` and `--stats FOLDER`.", ""])

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / D.WEIGHTS))
        atomic_write_json(tmp / D.CONFIG, config)
        atomic_write_text(tmp / CARD, card)

    _write_folder(out, fill)
    return {"out": str(out), "stage": cfg.stage, "step": summary["step"], "format": "diffusers",
            "files": sorted(p.name for p in out.iterdir())}


# ============================================================================ a DiT run as a diffusers pipeline
PIPELINE_CODE, COMPONENT_CODE = "pipeline_flatdino", "flatdino_components"
MODEL_INDEX = "model_index.json"


def export_pipeline(dit_run: str | Path, out: str | Path, vae: str | Path | None, decoder: str | Path | None,
                    overwrite: bool = False) -> dict:
    """A train-dit run (EMA weights) with its VAE (FlatDINO / FAE; none for an RAE grid) and pixel decoder as a
    diffusers pipeline folder: model_index.json, one folder per component (config.json, safetensors and
    the component code, flatdino_components.py), pipeline_flatdino.py and a model card. Loaded with
    `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`; the code imports flatdino."""
    dit_run, out = Path(dit_run), Path(out)
    if decoder is None:
        raise UserError("export --format diffusers: a DiT pipeline needs --decoder (a train-decoder run, RAE's "
                        "model.pt or an AutoencoderRAE folder) to make pixels")
    if out.exists() and (not overwrite or not (out / MODEL_INDEX).is_file()):
        raise UserError(f"{out}: exists; pick a new folder" + (" or pass --overwrite" if (out / MODEL_INDEX).is_file() else ""))
    pipe = load_pipeline(dit_run, vae, decoder, "cpu")
    cfg = pipe.cfg
    try:
        made_with = version("diffusers")
    except PackageNotFoundError:
        made_with = "0.42.1"
    code = files("flatdino_cli.hub_code")
    parts = {"transformer": (pipe.dit, cfg), "decoder": (pipe.decoder, None), "vae": (pipe.vae, None)}

    def component(tmp: Path, name: str, net, stage_cfg) -> None:
        stage_cfg = stage_cfg or config_from_model(net)
        extra = {}
        tensors = {"net." + k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
        if name == "transformer":
            extra["class_names"] = list(pipe.class_names)
            extra["stats_shape"] = list(pipe.stats.mean.shape) if pipe.stats is not None else None
            if pipe.stats is not None:
                tensors.update({f"stats.{k}": v.float().cpu().contiguous() for k, v in pipe.stats.state_dict().items()})
        (tmp / name).mkdir()
        save_file(tensors, str(tmp / name / "diffusion_pytorch_model.safetensors"))
        atomic_write_json(tmp / name / "config.json", {"_class_name": "FlatDINOModel", "_diffusers_version": made_with,
                                                       "stage_config": to_dict(stage_cfg), **extra})
        atomic_write_text(tmp / name / f"{COMPONENT_CODE}.py", (code / f"{COMPONENT_CODE}.py").read_text())

    summary = run_summary(dit_run)
    flow = cfg.flow
    index = {"_class_name": [PIPELINE_CODE, "FlatDINOPipeline"], "_diffusers_version": made_with,
             **{name: [COMPONENT_CODE, "FlatDINOModel"] if net is not None else [None, None]
                for name, (net, _) in parts.items()},
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": made_with,
                 "num_train_timesteps": 1000, "shift": float(flow.shift)}
    what = ("An RAE-style DiT on the encoder's feature grid" if pipe.vae is None else
            f"A LightningDiT on FlatDINO latents ({cfg.model.tokens} x {cfg.model.in_dim})")
    k = cfg.model.num_classes
    card = "\n".join([
        "---", "library_name: diffusers", "tags: [flatdino, flow-matching, class-conditional]", "---", "",
        f"# {dit_run.name}", "", f"{what} with its pixel decoder, exported from the flatdino train-dit run "
        f"`{dit_run.name}` (EMA weights, step {summary['step']} of {summary['planned_steps'] or '?'}).", "",
        f"- classes: {k or 'none (unconditional)'}; sampler {flow.sampler}, {flow.steps} steps, guidance "
        f"{flow.cfg_scale:g}, time shift {flow.shift:g}",
        f"- trained with: `{train_command('dit', run_inputs(dit_run))}`"] + [
        f"- {title} (step {row['step']}): " + ", ".join(f"{n} {v:.4g}" for n, v in row.items()
                                                       if n not in ("step", "epoch") and isinstance(v, float))
        for title, row in (("last training row", summary["last_train"]), ("best validation", summary["best_val"])) if row] + [
        "", "```python", "from diffusers import DiffusionPipeline  # pip install flatdino diffusers",
        "pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)",
        "images = pipe(class_labels=[0, 0, 1], seed=0).images  # = flatdino sample -c 0 -c 1 -n 3 --seed 0" if k else
        "images = pipe(num_images=4, seed=0).images  # = flatdino sample ... -n 4 --seed 0", "```", "",
        "The components wrap flatdino's own networks and sampler (their code imports flatdino), so the pixels "
        "are those of `flatdino sample` for the same labels, seed and settings.", ""])

    def fill(tmp: Path) -> None:
        for name, (net, stage_cfg) in parts.items():
            if net is not None:
                component(tmp, name, net, stage_cfg)
        (tmp / "scheduler").mkdir()
        atomic_write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        atomic_write_json(tmp / MODEL_INDEX, index)
        atomic_write_text(tmp / f"{PIPELINE_CODE}.py", (code / f"{PIPELINE_CODE}.py").read_text())
        atomic_write_text(tmp / CARD, card)

    _write_folder(out, fill)
    return {"out": str(out), "stage": "dit", "step": summary["step"], "format": "diffusers",
            "files": sorted(p.name for p in out.iterdir())}


def config_from_model(net) -> Any:
    """The stage config that builds `net` (a VAE or pixel decoder: their model config is all it takes)."""
    stage = "decoder" if type(net).__name__ == "PixelDecoder" else "vae"
    return config_from_dict({"stage": stage, "model": to_dict(net.cfg)}, f"{stage} model config")


def export_rae(run_dir: str | Path, out: str | Path, ema: bool = True) -> dict:
    """`flatdino export-rae`: a train-dit run on a square 2-D grid with RoPE -> a raw state dict that
    RAE's LightningDiT (no head) or DiTwDDTHead loads with strict=True; returns RAE's model params."""
    cfg = run_config(run_dir, "dit")
    m = cfg.model
    if m.grid is None or m.grid[0] != m.grid[1] or not m.rope:
        raise UserError(f"{run_dir}: RAE's models need a square 2-D token grid with RoPE; this DiT has "
                        f"grid={m.grid}, rope={m.rope} (FlatDINO's 1-D DiTs have no RAE counterpart)")
    if m.head_depth and m.head_projector and m.head_width == m.width:
        raise UserError(f"{run_dir}: RAE's DiT-DH has no s_projector when the head is as wide as the trunk, and this "
                        "run has one (model.head_projector: true); RAE's code cannot load it")
    _, model, _ = load_run(run_dir, "dit", prefer_ema=ema)
    buf = io.BytesIO()
    torch.save(to_rae_state_dict(model), buf)
    atomic_write_bytes(Path(out), buf.getvalue())
    common = dict(input_size=m.grid[0], patch_size=m.patch, in_channels=m.in_dim, mlp_ratio=rae_mlp_ratio(m, run_dir),
                  class_dropout_prob=m.class_dropout, num_classes=m.num_classes, use_qknorm=m.qk_norm,
                  use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)
    if m.head_depth:
        params = dict(target="stage2.models.DDT.DiTwDDTHead", hidden_size=[m.width, m.head_width],
                      depth=[m.depth, m.head_depth], num_heads=[m.heads, m.head_heads], use_pos_embed=True)
    else:
        params = dict(target="stage2.models.lightningDiT.LightningDiT", hidden_size=m.width, depth=m.depth,
                      num_heads=m.heads)
    return {**params, **common}

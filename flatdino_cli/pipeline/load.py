"""Loading a sampling pipeline: a DiT (train-dit run or RAE stage-2 checkpoint) with its statistics, the
VAE and pixel decoder that turn its samples into pixels, an optional AutoGuidance DiT, and every
compatibility check between them as a one-line UserError."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flatdino_cli.checkpoint import weights_file
from flatdino_cli.config import DiTStageConfig
from flatdino_cli.errors import UserError
from flatdino_cli.interop.rae import RAE_STATS_FILES, rae_checkpoint, read_rae_dit
from flatdino_cli.models.pixel_decoder import check_features, load_decoder
from flatdino_cli.models.stats import STATS_FILE, load_stats
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.rundir import run_inputs
from flatdino_cli.runs import decoder_identity, file_identity, load_run, store_manifest
from flatdino_cli.utils import sha256_file


def trained_on_features(cfg: DiTStageConfig, store_kind: str | None = None) -> bool:
    """RAE mode: the DiT was trained on a feature store (inputs.json says so), or, unrecorded, it has a
    2-D grid (rae-* presets)."""
    return store_kind == "features" if store_kind else cfg.model.grid is not None


def decoding_parts(cfg: DiTStageConfig, vae_run: str | Path | None, decoder: str | Path, device,
                    where: str, on_features: bool) -> tuple[nn.Module | None, nn.Module, dict]:
    """(VAE or None, pixel decoder, identity) for a DiT config, with every compatibility check."""
    T, d = cfg.model.tokens, cfg.model.in_dim
    identity: dict = {"vae": None}
    vae = None
    if on_features:  # RAE mode: the DiT generates DINOv2 features themselves
        if vae_run is not None:
            raise UserError(f"--vae {vae_run}: {where} is an RAE-mode DiT on raw {T} x {d} features; it needs "
                            "no VAE (drop --vae)")
        features = (T, d)
    else:
        if vae_run is None:
            raise UserError(f"{where} generates {T} x {d} latents: pass --vae, the VAE run whose latents it "
                            "was trained on")
        vae_cfg, vae, vae_sha = load_run(vae_run, "vae", device=device)
        if tuple(vae_cfg.model.latent_shape) != (T, d):
            t, k = vae_cfg.model.latent_shape
            raise UserError(f"--vae {vae_run}: makes {t} x {k} latents but {where} was trained on {T} x {d} "
                            "latents; pass the VAE whose latents trained this DiT")
        identity["vae"] = {"path": str(Path(vae_run).resolve()), "weights": str(weights_file(vae_run, "vae")),
                           "sha256": vae_sha}
        features = (vae_cfg.model.num_patches, vae_cfg.model.feature_dim)
    if decoder is None:
        raise UserError("--decoder is required: a train-decoder run or RAE's decoder model.pt")
    dec = load_decoder(decoder, device=device)
    source = "the VAE's decoded features" if vae is not None else f"{where}'s features"
    check_features(dec, *features, what=source)
    identity["decoder"] = decoder_identity(decoder)
    return vae, dec, identity


def _check_provenance(dit_run: Path, vae_run: str | Path, vae_sha: str) -> None:
    """Warn when the DiT's inputs.json says its latents came from another VAE (same shapes, or we
    would have refused already) or from other weights of this one."""
    ident = run_inputs(dit_run).get("latents", {}).get("identity", {})
    recorded = ident.get("vae_run")
    if not recorded:
        return
    if Path(recorded).resolve() != Path(vae_run).resolve():
        warnings.warn(f"--vae {vae_run}: {dit_run} was trained on latents of VAE {recorded} (inputs.json); "
                      "the shapes match, but samples are only meaningful with that VAE", stacklevel=3)
    elif ident.get("vae_checkpoint_sha256") not in (None, vae_sha):
        warnings.warn(f"--vae {vae_run}: its weights changed since {dit_run}'s latents were extracted "
                      "(checkpoint sha256 differs from inputs.json)", stacklevel=3)


@dataclass
class LoadedDiT:
    """A DiT ready to sample (our frame), from a train-dit run or an RAE stage-2 checkpoint."""

    cfg: DiTStageConfig
    model: nn.Module
    identity: dict  # path, weights, sha256, ema (+ format "rae")
    stats: nn.Module | None  # models.stats.LatentStats when cfg.normalize
    stats_id: dict | None
    inputs: dict  # the run's inputs.json "latents" entry ({"kind": "features"} for RAE files)


def load_dit(path: str | Path, device: torch.device | str = "cpu", ema: bool = True, stats: str | Path | None = None,
             default_stats: Path | None = None, option: str = "--dit", which: str | None = None) -> LoadedDiT:
    """A train-dit run (EMA weights unless ema=False, of its latest checkpoint or of `which`, a kept one;
    RUN/stats.pt) or RAE's stage2_model.pt (file or its folder; stats from `stats`, else stat.pt beside it,
    else `default_stats`); one-line UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{option} {path}: no such file or directory")
    rae_file = rae_checkpoint(path)
    if rae_file is not None:
        cfg, model, used_ema = read_rae_dit(rae_file)
        model.to(device)
        identity = {"path": str(path.resolve()), "weights": str(rae_file.resolve()), "sha256": sha256_file(rae_file),
                    "ema": used_ema, "format": "rae"}
        inputs = {"kind": "features"}
        beside = [rae_file.parent / n for n in RAE_STATS_FILES if (rae_file.parent / n).is_file()]
        stats = stats or (beside[0] if beside else default_stats)
        if stats is None:
            raise UserError(f"{option} {path}: RAE's DiT generates normalised features; pass --stats with RAE's "
                            f"stat.pt (models/stats/.../stat.pt) or put it beside the checkpoint as stat.pt")
    else:
        inputs = run_inputs(path).get("latents", {})
        cfg, model, sha = load_run(path, "dit", device=device, prefer_ema=ema, which=which)
        wfile = weights_file(path, "dit", prefer_ema=ema, which=which)
        identity = {"path": str(path.resolve()), "weights": str(wfile), "sha256": sha,
                    "ema": wfile.name.startswith("ema")}
        if stats is None and cfg.normalize:
            stats = path / STATS_FILE
            if not stats.is_file():
                raise UserError(f"{stats}: missing; this DiT normalises its inputs with it (copy RAE's stat.pt "
                                "there, pass --stats, or rerun train-dit --compute-stats)")
    if not cfg.normalize:
        if stats is not None:
            raise UserError(f"--stats {stats}: {option} {path} does not normalise its inputs (drop --stats)")
        return LoadedDiT(cfg, model, identity, None, None, inputs)
    grid = tuple(cfg.model.grid) if cfg.model.grid else None
    return LoadedDiT(cfg, model, identity, load_stats(Path(stats), grid).to(device), file_identity(Path(stats)), inputs)


def check_guide(main: LoadedDiT, guide: LoadedDiT, where: str) -> None:
    """AutoGuidance mixes two velocities of the same space: one-line UserError when the guide's classes,
    latent shape, normalisation statistics or source latents differ from the main DiT's."""
    a, b = main.cfg.model, guide.cfg.model
    for what, x, y in [("classes (model.num_classes)", a.num_classes, b.num_classes),
                       ("latent shape (tokens x dim)", (a.tokens, a.in_dim), (b.tokens, b.in_dim)),
                       ("token grid", a.grid, b.grid), ("normalisation (normalize)", main.cfg.normalize,
                                                        guide.cfg.normalize)]:
        if x != y:
            raise UserError(f"--guide {where}: its {what} is {y} but the main DiT's is {x}; the guide must be "
                            "trained on the same latents and classes")
    if main.stats is not None and guide.stats is not None and not all(
            torch.allclose(getattr(main.stats, k), getattr(guide.stats, k).to(getattr(main.stats, k).device))
            for k in ("mean", "std")):
        raise UserError(f"--guide {where}: normalises with other statistics than the main DiT "
                        f"({guide.stats_id['path']} vs {main.stats_id['path']})")
    vae_a, vae_b = (d.inputs.get("identity", {}).get("vae_run") for d in (main, guide))
    if vae_a and vae_b and Path(vae_a).resolve() != Path(vae_b).resolve():
        raise UserError(f"--guide {where}: was trained on latents of VAE {vae_b}, the main DiT on {vae_a}")


def load_pipeline(dit_run: str | Path, vae_run: str | Path | None = None, decoder: str | Path | None = None,
                  device: torch.device | str = "cpu", ema: bool = True, stats: str | Path | None = None,
                  guide: str | Path | None = None, which: str | None = None) -> Pipeline:
    """DiT (train-dit run, EMA weights unless ema=False, of its latest checkpoint or the kept `which`, or
    RAE's stage2_model.pt) + VAE run (FlatDINO; default: the one in the DiT's inputs.json) or stats (RAE
    mode) + pixel decoder, and an optional AutoGuidance DiT (`guide`, EMA weights); one-line UserError on
    any mismatch."""
    main = load_dit(dit_run, device, ema, stats, which=which)
    cfg, inputs = main.cfg, main.inputs
    recorded_vae = inputs.get("identity", {}).get("vae_run")
    on_features = trained_on_features(cfg, inputs.get("kind"))
    if vae_run is None and not on_features and recorded_vae and Path(recorded_vae).is_dir():
        vae_run = recorded_vae  # the VAE the DiT's latents came from
    vae, dec, identity = decoding_parts(cfg, vae_run, decoder, device, f"DiT {dit_run}", on_features)
    identity["stats"] = main.stats_id
    identity["dit"] = main.identity
    if vae is not None:
        _check_provenance(Path(dit_run), vae_run, identity["vae"]["sha256"])
    guide_model = None
    if guide is not None:
        g = load_dit(guide, device, True, None, Path(main.stats_id["path"]) if main.stats_id else None, "--guide")
        check_guide(main, g, str(guide))
        guide_model, identity["guide"] = g.model, g.identity
    names = store_manifest(inputs.get("path")).get("extra", {}).get("class_names") or []
    return Pipeline(cfg, main.model, dec, vae, main.stats, identity, [str(n) for n in names], guide_model)

"""The inputs a command was left without: the newest finished run or store that fits, named in one line
on stdout."""

from __future__ import annotations

from pathlib import Path

from flatdino_cli.data import Store, with_store_shape
from flatdino_cli.errors import UserError
from flatdino_cli.rundir import run_inputs
from flatdino_cli.workspace.index import newest
from flatdino_cli.workspace.paths import root, say, shown
from flatdino_cli.workspace.settings import settings


def _steps(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def _describe(ws: Path, rel: str, e: dict) -> str:
    bits = [f"step {_steps(e['step'])}" if e.get("step") is not None else None, (e.get("finished") or "")[:10] or None]
    return f"{shown(ws / rel)} ({', '.join(b for b in bits if b)})"


def _pick(ws: Path, command: str, stage: str, what: str, option: str, first: str, fits=None) -> tuple[Path, str]:
    """The newest finished entry of a stage and the words naming it (with a note when an older finished
    one of another preset was passed over); a UserError saying what to run first when there is none."""
    found = newest(stage, ws, fits)
    if not found:
        raise UserError(f"{command}: no finished {what} in workspace {ws}; run first: {first} (or pass {option})")
    rel, e = found[0]
    others = {o["preset"] for _, o in found[1:]} - {e["preset"]}
    note = f"; newest of {len(found)} finished, {option} to choose" if others else ""
    return ws / rel, _describe(ws, rel, e) + note


def pick_features(command: str) -> Path:
    """train-vae without --features/--images: the newest finished feature store."""
    ws = root()
    path, said = _pick(ws, command, "features", "feature store", "--features / --images",
                       "flatdino extract IMAGES --val-split 10000")
    say(f"{command}: features {said}")
    return path


def pick_latents(command: str, cfg) -> Path:
    """train-dit without --latents: the newest finished store the preset can train on (latents; raw
    features for rae-* presets)."""
    def fits(path: Path) -> bool:
        try:
            with_store_shape(cfg, Store.open(path), path)  # the preset takes the store's shape
            return True
        except UserError:
            return False

    ws = root()
    kind = "features" if cfg.normalize else "latents"
    vae = newest("vae", ws)
    first = ("flatdino extract IMAGES" if kind == "features" else
             f"flatdino extract {shown(ws / vae[0][1]['from'][0])} --vae {shown(ws / vae[0][0])}"
             if vae and vae[0][1]["from"] else "flatdino train-vae, then flatdino extract FEATURES --vae RUN")
    path, said = _pick(ws, command, kind, f"{kind} store that fits {cfg.model.tokens} x {cfg.model.in_dim}",
                       "--latents", first, fits)
    say(f"{command}: latents {said}")
    return path


def pick_decoder(ws: Path) -> tuple[Path | None, str]:
    """The workspace's configured decoder, else its newest finished train-decoder run."""
    configured = settings(ws).get("decoder")
    if configured:
        return Path(configured), f"{shown(configured)} (workspace setting)"
    found = newest("decoder", ws)
    if found:
        return ws / found[0][0], _describe(ws, *found[0])
    return None, ""


def pick_sample(dit: Path | None, vae: Path | None, decoder: Path | None) -> tuple[Path, Path | None, Path]:
    """sample's DiT (newest finished run), VAE (the one its latents came from) and pixel decoder."""
    ws, parts = root(), []
    if dit is None:
        dit, said = _pick(ws, "sample", "dit", "DiT run", "--dit", "flatdino train-dit --preset xl-32x128")
        parts.append(f"dit {said}")
    if vae is None:
        recorded = run_inputs(dit).get("latents", {}).get("identity", {}).get("vae_run")
        if recorded:
            vae = Path(recorded)
            parts.append(f"vae {shown(recorded)} (its latents' VAE)")
    if decoder is None:
        decoder, said = pick_decoder(ws)
        if decoder is None:
            raise UserError(f"sample: no pixel decoder in workspace {ws}; run first: flatdino workspace set decoder "
                            "PATH/TO/model.pt (RAE's) or flatdino train-decoder (or pass --decoder)")
        parts.append(f"decoder {said}")
    if parts:  # explicit options are not echoed
        say("sample: " + ", ".join(parts))
    return dit, vae, decoder


def pick_ablate(vae: Path | None, features: Path | None) -> tuple[Path, Path]:
    """ablate-tokens' VAE (newest finished run) and the validation split of the store it trained on."""
    ws, parts = root(), []
    if vae is None:
        vae, said = _pick(ws, "ablate-tokens", "vae", "VAE run", "--vae", "flatdino train-vae --preset vae-32x128")
        parts.append(f"vae {said}")
    if features is None:
        store = (run_inputs(vae).get("features") or {}).get("path")
        if not store:
            raise UserError(f"ablate-tokens: {shown(vae)} records no feature store (inputs.json); pass --features")
        features = Path(store) / "val" if (Path(store) / "val" / "manifest.json").is_file() else Path(store)
        parts.append(f"features {shown(features)}{'' if features.name == 'val' else ' (it has no val split)'}")
    if parts:
        say("ablate-tokens: " + ", ".join(parts))
    return vae, features

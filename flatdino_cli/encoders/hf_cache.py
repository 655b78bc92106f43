"""The Hugging Face hub cache (HF_HUB_CACHE / HF_HOME), looked up by us, never through timm's download
with its minute of retries. On a cache miss we download only if HF_HUB_OFFLINE is unset and one HEAD
request for the file succeeds within 2 s; otherwise a one-line UserError naming `--encoder-weights FILE`
and the cache directory. The DINO discriminator's weights are found through the same lookup."""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path

from huggingface_hub import hf_hub_download, try_to_load_from_cache

from flatdino_cli.encoders.specs import EncoderSpec
from flatdino_cli.errors import UserError


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


def pretrained_file(spec: EncoderSpec) -> Path:
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
            return Path(hf_hub_download(repo, "model.safetensors", cache_dir=cache, endpoint=endpoint))
        except Exception as e:  # noqa: BLE001
            why = f"download failed: {type(e).__name__}"
    raise UserError(f"encoder {spec.name}: no pretrained weights of {repo} in the Hugging Face cache {cache} "
                    f"({why}); pass --encoder-weights FILE (.safetensors/.pth, timm or HF layout)")

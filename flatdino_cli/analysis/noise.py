"""`flatdino noise`: how gracefully the VAE decoder degrades when its latents are perturbed
(the paper's Appendix B, Figures 9-10).

For each sigma, z = mu + sigma * eps (eps ~ N(0, I), one draw per image reused at every sigma, so
the curves are smooth in sigma) is decoded and compared with
- the clean decode D(mu): feature cosine (mean over patches) and relative L2 ||D(z) - D(mu)|| / ||D(mu)||
  (sigma = 0 gives exactly 1 and 0),
- the true DINOv2 features x: the same two numbers (sigma = 0 is the VAE's reconstruction quality).
The paper's reference point, the same noise added to the DINOv2 features themselves (x + sigma * eps),
is measured alongside. With a pixel decoder, what the authors' noise_levels.py reports: rFID (TF
Inception, the same extractor and Frechet distance as `flatdino fid`) and PSNR of the decoded images
against the ADM-cropped original images, per sigma and for both noise paths; and PSNR against the
clean-path images. rFID needs Inception weights (--inception-weights or clean-fid's cache) and
readable source images; without them it is left out with a note.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flatdino_cli import viz
from flatdino_cli.analysis.common import subset_rows, iter_rows, load_vae, store_image, write_json
from flatdino_cli.analysis.inception import load_inception
from flatdino_cli.analysis.inception_weights import find_inception_weights
from flatdino_cli.fid_metrics import Gaussian, frechet_distance
from flatdino_cli.data import Store
from flatdino_cli.errors import UserError
from flatdino_cli.metrics import PSNR_CAP, psnr
from flatdino_cli.models.pixel_decoder import check_features, load_decoder
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.viz import to_uint8

__all__ = ["SIGMAS", "NoiseConfig", "feature_metrics", "psnr", "run_noise"]

SIGMAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def feature_metrics(a: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item of (B, P, C): (mean-over-patches cosine of a vs ref, ||a - ref||_F / ||ref||_F), each (B,)."""
    a, ref = a.float(), ref.float()
    cos = F.cosine_similarity(a, ref, dim=-1).mean(1)
    rel = (a - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)
    return cos, rel


class _Moments:
    """Streamed mean and covariance (N - 1 denominator, as np.cov) of Inception pool features."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)  # (B, D)
        self.n, self.s, self.s2 = self.n + len(x), self.s + x.sum(0), self.s2 + x.T @ x

    def gaussian(self) -> Gaussian:
        mu = self.s / self.n
        return Gaussian(mu, sigma=(self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1))


def _inception(inception_weights, device) -> tuple[object | None, str | None]:
    """(extractor, None), or (None, why rFID is left out) when no weights file is found."""
    try:
        path = find_inception_weights(inception_weights)
    except UserError as e:
        if inception_weights is not None:
            raise
        return None, f"rfid omitted: {e}"
    return load_inception(path, device), None


class _Means:
    """Running means of per-image metrics, keyed (path, metric, sigma index)."""

    def __init__(self):
        self.sum, self.n = defaultdict(float), defaultdict(int)

    def add(self, key: tuple, values: torch.Tensor) -> None:
        self.sum[key] += float(values.double().sum())
        self.n[key] += int(values.numel())

    def table(self, path: str, sigmas: Sequence[float]) -> dict[str, list]:
        metrics = sorted({m for p, m, _ in self.sum if p == path})
        return {m: [self.sum[(path, m, s)] / self.n[(path, m, s)] if self.n[(path, m, s)] else None
                    for s in range(len(sigmas))] for m in metrics}


@dataclass(frozen=True)
class NoiseConfig:
    """What `flatdino noise` measures (run_noise)."""

    vae_run: str | Path
    features: str | Path  # feature store; its first n images (None: all)
    out: str | Path
    sigmas: tuple[float, ...] = SIGMAS
    n: int | None = 1000
    batch_size: int = 64
    decoder: str | Path | None = None  # pixel decoder: adds rFID and PSNR against the images
    seed: int = 0
    inception_weights: str | Path | None = None


def run_noise(cfg: NoiseConfig, rt: Runtime | None = None, progress: bool = True, extractor=None) -> dict:
    """Latent-noise robustness over the first n images (None: all) of a feature store; writes
    noise.json and noise.png into `out` and returns the JSON's content. `extractor` (default: TF
    Inception) gives the rFID features."""
    rt = rt or CPU
    out, sigmas = Path(cfg.out), cfg.sigmas
    store = Store.open(cfg.features, expect_kind="features")
    _, vae, sha = load_vae(cfg.vae_run, store, rt)
    rows = subset_rows(store, cfg.n)
    pix = None
    if cfg.decoder is not None:
        pix = load_decoder(cfg.decoder, device=rt.device)
        check_features(pix, *store.item_shape, what=f"the features of {cfg.features}")
    notes: list[str] = []
    if pix is not None and extractor is None:
        extractor, why = _inception(cfg.inception_weights, rt.device)
        notes += [why] if why else []
    moments: dict[tuple[str, int], _Moments] = defaultdict(_Moments)  # ("real" | path, sigma index)
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same noise on every device
    means = _Means()
    mu_sq = mu_n = 0.0

    def run(fn, *args):
        with torch.no_grad(), rt.autocast():
            return fn(*args).float()

    for idx, x in iter_rows(store, rows, cfg.batch_size, rt.device, "noise", progress):
        mu = run(lambda t: vae.encode(t)[0], x)  # (B, U, d)
        mu_sq, mu_n = mu_sq + float(mu.double().square().sum()), mu_n + mu.numel()
        eps_z = torch.randn(mu.shape, generator=gen).to(rt.device)
        eps_x = torch.randn(x.shape, generator=gen).to(rt.device)
        clean = run(vae.decode, mu)  # (B, P, C)
        if pix is not None:
            ref_lat, ref_feat = run(pix, clean).clamp(0, 1), run(pix, x).clamp(0, 1)
            S = pix.grid * pix.patch_size
            imgs = [store_image(store, int(i), S) for i in idx]  # (S, S, 3) or None when unreadable
            ok = torch.tensor([im is not None for im in imgs], device=rt.device)
            real = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() if im is not None
                                else torch.zeros(3, S, S) for im in imgs]).to(rt.device)  # (B, 3, S, S)
            if extractor is not None and ok.any():
                moments[("real", 0)].add(extractor(to_uint8(real[ok]))["pool"])
        for s, sigma in enumerate(sigmas):
            rec = run(vae.decode, mu + sigma * eps_z)
            xs = x + sigma * eps_x
            for name, (a, ref) in {("latent", "clean"): (rec, clean), ("latent", "features"): (rec, x),
                                   ("features", "clean"): (xs, x)}.items():
                cos, rel = feature_metrics(a, ref)
                means.add((name[0], f"cosine_vs_{name[1]}", s), cos)
                means.add((name[0], f"rel_l2_vs_{name[1]}", s), rel)
            if pix is not None:
                for path, feats, ref in (("latent", rec, ref_lat), ("features", xs, ref_feat)):
                    img = run(pix, feats).clamp(0, 1)
                    means.add((path, "psnr_vs_clean", s), psnr(img, ref).clamp_max(PSNR_CAP))
                    if ok.any():
                        means.add((path, "psnr_vs_image", s), psnr(img[ok], real[ok]).clamp_max(PSNR_CAP))
                        if extractor is not None:
                            moments[(path, s)].add(extractor(to_uint8(img[ok]))["pool"])
    result = {"vae_run": str(Path(cfg.vae_run).resolve()), "vae_checkpoint_sha256": sha,
              "features": str(Path(cfg.features).resolve()), "features_manifest_sha256": store.manifest_hash(),
              "decoder": str(Path(cfg.decoder).resolve()) if cfg.decoder is not None else None,
              "n_images": int(len(rows)), "seed": cfg.seed, "sigmas": [float(s) for s in sigmas],
              "latent_rms": (mu_sq / max(mu_n, 1)) ** 0.5,
              "latent": means.table("latent", sigmas), "features_noise": means.table("features", sigmas),
              "figure": "noise.png"}
    if extractor is not None:
        real = moments[("real", 0)]
        if real.n < 2:
            notes.append("rfid omitted: fewer than 2 readable source images")
        else:
            ref = real.gaussian()
            for path, key in (("latent", "latent"), ("features", "features_noise")):
                result[key]["rfid"] = [frechet_distance(moments[(path, s)].gaussian(), ref) for s in range(len(sigmas))]
            result["rfid_images"], result["rfid_features"] = real.n, extractor.name
    result["notes"] = notes
    out.mkdir(parents=True, exist_ok=True)
    _plot(result, out / "noise.png")
    write_json(out / "noise.json", result, rows=rows)
    return result


def _plot(r: dict, path: Path) -> None:
    has_pix, has_fid = "psnr_vs_clean" in r["latent"], "rfid" in r["latent"]
    panels = 2 + has_pix + has_fid
    fig = viz.new_figure(4.2 * panels, 3.8)
    axes = fig.subplots(1, panels)
    sig, lat, feat = r["sigmas"], r["latent"], r["features_noise"]
    series = [("latent noise, vs clean decode", lat, "clean", "-", "C0"),
              ("latent noise, vs DINOv2 features", lat, "features", "-.", "C1"),
              ("noise on DINOv2 features", feat, "clean", "--", "C2")]
    for ax, metric, ylabel in ((axes[0], "cosine", "feature cosine similarity"),
                               (axes[1], "rel_l2", "relative L2 error")):
        for label, table, ref, ls, colour in series:
            viz.curve(ax, sig, table[f"{metric}_vs_{ref}"], label, linestyle=ls, color=colour)
        viz.style_axes(ax, "noise σ on latents / features", ylabel, legend=metric == "cosine")
    if has_pix:  # colour: where the noise went (as in the other panels); line style: the reference
        for label, table, colour in (("latent noise", lat, "C0"), ("noise on DINOv2 features", feat, "C2")):
            for ref, ref_label, ls, mk in (("clean", "vs noise-free decode", "-", "o"), ("image", "vs image", ":", "s")):
                key = f"psnr_vs_{ref}"
                if key in table and table[key][0] is not None:
                    capped = np.minimum(np.asarray(table[key], dtype=float), 60.0)
                    viz.curve(axes[2], sig, capped, f"{label}, {ref_label}", marker=mk, linestyle=ls, color=colour)
        viz.style_axes(axes[2], "noise σ", "PSNR (dB, capped at 60)")
    if has_fid:  # what the paper plots: rFID against the original images
        for label, table, colour in (("latent noise", lat, "C0"), ("noise on DINOv2 features", feat, "C2")):
            viz.curve(axes[-1], sig, table["rfid"], label, marker="o", color=colour)
        viz.style_axes(axes[-1], "noise σ", "rFID vs original images")
    fig.suptitle(f"Robustness to Gaussian noise ({r['n_images']} images; latent RMS {r['latent_rms']:.3g})")
    viz.save_figure(fig, path)

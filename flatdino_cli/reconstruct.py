"""`flatdino reconstruct` (the image metrics, PSNR and SSIM, are in metrics.py).

images -> frozen encoder -> VAE mu (first K tokens kept, the rest zeroed) -> VAE decoder -> pixel
decoder. Writes OUT/images/<i>.png, the ADM-cropped originals they are compared with as
OUT/originals/<i>.png (same names, same size, whatever the source files' sizes and colour modes), so
rFID is `flatdino fid OUT/images --ref OUT/originals` (the authors' rfid_adm protocol), original |
reconstruction grids, and reconstruct.json with per-image PSNR, SSIM and feature cosine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flatdino_cli.data import BadImage, EncoderTransform, adm_center_crop, list_images, load_rgb
from flatdino_cli.encoders import default_crop_size, load_encoder
from flatdino_cli.errors import UserError
from flatdino_cli.metrics import PSNR_CAP, psnr, ssim
from flatdino_cli.models.pixel_decoder import check_features, load_decoder
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.rundir import run_inputs
from flatdino_cli.runs import decoder_identity, load_run, store_manifest
from flatdino_cli.utils import atomic_write_json, check_out_dir
from flatdino_cli.viz import save_grid, save_png, to_uint8



def keep_prefix(z: torch.Tensor, k: int) -> torch.Tensor:
    """z (B, T, d) with tokens k..T-1 zeroed (prefix truncation: keep the first k tokens)."""
    z = z.clone()
    z[:, k:] = 0
    return z


def vae_encoder(vae_run: str | Path) -> dict:
    """What features the VAE was trained on: {"encoder", "weights", "preprocessing", "source"} from its
    inputs.json (features store manifest, or --images mode settings); {} when unrecorded."""
    inputs = run_inputs(Path(vae_run))
    if "features" in inputs:
        m = store_manifest(inputs["features"].get("path"))
        ident = m.get("identity", {})
        if ident.get("encoder"):
            return {"encoder": ident["encoder"], "weights": ident.get("weights"),
                    "preprocessing": m.get("preprocessing"), "source": inputs["features"]["path"]}
    if "images" in inputs and inputs["images"].get("encoder"):
        img = inputs["images"]
        return {"encoder": img["encoder"], "weights": img.get("encoder_weights"), "preprocessing": None,
                "source": img.get("path")}
    return {}


def _resolve_encoder(vae_run, encoder: str | None, encoder_weights: str | None) -> tuple[str, str | None, dict]:
    rec = vae_encoder(vae_run)
    if encoder is None:
        if not rec:
            raise UserError(f"--vae {vae_run}: its inputs.json records no encoder; pass --encoder NAME "
                            "(the encoder of the features it was trained on)")
        encoder = rec["encoder"]
    elif rec and encoder != rec["encoder"]:
        raise UserError(f"--encoder {encoder}: VAE {vae_run} was trained on {rec['encoder']} features "
                        f"({rec['source']}); use --encoder {rec['encoder']} (the default)")
    recorded = rec.get("weights")
    if encoder_weights is None and recorded and Path(recorded).is_file():
        encoder_weights = recorded  # a local file recorded by extract: the same weights again
    elif encoder_weights is not None and recorded and Path(recorded).is_file() \
            and Path(recorded).resolve() != Path(encoder_weights).resolve():
        warnings.warn(f"--encoder-weights {encoder_weights}: VAE {vae_run}'s features came from {recorded}",
                      stacklevel=3)
    return encoder, encoder_weights, rec


@dataclass(frozen=True)
class ReconstructConfig:
    """What `flatdino reconstruct` measures (run_reconstruct)."""

    images: str | Path  # a folder, an ImageFolder tree, one image or a list file
    vae_run: str | Path
    decoder: str | Path  # pixel decoder: a train-decoder run or RAE's model.pt
    out: str | Path
    tokens: int | None = None  # keep only the first K latent tokens (None: all)
    encoder: str | None = None  # None: the one that made the VAE's training features
    encoder_weights: str | None = None
    n: int | None = None  # only the first n images
    batch_size: int = 16

    def __post_init__(self):
        if self.n is not None and self.n < 1:
            raise UserError(f"-n {self.n}: must be >= 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")


def run_reconstruct(cfg: ReconstructConfig, rt: Runtime = CPU, progress: bool = True) -> dict:
    """images -> encoder -> VAE mu (first `tokens` kept) -> VAE decoder -> pixel decoder. Writes
    OUT/images/<i>.png (reconstructions) and OUT/originals/<i>.png (their ADM-cropped originals: rFID
    is `fid OUT/images --ref OUT/originals`), OUT/grid_<j>.png (original | reconstruction pairs)
    and OUT/reconstruct.json (per-image PSNR, SSIM, feature cosine + means); returns the JSON's content."""
    images, vae_run, decoder, tokens, batch_size = cfg.images, cfg.vae_run, cfg.decoder, cfg.tokens, cfg.batch_size
    check_out_dir(cfg.out)
    vae_cfg, vae, vae_sha = load_run(vae_run, "vae", device=rt.device)
    T, P, C = vae_cfg.model.latent_shape[0], vae_cfg.model.num_patches, vae_cfg.model.feature_dim
    if tokens is not None and not 0 <= tokens <= T:
        raise UserError(f"--tokens {tokens}: must be in 0..{T} (this VAE has {T} tokens)")
    name, weights, rec = _resolve_encoder(vae_run, cfg.encoder, cfg.encoder_weights)
    enc = load_encoder(name, weights, device=rt.device)
    if (enc.num_patches, enc.dim) != (P, C):
        raise UserError(f"--encoder {name}: gives {enc.num_patches} x {enc.dim} features but VAE {vae_run} "
                        f"expects {P} x {C}")
    dec = load_decoder(decoder, device=rt.device)
    check_features(dec, P, C, what="the VAE's decoded features")
    prep = rec.get("preprocessing") or {}
    transform = EncoderTransform(int(prep.get("crop_size") or default_crop_size(enc)),
                                 int(prep.get("input_size") or enc.spec.image_size),
                                 prep.get("interp") or ("bilinear" if rec else "bicubic"))
    S = dec.cfg.image_size
    paths = list_images(images).paths[: cfg.n]
    out = Path(cfg.out)
    rows, skipped, pairs, grids = [], [], [], []
    bar = tqdm(total=len(paths), desc="reconstruct", unit="img", dynamic_ncols=True, disable=not progress)
    for lo in range(0, len(paths), batch_size):
        batch = []
        for i in range(lo, min(lo + batch_size, len(paths))):
            try:
                batch.append((i, load_rgb(paths[i])))
            except BadImage as e:
                skipped.append({"index": i, "path": paths[i], "error": str(e)})
        bar.update(min(lo + batch_size, len(paths)) - lo)  # counts skipped files too
        if not batch:
            continue
        x = torch.stack([transform(img) for _, img in batch]).to(rt.device)  # (B, 3, s, s)
        orig = np.stack([np.asarray(adm_center_crop(img, S), dtype=np.uint8) for _, img in batch])  # (B, S, S, 3)
        with torch.no_grad(), rt.autocast():
            feats = enc(x)  # (B, P, C)
            mu = vae.encode(feats)[0].float()  # (B, T, d)
            if tokens is not None:
                mu = keep_prefix(mu, tokens)
            rec_feats = vae.decode(mu).float()  # (B, P, C)
            recon = to_uint8(dec(rec_feats))  # (B, S, S, 3)
        a = torch.from_numpy(orig).permute(0, 3, 1, 2).double() / 255
        b = torch.from_numpy(recon).permute(0, 3, 1, 2).double() / 255
        p, s = psnr(a, b).tolist(), ssim(a, b).tolist()
        cos = F.cosine_similarity(rec_feats, feats.float(), dim=-1).mean(1).tolist()  # (B,) mean over patches
        for k, (i, _) in enumerate(batch):
            save_png(recon[k], out / "images" / f"{i:06d}.png")
            save_png(orig[k], out / "originals" / f"{i:06d}.png")
            rows.append({"index": i, "path": paths[i], "psnr": min(p[k], PSNR_CAP), "ssim": s[k],
                         "feature_cosine": cos[k]})
            pairs += [orig[k], recon[k]]
        while len(pairs) >= 64:  # 32 pairs per grid: 8 rows of 4 original | reconstruction pairs
            grids.append(save_grid(np.stack(pairs[:64]), out / f"grid_{len(grids):03d}.png", nrow=8))
            pairs = pairs[64:]
    bar.close()
    if pairs:
        grids.append(save_grid(np.stack(pairs), out / f"grid_{len(grids):03d}.png", nrow=8))
    if not rows:
        raise UserError(f"{images}: none of the {len(paths)} image(s) could be read")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "feature_cosine")}
    result = {"images": str(Path(images).resolve()), "count": len(rows), "tokens_kept": T if tokens is None else tokens,
              "tokens": T, "vae": {"path": str(Path(vae_run).resolve()), "sha256": vae_sha},
              "decoder": decoder_identity(decoder),
              "encoder": {"name": name, "weights": enc.weights_id}, "preprocessing": transform.spec(),
              "image_size": S, "psnr_cap_db": PSNR_CAP, "mean": mean, "per_image": rows, "skipped": skipped,
              "grids": [g.name for g in grids]}
    atomic_write_json(out / "reconstruct.json", result)
    return result

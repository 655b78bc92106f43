"""`flatdino fid SAMPLES --ref REF`: FID, sFID, Inception Score, precision/recall and FD-DINOv2.

SAMPLES and REF are image folders or ADM-format .npz files (uint8 NHWC under `arr_0`). REF may also
carry precomputed statistics: an ADM reference batch (arr_0 + mu/sigma + mu_s/sigma_s, e.g.
VIRTUAL_imagenet256_labeled.npz) or clean-fid statistics (mu, sigma). As in ADM's evaluator,
precomputed mu/sigma are used for FID/sFID while precision/recall use features of REF's images.

Features of every source are computed once per (content, network) and cached beside it as
`<source>.flatdino-stats-<sha256[:16]>-<network tag>.npz` (or under ~/.cache/flatdino/fid when that
folder is read-only). Extraction writes finished chunks to `<cache>.partial/` (atomically), so an
interrupted run resumes where it stopped.

Nothing here imports torch at module level: a missing Inception file is reported before torch loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from tqdm import tqdm

from flatdino_cli.fid_metrics import Gaussian, frechet_distance, inception_score, precision_recall
from flatdino_cli.analysis.inception_weights import find_inception_weights
from flatdino_cli import preempt
from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_bytes, atomic_write_json, sha256_file, user_cache_dir

if TYPE_CHECKING:
    from flatdino_cli.analysis.inception import FeatureExtractor  # typing

__all__ = ["run_fid", "find_inception_weights", "open_source", "source_summary", "Source", "Summary"]

CACHE_VERSION = 1
STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # ADM's names in a reference .npz
# ============================================================================ image sources
@dataclass
class Source:
    """An image folder or an ADM .npz: uint8 (B, H, W, 3) batches, a content hash, precomputed stats."""

    path: Path
    count: int  # number of images; 0 for a statistics-only .npz
    stats: dict[str, Gaussian] = field(default_factory=dict)  # "pool"/"spatial" found in the .npz
    files: list[str] = field(default_factory=list)  # folder: image paths in order
    shape: tuple[int, ...] = ()  # (H, W, 3)
    _digest: str | None = None

    def digest(self) -> str:
        """sha256 of the contents: the .npz file's bytes, or every image's relative path and bytes."""
        if self._digest is None:
            if self.path.is_dir():
                h = hashlib.sha256()
                for f in tqdm(self.files, desc=f"hashing {self.path.name}", unit="img", leave=False,
                              disable=len(self.files) < 5000):
                    h.update(os.path.relpath(f, self.path).encode() + b"\0")
                    h.update(bytes.fromhex(sha256_file(Path(f))))
                self._digest = h.hexdigest()
            else:
                self._digest = sha256_file(self.path)
        return self._digest

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        """Images [start, stop) in batches of (B, H, W, 3) uint8."""
        if self.files:
            from flatdino_cli.data import load_rgb  # heavy

            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
                for i in range(start, stop, batch_size):
                    imgs = list(pool.map(lambda f: np.asarray(load_rgb(f)), self.files[i:min(i + batch_size, stop)]))
                    for f, im in zip(self.files[i:], imgs):
                        if im.shape != self.shape:
                            raise UserError(f"{f}: {im.shape[1]}x{im.shape[0]} but {self.files[0]} is "
                                            f"{self.shape[1]}x{self.shape[0]}; give all images one size (for rFID "
                                            f"use the ADM-cropped originals `flatdino reconstruct` writes to "
                                            f"OUT/originals)")
                    yield np.stack(imgs)
            return
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            offset = _npy_header(f)[2]
            row = int(np.prod(self.shape))
            f.seek(offset + start * row)
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                yield np.frombuffer(bytearray(f.read(n * row)), dtype=np.uint8).reshape(n, *self.shape)


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy stream; raises ValueError for layouts we cannot stream."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-ordered array")
    return shape, dtype, f.tell()


def open_source(path: str | Path, option: str) -> Source:
    """Validate and describe SAMPLES/REF (`option` names it in errors) without reading the pixels."""
    p = Path(path).expanduser()
    if p.is_dir():
        from flatdino_cli.data import list_images, load_rgb  # heavy

        files = list_images(p).paths
        return Source(p, len(files), files=files, shape=np.asarray(load_rgb(files[0])).shape)
    if not p.is_file():
        raise UserError(f"{option} {path}: no such file or folder (an image folder or an ADM .npz)")
    try:
        with np.load(p) as z:
            keys = set(z.files)
            stats = {k: Gaussian(z[m].astype(np.float64), sigma=z[s].astype(np.float64))
                     for k, (m, s) in STATS_KEYS.items() if m in keys and s in keys}
        if "arr_0" not in keys:
            if "pool" not in stats:
                raise UserError(f"{option} {p}: has neither images (arr_0) nor statistics (mu, sigma); "
                                f"keys: {', '.join(sorted(keys)) or 'none'}")
            return Source(p, 0, stats=stats)
        with zipfile.ZipFile(p) as zf, zf.open("arr_0.npy") as f:
            shape, dtype, _ = _npy_header(f)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{option} {p}: not a readable .npz ({e})") from e
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{option} {p}: arr_0 is {dtype} {shape}; expected uint8 (N, H, W, 3) as ADM's .npz")
    return Source(p, int(shape[0]), stats=stats, shape=tuple(shape[1:]))


# ============================================================================ cached, resumable features
@dataclass
class Summary:
    """What the metrics need from one source: Gaussians per feature kind, pool features, IS."""

    count: int
    gauss: dict[str, Gaussian]  # "pool", "spatial"
    pool: np.ndarray  # (N, D) float32, for precision/recall
    inception_score: tuple[float, float] | None = None

    def to_npz(self, meta: dict) -> bytes:
        arrays = {"meta": np.array(json.dumps(meta)), "pool.features": self.pool}
        for k, g in self.gauss.items():
            arrays[f"{k}.mu"] = g.mu
            arrays.update({f"{k}.sigma": g.sigma} if g.sigma is not None else {f"{k}.root": g.root})
        if self.inception_score is not None:
            arrays["is"] = np.array(self.inception_score)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, path: Path, meta: dict) -> "Summary | None":
        """The cached summary, or None if the file is missing, unreadable or for other inputs."""
        try:
            with np.load(path) as z:
                if json.loads(str(z["meta"])) != meta:
                    return None
                kinds = {k.split(".")[0] for k in z.files if k.endswith(".mu")}
                gauss = {k: Gaussian(z[f"{k}.mu"], sigma=z[f"{k}.sigma"] if f"{k}.sigma" in z.files else None,
                                     root=z[f"{k}.root"] if f"{k}.root" in z.files else None) for k in kinds}
                score = tuple(float(v) for v in z["is"]) if "is" in z.files else None
                return cls(meta["count"], gauss, z["pool.features"], score)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None


def _summarize(feats: dict[str, np.ndarray]) -> Summary:
    gauss = {k: Gaussian.from_features(v) for k, v in feats.items() if k != "logits"}
    score = inception_score(feats["logits"]) if "logits" in feats else None
    return Summary(len(feats["pool"]), gauss, feats["pool"], score)


def cache_path(src: Source, tag: str) -> Path:
    """Beside the source, unless its folder is read-only."""
    full = src.path.resolve()
    folder = full.parent
    if not os.access(folder, os.W_OK):
        folder = user_cache_dir("fid")
    return folder / f"{full.name}.flatdino-stats-{src.digest()[:16]}-{tag}.npz"


def _extract(src: Source, extractor: FeatureExtractor, part_dir: Path, batch_size: int, chunk: int,
             progress: bool) -> dict[str, np.ndarray]:
    """All features of `src`, resuming from (and adding to) the finished chunks in `part_dir`. SIGTERM /
    SIGUSR1 stop it after the batch in flight: the chunk so far is saved (a shorter one; chunks only need
    to be contiguous) and the run ends with one line saying how far it got."""
    parts, done = [], 0
    for f in sorted(part_dir.glob("chunk-*.npz")):
        if int(f.stem.split("-")[1]) != done:
            break  # chunks must be contiguous from 0; anything else is recomputed
        with np.load(f) as z:
            parts.append({k: z[k] for k in z.files})
        done += len(parts[-1]["pool"])
    bar = tqdm(total=src.count, initial=done, unit="img", disable=not progress,
               desc=f"features {src.path.name} [{extractor.name}]")
    with preempt.safe_points("fid", src.count, f"images of {src.path}", done) as reached:
        while done < src.count:
            stop = min(done + chunk, src.count)
            outs = []
            for b in src.batches(done, stop, batch_size):
                outs.append({k: np.asarray(v, dtype=np.float32).reshape(len(b), -1) for k, v in extractor(b).items()})
                bar.update(len(b))
                if preempt.requested():
                    break  # save this shorter chunk, then stop
            part = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
            buf = io.BytesIO()
            np.savez(buf, **part)
            atomic_write_bytes(part_dir / f"chunk-{done:09d}.npz", buf.getvalue())
            parts.append(part)
            done += len(part["pool"])
            reached(done)
    bar.close()
    return {k: np.concatenate([p.pop(k) for p in parts]) for k in list(parts[0])}  # frees chunks as it goes


def source_summary(src: Source, extractor: FeatureExtractor, batch_size: int = 50, chunk: int = 1000,
                   progress: bool = True) -> Summary:
    """The cached summary of `src` under `extractor`, computing (resumably) and caching it if needed."""
    path = cache_path(src, extractor.cache_tag)
    meta = {"version": CACHE_VERSION, "sha256": src.digest(), "extractor": extractor.cache_tag, "count": src.count}
    cached = Summary.from_npz(path, meta)
    if cached is not None:
        return cached
    part_dir = path.with_name(path.name + ".partial")
    summary = _summarize(_extract(src, extractor, part_dir, batch_size, chunk, progress))
    atomic_write_bytes(path, summary.to_npz(meta))
    shutil.rmtree(part_dir, ignore_errors=True)
    return summary


# ============================================================================ the command
def dino_encoder(name: str | None, weights: str | Path | None, device):
    """`fid --dino NAME [--encoder-weights W]`: the frozen encoder FD-DINOv2 is measured with (None: none)."""
    if not name:
        return None
    from flatdino_cli.encoders import load_encoder  # heavy

    return load_encoder(name, str(weights) if weights else None, device=device)


def run_fid(samples: str | Path, ref: str | Path, extractor: FeatureExtractor | None = None,
            inception_weights: str | Path | None = None, batch_size: int = 50, device: str = "cpu",
            dino_encoder=None, json_out: str | Path | None = None, k: int = 3, progress: bool = True) -> dict:
    """All metrics of SAMPLES against REF as a JSON-ready dict (also written to `json_out` if given).

    extractor: defaults to the TF Inception from `inception_weights` or the user's cache (checked
    first, so a missing file fails in about a second). dino_encoder: our frozen encoder, for FD-DINOv2.
    Metrics that cannot be computed (e.g. precision/recall against statistics-only REF) are absent,
    and `notes` says why.
    """
    if extractor is None:
        weights = find_inception_weights(inception_weights)  # before torch is even imported
        from flatdino_cli.analysis.inception import load_inception  # heavy

        extractor = load_inception(weights, device)
    src, ref_src = open_source(samples, "SAMPLES"), open_source(ref, "--ref")
    if src.count < max(2, k + 1):
        raise UserError(f"SAMPLES {samples}: {src.count} image(s); need at least {max(2, k + 1)}")
    if ref_src.count == 1:
        raise UserError(f"--ref {ref}: 1 image; statistics need at least 2")
    notes: list[str] = []
    out = {"feature_extractor": extractor.name, "num_samples": src.count, "num_ref": ref_src.count or None}
    s = source_summary(src, extractor, batch_size, progress=progress)
    r = source_summary(ref_src, extractor, batch_size, progress=progress) if ref_src.count else None

    ref_gauss = dict(r.gauss) if r is not None else {}
    if ref_src.stats and extractor.adm_compatible:
        ref_gauss.update(ref_src.stats)  # ADM: the reference batch's own mu/sigma take precedence
        notes.append(f"REF statistics ({', '.join(sorted(ref_src.stats))}) read from {ref_src.path.name}")
    elif ref_src.stats and r is not None:
        notes.append(f"REF's precomputed statistics ignored: {extractor.name} is not TF Inception")
    if not ref_gauss:
        raise UserError(f"--ref {ref}: holds only TF-Inception statistics, which {extractor.name} "
                        f"cannot be compared with; pass REF's images")
    for key, metric in (("pool", "fid"), ("spatial", "sfid")):
        if key in ref_gauss and key in s.gauss:
            if ref_gauss[key].dim != s.gauss[key].dim:
                raise UserError(f"--ref {ref}: {key} statistics are {ref_gauss[key].dim}-d but "
                                f"{extractor.name} gives {s.gauss[key].dim}-d features")
            out[metric] = frechet_distance(s.gauss[key], ref_gauss[key])
        else:
            notes.append(f"{metric} omitted: no {key} features for {'SAMPLES' if key not in s.gauss else 'REF'}")
    if s.inception_score is not None:
        out["is"], out["is_std"] = s.inception_score
    if r is not None and r.count > k:
        out["precision"], out["recall"] = precision_recall(r.pool, s.pool, k=k)
    else:
        notes.append(f"precision/recall omitted: REF has {'no images' if r is None else 'too few images'}")
    if dino_encoder is not None:
        if r is None:
            notes.append("fd_dinov2 omitted: REF has no images")
        else:
            from flatdino_cli.analysis.inception import EncoderFeatures  # heavy

            enc = EncoderFeatures(dino_encoder, device)
            sd = source_summary(src, enc, batch_size, progress=progress)
            rd = source_summary(ref_src, enc, batch_size, progress=progress)
            out["fd_dinov2"], out["fd_dinov2_features"] = frechet_distance(sd.gauss["pool"], rd.gauss["pool"]), enc.name
    out["notes"] = notes
    if json_out is not None:
        atomic_write_json(Path(json_out), out)
    return out

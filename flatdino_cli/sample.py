"""`flatdino sample`: a sample set from a DiT run (the pipeline that makes the images: pipeline/).

A sample set in OUT: images/<class>_<index>.png, parts/part_<lo>-<hi>.npz (one per shard, written
atomically while the run goes; deleted once the final file exists), samples_<N>x<S>x<S>x3.npz (ADM
format: uint8 NHWC under arr_0, labels under arr_1), grid.png and samples.json (what made it: dit / vae
/ decoder paths + weight hashes, guidance, steps, seed). A killed run, rerun, reuses finished shards
and PNGs and only generates what is missing. PNGs are encoded on a writer thread while the next batch
runs (png_writer).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from flatdino_cli import preempt
from flatdino_cli.classes import class_label, class_plan, resolve_classes
from flatdino_cli.config import SampleConfig
from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig, adaptive_tally, mean_evaluations, network_evaluations
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.pipeline.generate import generate, sampler_batch
from flatdino_cli.pipeline.load import load_pipeline
from flatdino_cli.pipeline.options import sampling_flow
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import atomic_write, atomic_write_bytes, atomic_write_json, check_out_dir, sha256_strings
from flatdino_cli.viz import load_png, save_grid, save_png

__all__ = ["write_sample_set", "run_sample", "png_writer"]

GRID_ROWS, GRID_COLS, GRID_SINGLE = 16, 8, 64  # sample grid caps: classes x images, or images of one class


# ============================================================================ sharded sample sets
def _png_name(label: int, index: int) -> str:
    return f"{label:03d}_{index:06d}.png"


def _npy_shape(zf: zipfile.ZipFile, name: str) -> tuple:
    with zf.open(name) as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), dtype


def _part_ok(path: Path, lo: int, hi: int, labels: np.ndarray, S: int) -> bool:
    try:
        with np.load(path) as z:
            if not (np.array_equal(z["indices"], np.arange(lo, hi)) and np.array_equal(z["labels"], labels[lo:hi])):
                return False
        with zipfile.ZipFile(path) as zf:
            return _npy_shape(zf, "arr_0.npy") == ((hi - lo, S, S, 3), np.dtype(np.uint8))
    except Exception:  # damaged or foreign: regenerate it
        return False


def _write_npz_streamed(path: Path, parts: list[Path], count: int, S: int, labels: np.ndarray,
                        pick: dict[int, np.ndarray]) -> None:
    """ADM .npz (arr_0 uint8 (count, S, S, 3), arr_1 int64 labels) written part by part, never holding
    more than one part in memory (50k x 256^2 x 3 is 9.8 GB); written atomically (fsynced).
    Rows whose index is a key of `pick` are copied into it (the grid)."""
    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                           "fortran_order": False, "shape": (count, S, S, 3)})
                for part in parts:
                    with np.load(part) as z:
                        arr, idx = z["arr_0"], z["indices"]
                    for k, i in enumerate(idx.tolist()):
                        if i in pick:
                            pick[i] = arr[k]
                    out.write(np.ascontiguousarray(arr).tobytes())
            with zf.open("arr_1.npy", "w") as out:
                np.lib.format.write_array(out, labels.astype(np.int64))

    atomic_write(path, write)


def _grid_plan(labels: Sequence[int]) -> tuple[list[int], int]:
    """(image indices, images per row): one row per class (first GRID_ROWS classes, GRID_COLS images
    each), or a square of up to GRID_SINGLE images of a single class."""
    first: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        first.setdefault(c, []).append(i)
    if len(first) == 1:
        idx = next(iter(first.values()))[:GRID_SINGLE]
        return idx, math.ceil(math.sqrt(len(idx)))
    rows = list(first.values())[:GRID_ROWS]
    cols = min(GRID_COLS, min(len(r) for r in rows))  # rows stay aligned: the smallest class sets the width
    return [i for r in rows for i in r[:cols]], cols


@contextlib.contextmanager
def png_writer(depth: int = 2):
    """submit(images, paths): PNGs encoded and written on one background thread, so the encoding
    (zlib, which runs without the GIL) overlaps the next batch's networks instead of following them.
    At most `depth` batches wait (bounded memory); leaving the block waits for every write, also when
    the body raised (a killed run keeps the images it finished), and re-raises a write's error."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="png-writer")
    pending: collections.deque = collections.deque()

    def write(images, paths) -> None:
        for img, path in zip(images, paths):
            save_png(img, path)

    def submit(images, paths) -> None:
        while len(pending) >= depth:
            pending.popleft().result()
        pending.append(pool.submit(write, images, list(paths)))

    try:
        yield submit
    finally:
        pool.shutdown(wait=True)
    for f in pending:
        f.result()


def _make_shard(pipe: Pipeline, labels: np.ndarray, lo: int, hi: int, images_dir: Path, seed: int, flow: FlowConfig,
                batch_size: int, rt: Runtime, advance, evaluations: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Images lo..hi-1 as uint8 (hi - lo, S, S, 3): read back from their PNGs where a previous run
    wrote them, generated (and written, off the critical path) otherwise. `advance(k)`: k more images
    done (the progress bar; where a stop request ends the run, the PNGs in flight written first).
    `evaluations`: receives (images, network evaluations per image) per sampled chunk."""
    S = pipe.image_size
    arr = np.zeros((hi - lo, S, S, 3), np.uint8)
    todo = []
    for i in range(lo, hi):
        png = images_dir / _png_name(int(labels[i]), i)
        try:
            img = load_png(png) if png.is_file() else None
        except Exception:
            img = None  # a damaged file: make it again
        if img is not None and img.shape == (S, S, 3):
            arr[i - lo] = img
            advance(1)
        else:
            todo.append(i)
    step = sampler_batch(batch_size, rt.device)
    with png_writer() as write_pngs:
        for b in range(0, len(todo), step):
            idx = todo[b: b + step]
            imgs = generate(pipe, labels[idx].tolist(), idx, seed, flow, batch_size, rt, evaluations)
            write_pngs(imgs, [images_dir / _png_name(int(labels[i]), i) for i in idx])
            arr[np.asarray(idx) - lo] = imgs
            advance(len(idx))
    return arr


def _identity(pipe: Pipeline, labels: np.ndarray, seed: int, flow: FlowConfig, rt: Runtime) -> dict:
    """What makes a sample set what it is: a rerun into the same folder resumes only when this matches."""
    return {
        "dit": pipe.identity.get("dit"), "vae": pipe.identity.get("vae"), "decoder": pipe.identity.get("decoder"),
        "stats": pipe.identity.get("stats"), "guide": pipe.identity.get("guide"), "seed": seed, "count": len(labels),
        "image_size": pipe.image_size, "labels_sha256": sha256_strings(labels.tolist()),
        "classes": sorted(set(labels.tolist()))[:1000],
        "flow": {"cfg_scale": flow.cfg_scale, "cfg_interval": list(flow.cfg_interval),
                 "cfg_interval_inclusive": flow.cfg_interval_inclusive, "steps": flow.steps,
                 "sampler": flow.sampler, "shift": flow.shift,
                 # recorded only where they act, so old sample sets stay resumable
                 **({"grid": flow.grid} if flow.grid != "ours" else {}),
                 **({"cfg_schedule": [list(p) for p in flow.cfg_schedule]} if flow.cfg_schedule else {}),
                 **({"sde_diffusion": flow.sde_diffusion, "sde_last_step": flow.sde_last_step}
                    if flow.sampler == "sde" else {})},
        "precision": rt.precision,
        "noise": "image i: eps ~ N(0, I) from torch.Generator seeded by SeedSequence([seed, i])",
    }


def _earlier_manifest(out: Path, identity: dict) -> dict:
    """The samples.json of the run this one resumes ({} for a fresh folder); a UserError where the folder
    holds another set (other settings, or PNGs that no manifest describes) or an unreadable manifest."""
    mf_path = out / "samples.json"
    if not mf_path.is_file():
        if any((out / "images").glob("*.png")):
            raise UserError(f"{out}/images: holds PNGs that no samples.json describes; choose another --out")
        return {}
    try:
        earlier = json.loads(mf_path.read_text())
        old = earlier.get("identity", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        raise UserError(f"{mf_path}: unreadable; choose another --out or delete that folder") from None
    diffs = [k for k in sorted(set(old) | set(identity)) if json.dumps(old.get(k), sort_keys=True)
             != json.dumps(json.loads(json.dumps(identity.get(k))), sort_keys=True)]
    if diffs:
        raise UserError(f"{out}: holds samples made with other settings ({', '.join(diffs)} differ); choose "
                        "another --out or delete it")
    return earlier


def _save_sample_grid(pipe: Pipeline, images: np.ndarray, labels: np.ndarray, grid_idx: list[int], nrow: int,
                      path: Path) -> None:
    # the class name in full in a column beside its row (a caption on a 48-px tile was cut to "0 00_red_ci")
    row_classes = [int(labels[i]) for i in grid_idx[::nrow]]
    row_labels = [class_label(c, pipe.class_names, pipe.cfg.model.num_classes)
                  if r == 0 or c != row_classes[r - 1] else "" for r, c in enumerate(row_classes)]
    save_grid(images, path, nrow, row_labels=row_labels)


def write_sample_set(pipe: Pipeline, labels: Sequence[int], out: str | Path, seed: int, flow: FlowConfig,
                     batch_size: int = 16, shard_size: int = 1000, rt: Runtime = CPU, extra: dict | None = None,
                     progress: bool = True) -> dict:
    """Generate images for `labels` into `out` (see the module docstring); resumable; returns the manifest."""
    out = Path(out)
    labels_arr = np.asarray(labels, dtype=np.int64)
    N, S = len(labels_arr), pipe.image_size
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: must be >= 1")
    if seed < 0:  # checked before anything is written: a fixed rerun must not meet a half-made folder
        raise UserError(f"--seed {seed}: must be >= 0")
    check_out_dir(out)
    identity = _identity(pipe, labels_arr, seed, flow, rt)
    earlier = _earlier_manifest(out, identity)
    mf_path, npz = out / "samples.json", out / f"samples_{N}x{S}x{S}x3.npz"
    # DiT forwards per image, guided evaluations counted twice (flow.network_evaluations); dopri5's is
    # known only after sampling: counted per chunk from the times it evaluated at (adaptive_tally)
    adaptive = flow.sampler == "dopri5"
    tally = earlier.get("adaptive_evaluations") if adaptive else None  # the images made before a resume
    counts: list[tuple[int, int]] | None = [] if adaptive else None  # this run's chunks
    manifest = {"identity": identity, **(extra or {}),
                "network_evaluations": mean_evaluations(tally) if adaptive else network_evaluations(flow),
                **({"adaptive_evaluations": tally} if tally else {}),
                "npz": npz.name, "grid": "grid.png", "images": "images", "complete": False}

    def note_evaluations() -> None:  # after each shard: a killed run keeps the count of what it made
        if counts:
            manifest["adaptive_evaluations"] = merged = adaptive_tally(counts, tally)
            manifest["network_evaluations"] = mean_evaluations(merged)
            atomic_write_json(mf_path, manifest)

    atomic_write_json(mf_path, manifest)
    images_dir, parts_dir = out / "images", out / "parts"
    images_dir.mkdir(parents=True, exist_ok=True)
    shards = [(lo, min(lo + shard_size, N)) for lo in range(0, N, shard_size)]
    grid_idx, nrow = _grid_plan(labels_arr.tolist())
    if not npz.is_file():
        parts_dir.mkdir(exist_ok=True)
        parts = [parts_dir / f"part_{lo:07d}-{hi:07d}.npz" for lo, hi in shards]
        done = [p.is_file() and _part_ok(p, lo, hi, labels_arr, S) for p, (lo, hi) in zip(parts, shards)]
        finished = [sum(hi - lo for (lo, hi), ok in zip(shards, done) if ok)]
        bar = tqdm(total=N, initial=finished[0], desc="sample", unit="img", dynamic_ncols=True, disable=not progress)
        with preempt.safe_points("sample", N, "images", finished[0]) as reached:
            def advance(k: int) -> None:  # SIGTERM / SIGUSR1 stop the run here, between batches
                bar.update(k)
                finished[0] += k
                reached(finished[0])

            for part, (lo, hi), ok in zip(parts, shards, done):
                if not ok:
                    arr = _make_shard(pipe, labels_arr, lo, hi, images_dir, seed, flow, batch_size, rt, advance,
                                      counts)
                    buf = io.BytesIO()
                    np.savez(buf, arr_0=arr, labels=labels_arr[lo:hi], indices=np.arange(lo, hi))
                    atomic_write_bytes(part, buf.getvalue())
                    note_evaluations()
        bar.close()
        pick = {i: None for i in grid_idx}
        _write_npz_streamed(npz, parts, N, S, labels_arr, pick)
        for p in parts:
            p.unlink(missing_ok=True)
        if not any(parts_dir.iterdir()):
            parts_dir.rmdir()
        grid_images = np.stack([pick[i] for i in grid_idx])
    else:  # finished earlier: the grid comes from the PNGs (reading arr_0 would load all of it)
        try:
            grid_images = np.stack([load_png(images_dir / _png_name(int(labels_arr[i]), i)) for i in grid_idx])
        except OSError:  # PNGs deleted: fall back to the .npz
            with np.load(npz) as z:
                grid_images = z["arr_0"][grid_idx]
    _save_sample_grid(pipe, grid_images, labels_arr, grid_idx, nrow, out / "grid.png")
    manifest["complete"] = True
    atomic_write_json(mf_path, manifest)
    return manifest


def run_sample(cfg: SampleConfig, rt: Runtime = CPU, progress: bool = True) -> dict:
    """`flatdino sample`: resolve classes, load the pipeline, write the sample set; returns the manifest.
    With `cfg.guide`, AutoGuidance at `cfg.guide_scale` replaces CFG (same interval and schedule options)."""
    pipe = load_pipeline(cfg.dit, cfg.vae, cfg.decoder, rt.device, ema=cfg.ema, stats=cfg.stats, guide=cfg.guide)
    K = pipe.cfg.model.num_classes
    guided, weight, per_class = cfg.guide is not None, cfg.weight, cfg.per_class
    if K == 0:  # unconditional (trained on a store without labels): every image from the null class
        if cfg.classes or cfg.all_classes:
            raise UserError(f"sample: {cfg.dit} is unconditional (trained without labels); drop --class / --classes")
        if not guided and (weight not in (None, 1.0) or cfg.schedule is not None):
            raise UserError(f"sample: {cfg.dit} is unconditional, so classifier-free guidance has nothing to "
                            "guide; drop --cfg / --cfg-schedule (or pass --cfg 1)")
        ids = [0]
        weight = weight if guided else 1.0
    elif cfg.all_classes:
        if cfg.classes:
            raise UserError("sample: pass --class or --classes all, not both")
        ids = list(range(K))
        per_class = 50 if per_class is None and cfg.n is None else per_class
    else:
        ids = resolve_classes(cfg.classes, K, pipe.class_names)
    labels = class_plan(ids, cfg.n, per_class)
    flow = sampling_flow(pipe.cfg.flow, weight, cfg.steps, cfg.sampler, cfg.interval, cfg.grid, cfg.schedule, cfg.shift,
                         paper=cfg.paper_sampler)
    out = cfg.out
    if out is None:
        what = "uncond" if K == 0 else "all" if cfg.all_classes else "-".join(map(str, ids[:4])) + (f"-and{len(ids) - 4}" if len(ids) > 4 else "")
        home = Path(cfg.dit) if Path(cfg.dit).is_dir() else Path(cfg.dit).parent  # an RAE file: samples beside it
        weights = "-".join(f"{w:g}" for *_, w in flow.cfg_schedule) if flow.cfg_schedule else f"{flow.cfg_scale:g}"
        guidance = f"ag{weights}" if guided else f"cfg{weights}"
        grid_tag = (("-raegrid" if flow.grid == "rae" else "")
                    + (f"-shift{cfg.shift:g}" if cfg.shift is not None else ""))
        out = home / "samples" / (f"{what}-n{len(labels)}-{guidance}-{flow.sampler}{flow.steps}{grid_tag}"
                                  f"-seed{cfg.seed}{'' if cfg.ema else '-raw'}")
    extra = {"classes": sorted(set(labels)), "per_class": per_class, "paper_sampler": cfg.paper_sampler,
             "created_by": "flatdino sample"}
    manifest = write_sample_set(pipe, labels, out, cfg.seed, flow, cfg.batch_size, cfg.shard_size, rt, extra, progress)
    return {**manifest, "out": str(out)}



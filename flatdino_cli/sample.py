"""`flatdino sample` and `flatdino reconstruct`: from latents to pictures.

One decode path serves FlatDINO and the RAE baseline:

    DiT sample x (B, N, d) --[stats: x*std+mean]--> --[VAE decoder]--> features (B, P, C)
        --pixel decoder--> (B, 3, S, S) --clip [0, 1], x255, ROUND--> uint8 (B, S, S, 3)

FlatDINO: N x d = 32 x 128 raw VAE means (no stats), turned into 256 x 768 features by the VAE decoder.
RAE mode (a DiT with model.grid): N x d = 256 x 768 normalised features, de-normalised with
RUN/stats.pt, no VAE. Either way the pixel decoder consumes raw (LN-without-affine) DINOv2 features.

Noise: image i of a sample set gets eps_i ~ N(0, I) from its own generator seeded by (seed, i). On
the CPU every network forward then runs on a fixed CPU_CHUNK images (see `generate`), so one seed
gives bit-identical images whatever the batch size, the resume point or the image's place in its
batch; other devices give the same images up to float rounding.

Speed (bench/sample.py): the guided and unguided halves share one DiT forward (flow.guided_velocity);
each image goes through the decoders once, at the sampler batch; PNGs are encoded on a writer thread
while the next batch runs (png_writer); `--compile` compiles the DiT once per pipeline (sampling_dit).

A sample set in OUT: images/<class>_<index>.png, parts/part_<lo>-<hi>.npz (one per shard, written
atomically while the run goes; deleted once the final file exists), samples_<N>x<S>x<S>x3.npz (ADM
format: uint8 NHWC under arr_0, labels under arr_1), grid.png and samples.json (what made it: dit / vae
/ decoder paths + weight hashes, guidance, steps, seed). A killed run, rerun, reuses finished shards
and PNGs and only generates what is missing.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import io
import json
import math
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flatdino_cli.checkpoint import weights_file
from flatdino_cli.config import DiTStageConfig
from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig, make_velocity_fn, sample
from flatdino_cli.models.pixel_decoder import check_features, load_decoder
from flatdino_cli.models.stats import STATS_FILE, load_stats
from flatdino_cli.runs import (RAE_DIT_FILE, RAE_STATS_FILES, decoder_identity, file_identity, load_run, read_rae_dit,
                               run_inputs, store_manifest)
from flatdino_cli.runtime import Runtime
from flatdino_cli.utils import (atomic_write, atomic_write_bytes, atomic_write_json, check_out_dir, sha256_file,
                                 sha256_strings)
from flatdino_cli.viz import load_png, save_grid, save_png, to_uint8

__all__ = ["Pipeline", "load_pipeline", "generate", "sampler_batch", "CPU_CHUNK", "image_seed", "image_noise",
           "sampling_flow", "parse_interval",
           "imagenet_class_names", "resolve_classes", "class_plan", "write_sample_set", "run_sample",
           "training_grid_hook"]

CPU = Runtime(torch.device("cpu"), "fp32", False)
GRID_ROWS, GRID_COLS, GRID_SINGLE = 16, 8, 64  # sample grid caps: classes x images, or images of one class
# Images per network forward on the CPU, whatever --batch-size says. The DiT's per-image
# conditioning (time embedder, adaLN projections) runs GEMMs with one row per image, and MKL rounds a
# row differently with the number of rows (other kernels below 4 rows, row splits across threads), so
# image i differed in the last bits between --batch-size 1 and 8, now and then by a grey level. With
# one fixed shape an image's numbers depend neither on its batch nor on its place in it (checked at
# 1 and 2 threads, with and without DDT head, Euler/Heun, CFG). 8 rows stay clear of the few-row
# kernels and keep CPU GEMMs efficient; on CUDA, speed matters more and the user's batch is used.
CPU_CHUNK = 8


# ============================================================================ class names
@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in id order: torchvision's bundled list, read from its source
    file (importing torchvision.models takes seconds); [] without torchvision."""
    spec = importlib.util.find_spec("torchvision")
    meta = Path(spec.origin).parent / "models" / "_meta.py" if spec and spec.origin else None
    try:
        for node in ast.parse(meta.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_IMAGENET_CATEGORIES":
                return list(ast.literal_eval(node.value))
    except (AttributeError, OSError, SyntaxError, ValueError):
        pass
    try:  # a torchvision laid out differently: pay for the import
        from torchvision.models._meta import _IMAGENET_CATEGORIES
    except ImportError:
        return []
    return list(_IMAGENET_CATEGORIES)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _lookup(name: str, names: Sequence[str]) -> list[int]:
    key = _norm(name)
    return [i for i, n in enumerate(names) if n and _norm(n) == key]


def resolve_classes(items: Sequence[str], num_classes: int, run_names: Sequence[str] = ()) -> list[int]:
    """Class ids from ids or names: the run's own names first (its latent store's class_names), then
    ImageNet's (case-insensitive, '_' = ' ') when the DiT has 1000 classes. Unknown or ambiguous names
    are one-line UserErrors with close matches."""
    imagenet = imagenet_class_names() if num_classes == 1000 else []
    out = []
    for item in items:
        item = str(item).strip()
        if item.lstrip("-").isdigit():
            c = int(item)
            if not 0 <= c < num_classes:
                raise UserError(f"--class {c}: out of range; this DiT has classes 0..{num_classes - 1}")
            out.append(c)
            continue
        for names in (run_names, imagenet):
            hits = [i for i in _lookup(item, names) if i < num_classes]
            if len(hits) > 1:  # ImageNet's "Cardigan" (corgi) and "cardigan" (sweater): exact case decides
                hits = [i for i in hits if names[i].strip() == item] or hits
            if len(hits) > 1:
                raise UserError(f"--class {item!r}: ambiguous, classes {', '.join(map(str, hits))} share that "
                                "name; pass the id")
            if hits:
                out.append(hits[0])
                break
        else:
            pool = {_norm(n): n for n in [*run_names, *imagenet] if n}
            close = [pool[k] for k in difflib.get_close_matches(_norm(item), list(pool), n=4, cutoff=0.6)]
            few = [n for n in run_names if n][:20] if len(run_names) <= 20 else []
            hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
                    else f"this run's classes are {', '.join(repr(n) for n in few)}" if few
                    else "pass a class id" + ("" if pool else " (this run records no class names)"))
            raise UserError(f"--class {item!r}: unknown class name; {hint}")
    return out


def class_label(c: int, run_names: Sequence[str], num_classes: int) -> str:
    """What a grid caption says for class c: the run's name, the ImageNet name, or the id."""
    if c < len(run_names) and run_names[c]:
        return f"{c} {run_names[c]}"
    names = imagenet_class_names() if num_classes == 1000 else []
    return f"{c} {names[c]}" if c < len(names) else str(c)


def class_plan(classes: Sequence[int], n: int | None, per_class: int | None) -> list[int]:
    """Labels of the images to make, in order: `per_class` of each class, or `n` in total split into
    contiguous, balanced blocks (class k gets images [k n / K, (k+1) n / K))."""
    if not classes:
        raise UserError("sample: pass --class ID|NAME (repeatable) or --classes all")
    if per_class is not None and n is not None:
        raise UserError("sample: pass -n (images in total) or --per-class, not both")
    if per_class is not None:
        if per_class < 1:
            raise UserError(f"--per-class {per_class}: must be >= 1")
        return [c for c in classes for _ in range(per_class)]
    n = 16 if n is None else n
    if n < len(classes):
        raise UserError(f"-n {n}: fewer images than the {len(classes)} classes asked for; raise -n")
    return [classes[i * len(classes) // n] for i in range(n)]


# ============================================================================ the pipeline
@dataclass
class Pipeline:
    """A DiT with what turns its samples into pixels (see the module docstring)."""

    cfg: DiTStageConfig
    dit: nn.Module
    decoder: nn.Module  # PixelDecoder
    vae: nn.Module | None = None
    stats: nn.Module | None = None  # models.stats.LatentStats
    identity: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    guide: nn.Module | None = None  # AutoGuidance's weaker DiT: v = v_guide + w (v_main - v_guide)
    compiled: tuple | None = field(default=None, repr=False)  # (dit, its torch.compile wrapper): sampling_dit

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.cfg.model.tokens, self.cfg.model.in_dim

    @property
    def image_size(self) -> int:
        return self.decoder.cfg.image_size

    @torch.no_grad()
    def decode(self, x: torch.Tensor, rt: Runtime = CPU) -> np.ndarray:
        """DiT samples (B, N, d) -> uint8 images (B, S, S, 3)."""
        x = x.float()
        if self.stats is not None:
            x = self.stats.denormalize(x)
        with rt.autocast():
            feats = self.vae.decode(x) if self.vae is not None else x  # (B, P, C)
            pixels = self.decoder(feats.float())  # (B, 3, S, S)
        return to_uint8(pixels)


def _on_features(cfg: DiTStageConfig, store_kind: str | None = None) -> bool:
    """RAE mode: the DiT was trained on a feature store (inputs.json says so), or, unrecorded, it has a
    2-D grid (rae-* presets)."""
    return store_kind == "features" if store_kind else cfg.model.grid is not None


def _decoding_parts(cfg: DiTStageConfig, vae_run: str | Path | None, decoder: str | Path, device,
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


def _rae_checkpoint(path: Path) -> Path | None:
    """The RAE stage-2 file `path` names (the file, or a folder holding one), None for a run dir."""
    if path.is_file():
        return path
    if not path.is_dir() or (path / "config.yaml").is_file():
        return None
    if (path / RAE_DIT_FILE).is_file():
        return path / RAE_DIT_FILE
    pts = sorted(path.glob("*.pt"))
    if len(pts) == 1 and pts[0].name not in ("stat.pt", "stats.pt"):
        return pts[0]
    raise UserError(f"{path}: neither a flatdino run directory (no config.yaml) nor a folder holding RAE's "
                    f"{RAE_DIT_FILE}")


def load_dit(path: str | Path, device: torch.device | str = "cpu", ema: bool = True, stats: str | Path | None = None,
             default_stats: Path | None = None, option: str = "--dit") -> LoadedDiT:
    """A train-dit run (EMA weights unless ema=False; RUN/stats.pt) or RAE's stage2_model.pt (file or its
    folder; stats from `stats`, else stat.pt beside it, else `default_stats`); one-line UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{option} {path}: no such file or directory")
    rae_file = _rae_checkpoint(path)
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
        cfg, model, sha = load_run(path, "dit", device=device, prefer_ema=ema)
        wfile = weights_file(path, "dit", prefer_ema=ema)
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
                  guide: str | Path | None = None) -> Pipeline:
    """DiT (train-dit run, EMA weights unless ema=False, or RAE's stage2_model.pt) + VAE run (FlatDINO;
    default: the one in the DiT's inputs.json) or stats (RAE mode) + pixel decoder, and an optional
    AutoGuidance DiT (`guide`, EMA weights); one-line UserError on any mismatch."""
    main = load_dit(dit_run, device, ema, stats)
    cfg, inputs = main.cfg, main.inputs
    recorded_vae = inputs.get("identity", {}).get("vae_run")
    on_features = _on_features(cfg, inputs.get("kind"))
    if vae_run is None and not on_features and recorded_vae and Path(recorded_vae).is_dir():
        vae_run = recorded_vae  # the VAE the DiT's latents came from
    vae, dec, identity = _decoding_parts(cfg, vae_run, decoder, device, f"DiT {dit_run}", on_features)
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


# ============================================================================ generation
def image_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for image `index` of a run seeded `seed` (SeedSequence mixing: no two
    (seed, index) pairs share a stream the way seed + index would)."""
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) float32 CPU noise, row b drawn from its own generator seeded image_seed(seed, indices[b])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(image_seed(seed, int(i))))
            for i in indices]
    return torch.stack(rows)


def sampling_flow(flow: FlowConfig, cfg_scale: float | None = None, steps: int | None = None,
                  sampler: str | None = None, interval: tuple[float, float] | None = None,
                  grid: str | None = None) -> FlowConfig:
    """The DiT config's flow section with the command line's overrides (validated: bad values are
    one-line errors)."""
    changes = {k: v for k, v in (("cfg_scale", cfg_scale), ("steps", steps), ("sampler", sampler),
                                 ("cfg_interval", interval), ("grid", grid)) if v is not None}
    return dataclasses.replace(flow, **changes)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'0.225,1' -> (0.225, 1.0); the guidance interval in our time (t = 1 is data)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--interval {text}: expected LO,HI, e.g. --interval 0.225,1") from None
    return lo, hi


def sampler_batch(batch_size: int, device: torch.device | str) -> int:
    """Images per generate() call for --batch-size: on the CPU rounded up to a multiple of CPU_CHUNK
    (a smaller batch would be padded to CPU_CHUNK anyway), elsewhere batch_size itself."""
    batch_size = max(1, batch_size)
    return -(-batch_size // CPU_CHUNK) * CPU_CHUNK if torch.device(device).type == "cpu" else batch_size


def sampling_dit(pipe: Pipeline, rt: Runtime) -> nn.Module:
    """The DiT as generate() runs it: torch.compile'd once per pipeline when rt.compile. Static shapes:
    the sampler only ever feeds a chunk and its guided double ([x, x] with [y, null], one forward)."""
    if not rt.compile:
        return pipe.dit
    if pipe.compiled is None or pipe.compiled[0] is not pipe.dit:
        pipe.compiled = (pipe.dit, rt.maybe_compile(pipe.dit, dynamic=False))
    return pipe.compiled[1]


@torch.no_grad()
def generate(pipe: Pipeline, labels: Sequence[int], indices: Sequence[int], seed: int,
             flow: FlowConfig | None = None, batch_size: int = 16, rt: Runtime = CPU) -> np.ndarray:
    """uint8 images (len(labels), S, S, 3): image k is class labels[k] from the noise of image indices[k].

    On the CPU the images go through the networks CPU_CHUNK at a time, the last chunk padded with
    copies of its last image (bit-identical images at any batch size; see CPU_CHUNK); elsewhere
    batch_size at a time, unpadded."""
    flow = flow or pipe.cfg.flow
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} indices")
    fixed = rt.device.type == "cpu"
    chunk = CPU_CHUNK if fixed else max(1, batch_size)
    model = sampling_dit(pipe, rt)
    out = []
    for lo in range(0, len(labels), chunk):
        idx, lab = list(indices[lo: lo + chunk]), list(labels[lo: lo + chunk])
        k = len(idx)
        if fixed:  # pad to the fixed shape; the copies are dropped after decoding
            idx, lab = idx + idx[-1:] * (chunk - k), lab + lab[-1:] * (chunk - k)
        noise = image_noise(seed, idx, pipe.latent_shape).to(rt.device)  # (B, N, d)
        y = torch.tensor(lab, dtype=torch.long, device=rt.device)

        def run(net):
            def forward(x, t, y_):
                with rt.autocast():
                    return net(x, t, y_).float()
            return forward

        guide = run(pipe.guide) if pipe.guide is not None else None
        velocity = make_velocity_fn(run(model), y, flow, pipe.cfg.model.num_classes, guide)
        x = sample(velocity, noise, flow.steps, flow.shift, flow.sampler, flow.grid)  # (B, N, d)
        out.append(pipe.decode(x, rt)[:k])
    S = pipe.image_size
    return np.concatenate(out) if out else np.zeros((0, S, S, 3), np.uint8)


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
                batch_size: int, rt: Runtime, bar: tqdm) -> np.ndarray:
    """Images lo..hi-1 as uint8 (hi - lo, S, S, 3): read back from their PNGs where a previous run
    wrote them, generated (and written, off the critical path) otherwise."""
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
            bar.update(1)
        else:
            todo.append(i)
    step = sampler_batch(batch_size, rt.device)
    with png_writer() as write_pngs:
        for b in range(0, len(todo), step):
            idx = todo[b: b + step]
            imgs = generate(pipe, labels[idx].tolist(), idx, seed, flow, batch_size, rt)
            write_pngs(imgs, [images_dir / _png_name(int(labels[i]), i) for i in idx])
            arr[np.asarray(idx) - lo] = imgs
            bar.update(len(idx))
    return arr


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
    identity = {
        "dit": pipe.identity.get("dit"), "vae": pipe.identity.get("vae"), "decoder": pipe.identity.get("decoder"),
        "stats": pipe.identity.get("stats"), "guide": pipe.identity.get("guide"), "seed": seed, "count": N, "image_size": S,
        "labels_sha256": sha256_strings(labels_arr.tolist()), "classes": sorted(set(labels_arr.tolist()))[:1000],
        "flow": {"cfg_scale": flow.cfg_scale, "cfg_interval": list(flow.cfg_interval),
                 "cfg_interval_inclusive": flow.cfg_interval_inclusive, "steps": flow.steps,
                 "sampler": flow.sampler, "shift": flow.shift,
                 **({"grid": flow.grid} if flow.grid != "ours" else {})},  # old sample sets stay resumable
        "precision": rt.precision,
        "noise": "image i: eps ~ N(0, I) from torch.Generator seeded by SeedSequence([seed, i])",
    }
    mf_path = out / "samples.json"
    if not mf_path.is_file() and any((out / "images").glob("*.png")):
        raise UserError(f"{out}/images: holds PNGs that no samples.json describes; choose another --out")
    if mf_path.is_file():
        try:
            old = json.loads(mf_path.read_text()).get("identity", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            raise UserError(f"{mf_path}: unreadable; choose another --out or delete that folder") from None
        diffs = [k for k in sorted(set(old) | set(identity)) if json.dumps(old.get(k), sort_keys=True)
                 != json.dumps(json.loads(json.dumps(identity.get(k))), sort_keys=True)]
        if diffs:
            raise UserError(f"{out}: holds samples made with other settings ({', '.join(diffs)} differ); choose "
                            "another --out or delete it")
    npz = out / f"samples_{N}x{S}x{S}x3.npz"
    manifest = {"identity": identity, **(extra or {}), "npz": npz.name, "grid": "grid.png", "images": "images",
                "complete": False}
    atomic_write_json(mf_path, manifest)
    images_dir, parts_dir = out / "images", out / "parts"
    images_dir.mkdir(parents=True, exist_ok=True)
    shards = [(lo, min(lo + shard_size, N)) for lo in range(0, N, shard_size)]
    grid_idx, nrow = _grid_plan(labels_arr.tolist())
    if not npz.is_file():
        parts_dir.mkdir(exist_ok=True)
        parts = [parts_dir / f"part_{lo:07d}-{hi:07d}.npz" for lo, hi in shards]
        done = [p.is_file() and _part_ok(p, lo, hi, labels_arr, S) for p, (lo, hi) in zip(parts, shards)]
        bar = tqdm(total=N, initial=sum(hi - lo for (lo, hi), ok in zip(shards, done) if ok), desc="sample",
                   unit="img", dynamic_ncols=True, disable=not progress)
        for part, (lo, hi), ok in zip(parts, shards, done):
            if not ok:
                arr = _make_shard(pipe, labels_arr, lo, hi, images_dir, seed, flow, batch_size, rt, bar)
                buf = io.BytesIO()
                np.savez(buf, arr_0=arr, labels=labels_arr[lo:hi], indices=np.arange(lo, hi))
                atomic_write_bytes(part, buf.getvalue())
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
    # the class name in full in a column beside its row (a caption on a 48-px tile was cut to "0 00_red_ci")
    row_classes = [int(labels_arr[i]) for i in grid_idx[::nrow]]
    row_labels = [class_label(c, pipe.class_names, pipe.cfg.model.num_classes)
                  if r == 0 or c != row_classes[r - 1] else "" for r, c in enumerate(row_classes)]
    save_grid(grid_images, out / "grid.png", nrow, row_labels=row_labels)
    manifest["complete"] = True
    atomic_write_json(mf_path, manifest)
    return manifest


def run_sample(dit: str | Path, vae: str | Path | None, decoder: str | Path, classes: Sequence[str] = (),
               all_classes: bool = False, n: int | None = None, per_class: int | None = None,
               cfg_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
               interval: str | None = None, seed: int = 0, out: str | Path | None = None, batch_size: int = 16,
               shard_size: int = 1000, ema: bool = True, rt: Runtime = CPU, progress: bool = True,
               stats: str | Path | None = None, guide: str | Path | None = None, guide_scale: float | None = None,
               grid: str | None = None) -> dict:
    """`flatdino sample`: resolve classes, load the pipeline, write the sample set; returns the manifest.
    With `guide`, AutoGuidance at `guide_scale` replaces CFG (same interval option)."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if (guide is None) != (guide_scale is None):
        raise UserError("sample: AutoGuidance needs both --guide RUN_OR_FILE and --guide-scale W")
    if guide is not None and cfg_scale is not None:
        raise UserError("sample: --cfg and --guide-scale are two guidance methods; pass one")
    cfg_scale = guide_scale if guide is not None else cfg_scale
    pipe = load_pipeline(dit, vae, decoder, rt.device, ema=ema, stats=stats, guide=guide)
    K = pipe.cfg.model.num_classes
    if all_classes:
        if classes:
            raise UserError("sample: pass --class or --classes all, not both")
        ids = list(range(K))
        per_class = 50 if per_class is None and n is None else per_class
    else:
        ids = resolve_classes(classes, K, pipe.class_names)
    labels = class_plan(ids, n, per_class)
    flow = sampling_flow(pipe.cfg.flow, cfg_scale, steps, sampler, parse_interval(interval), grid)
    if out is None:
        what = "all" if all_classes else "-".join(map(str, ids[:4])) + (f"-and{len(ids) - 4}" if len(ids) > 4 else "")
        home = Path(dit) if Path(dit).is_dir() else Path(dit).parent  # an RAE file: samples beside it
        guidance = f"ag{flow.cfg_scale:g}" if guide is not None else f"cfg{flow.cfg_scale:g}"
        out = home / "samples" / (f"{what}-n{len(labels)}-{guidance}-{flow.sampler}{flow.steps}"
                                  f"{'-raegrid' if flow.grid == 'rae' else ''}-seed{seed}{'' if ema else '-raw'}")
    extra = {"classes": sorted(set(labels)), "per_class": per_class, "created_by": "flatdino sample"}
    manifest = write_sample_set(pipe, labels, out, seed, flow, batch_size, shard_size, rt, extra, progress)
    return {**manifest, "out": str(out)}


# ============================================================================ training-time grids
def training_grid_hook(cfg: DiTStageConfig, out: str | Path, vae_run: str | Path | None, decoder: str | Path,
                       rt: Runtime, seed: int = 0) -> Callable:
    """on_step(step, model, ema) for train-dit: every cfg.sample_every steps, OUT/samples/step_XXXXXXX.png
    with one image of each of the first 8 classes (EMA weights when there are some). The VAE and decoder
    are loaded (and checked against cfg) now, so a mismatch fails before training starts."""
    out = Path(out)
    vae, dec, identity = _decoding_parts(cfg, vae_run, decoder, rt.device, "this DiT preset", _on_features(cfg))
    labels = list(range(min(8, cfg.model.num_classes)))
    cache: dict = {}

    def on_step(step: int, model: nn.Module, ema: nn.Module | None) -> Path | None:
        if not cfg.sample_every or step % cfg.sample_every:
            return None
        if cfg.normalize and "stats" not in cache:  # written by train-dit before its first step
            grid = tuple(cfg.model.grid) if cfg.model.grid else None
            cache["stats"] = load_stats(out / STATS_FILE, grid).to(rt.device)
        net = ema if ema is not None else model
        was = net.training
        net.eval()  # label dropout off
        try:
            pipe = Pipeline(cfg, net, dec, vae, cache.get("stats"), identity)
            images = generate(pipe, labels, labels, seed, cfg.flow, len(labels), rt)
        finally:
            net.train(was)
        captions = [class_label(c, [], cfg.model.num_classes) for c in labels]
        return save_grid(images, out / "samples" / f"step_{step:07d}.png", nrow=len(labels), labels=captions)

    return on_step

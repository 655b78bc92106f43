"""The sampling pipeline, from latents to pictures: loading a DiT with its decoders, and `generate`.

One decode path serves FlatDINO and the RAE baseline:

    DiT sample x (B, N, d) --[stats: x*std+mean]--> --[VAE decoder]--> features (B, P, C)
        --pixel decoder--> (B, 3, S, S) --clip [0, 1], x255, ROUND--> uint8 (B, S, S, 3)

FlatDINO: N x d = 32 x 128 raw VAE means (no stats), turned into 256 x 768 features by the VAE decoder.
RAE mode (a DiT with model.grid): N x d = 256 x 768 normalised features, de-normalised with
RUN/stats.pt, no VAE. Either way the pixel decoder consumes raw (LN-without-affine) DINOv2 features.

Noise: image i of a sample set gets eps_i ~ N(0, I) from its own generator seeded by (seed, i) (the sde
sampler draws its per-step noise from the same generator, after eps_i). On
the CPU every network forward then runs on a fixed CPU_CHUNK images (see `generate`), so one seed
gives bit-identical images whatever the batch size, the resume point or the image's place in its
batch; other devices give the same images up to float rounding.

Speed (bench/sample.py): the guided and unguided halves share one DiT forward (flow.guided_velocity);
each image goes through the decoders once, at the sampler batch; `--compile` compiles the DiT once per
pipeline (sampling_dit). Sample sets on disk: sample.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from flatdino_cli.checkpoint import weights_file
from flatdino_cli.config import DiTStageConfig
from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig, make_velocity_fn, sample
from flatdino_cli.models.pixel_decoder import check_features, load_decoder
from flatdino_cli.models.stats import STATS_FILE, load_stats
from flatdino_cli.interop.rae import RAE_STATS_FILES, rae_checkpoint, read_rae_dit
from flatdino_cli.runs import decoder_identity, file_identity, load_run, run_inputs, store_manifest
from flatdino_cli.runtime import CPU, Runtime
from flatdino_cli.utils import sha256_file
from flatdino_cli.viz import to_uint8

__all__ = ["Pipeline", "load_pipeline", "generate", "sample_chunks", "sampler_batch", "CPU_CHUNK", "image_seed", "image_noise",
           "image_generators", "sampling_flow", "parse_interval", "parse_schedule", "decoding_parts",
           "trained_on_features"]

# Images per network forward on the CPU, whatever --batch-size says. The DiT's per-image
# conditioning (time embedder, adaLN projections) runs GEMMs with one row per image, and MKL rounds a
# row differently with the number of rows (other kernels below 4 rows, row splits across threads), so
# image i differed in the last bits between --batch-size 1 and 8, now and then by a grey level. With
# one fixed shape an image's numbers depend neither on its batch nor on its place in it (checked at
# 1 and 2 threads, with and without DDT head, Euler/Heun, CFG). 8 rows stay clear of the few-row
# kernels and keep CPU GEMMs efficient; on CUDA, speed matters more and the user's batch is used.
CPU_CHUNK = 8


# ============================================================================ the pipeline
@dataclass
class Pipeline:
    """A DiT with what turns its samples into pixels (see the module docstring)."""

    cfg: DiTStageConfig
    dit: nn.Module
    decoder: nn.Module | None  # PixelDecoder (None: features only, e.g. for evaluate)
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
    def features(self, x: torch.Tensor, rt: Runtime = CPU) -> torch.Tensor:
        """DiT samples (B, N, d) -> encoder features (B, P, C) float32: de-normalised (RAE), VAE-decoded."""
        x = x.float()
        if self.stats is not None:
            x = self.stats.denormalize(x)
        with rt.autocast():
            feats = self.vae.decode(x) if self.vae is not None else x  # (B, P, C)
        return feats.float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor, rt: Runtime = CPU) -> np.ndarray:
        """DiT samples (B, N, d) -> uint8 images (B, S, S, 3)."""
        feats = self.features(x, rt)
        with rt.autocast():
            pixels = self.decoder(feats)  # (B, 3, S, S)
        return to_uint8(pixels)


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


# ============================================================================ generation
def image_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for image `index` of a run seeded `seed` (SeedSequence mixing: no two
    (seed, index) pairs share a stream the way seed + index would)."""
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded image_seed(seed, i): its first draw is the image's eps."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int],
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(B, *shape) float32 CPU noise, row b drawn from its own generator (image_generators; advanced)."""
    gens = generators if generators is not None else image_generators(seed, indices)
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def sampling_flow(flow: FlowConfig, cfg_scale: float | None = None, steps: int | None = None,
                  sampler: str | None = None, interval: tuple[float, float] | None = None,
                  grid: str | None = None, schedule: tuple[tuple[float, float, float], ...] | None = None,
                  shift: float | None = None) -> FlowConfig:
    """The DiT config's flow section with the command line's overrides (validated: bad values are
    one-line errors). A scale or interval given on the command line replaces the config's cfg_schedule;
    a schedule given there replaces both; sampler sde samples on our grid unless a grid is given."""
    changes = {k: v for k, v in (("cfg_scale", cfg_scale), ("steps", steps), ("sampler", sampler),
                                 ("cfg_interval", interval), ("grid", grid), ("cfg_schedule", schedule),
                                 ("shift", shift))
               if v is not None}
    if schedule is None and (cfg_scale is not None or interval is not None):
        changes["cfg_schedule"] = ()
    if sampler == "sde" and grid is None:  # RAE's grid is an ODE grid (RAE checkpoints default to it)
        changes["grid"] = "ours"
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


def parse_schedule(text: str | None) -> tuple[tuple[float, float, float], ...] | None:
    """'0-0.1:0.9,0.1-0.3:1.5,0.3-1:2.5' -> ((0, 0.1, 0.9), ...): weight w on lo <= t < hi (our time)."""
    if text is None:
        return None
    try:
        pieces = []
        for part in text.split(","):
            span, w = part.split(":")
            lo, hi = span.split("-")
            pieces.append((float(lo), float(hi), float(w)))
    except ValueError:
        raise UserError(f"--cfg-schedule {text}: expected LO-HI:W,..., e.g. --cfg-schedule 0-0.1:0.9,0.1-0.3:1.5,"
                        "0.3-1:2.5") from None
    return tuple(pieces)


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
def sample_chunks(pipe: Pipeline, labels: Sequence[int], indices: Sequence[int], seed: int,
                  flow: FlowConfig | None = None, batch_size: int = 16, rt: Runtime = CPU, exact: bool = True):
    """Yield (DiT samples (B, N, d) on rt.device, k): image j < k of the chunk is class labels[.] from the
    noise of image indices[.], in order. On the CPU every chunk has CPU_CHUNK rows, the last one padded
    with copies of its last image (drop rows >= k; bit-identical images at any batch size, see
    CPU_CHUNK); elsewhere, or with exact=False (statistics over many images, where the last bits do
    not matter but CPU_CHUNK's many small forwards do), batch_size rows, unpadded. The one sampling
    loop of generate and evaluate."""
    flow = flow or pipe.cfg.flow
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} indices")
    fixed = exact and rt.device.type == "cpu"
    chunk = CPU_CHUNK if fixed else max(1, batch_size)

    def run(net):  # a network as the sampler calls it: under the runtime's autocast, fp32 out
        def forward(x, t, y_):
            with rt.autocast():
                return net(x, t, y_).float()
        return forward

    main = run(sampling_dit(pipe, rt))
    guide = run(pipe.guide) if pipe.guide is not None else None
    for lo in range(0, len(labels), chunk):
        idx, lab = list(indices[lo: lo + chunk]), list(labels[lo: lo + chunk])
        k = len(idx)
        if fixed:  # pad to the fixed shape; the copies are dropped after decoding
            idx, lab = idx + idx[-1:] * (chunk - k), lab + lab[-1:] * (chunk - k)
        gens = image_generators(seed, idx)
        noise = image_noise(seed, idx, pipe.latent_shape, gens).to(rt.device)  # (B, N, d)
        y = torch.tensor(lab, dtype=torch.long, device=rt.device)
        velocity = make_velocity_fn(main, y, flow, pipe.cfg.model.num_classes, guide)

        def step_noise(i: int, idx=idx, gens=gens) -> torch.Tensor:  # the sde sampler's draws, per image
            return image_noise(seed, idx, pipe.latent_shape, gens)

        yield sample(velocity, noise, flow.steps, flow.shift, flow.sampler, flow.grid, flow.sde_diffusion,
                     flow.sde_last_step, step_noise), k


@torch.no_grad()
def generate(pipe: Pipeline, labels: Sequence[int], indices: Sequence[int], seed: int,
             flow: FlowConfig | None = None, batch_size: int = 16, rt: Runtime = CPU) -> np.ndarray:
    """uint8 images (len(labels), S, S, 3): image k is class labels[k] from the noise of image indices[k]
    (sample_chunks), each chunk decoded at once."""
    out = [pipe.decode(x, rt)[:k] for x, k in sample_chunks(pipe, labels, indices, seed, flow, batch_size, rt)]
    S = pipe.image_size
    return np.concatenate(out) if out else np.zeros((0, S, S, 3), np.uint8)

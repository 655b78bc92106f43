"""Configs: one frozen dataclass per stage, each field checked where it is made.

Defaults live only in the dataclasses below; a bad value is a one-line UserError naming its key.
Reading and writing them (YAML presets, `--set a.b=value` overrides, a run's config.yaml): config_yaml.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, dataclass_transform

from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig
from flatdino_cli.utils import grid_side


# ----------------------------------------------------------------------------- shared training loop
@dataclass(frozen=True)
class TrainConfig:
    """Settings of the one training loop (train.py) shared by train-vae, train-dit, train-decoder."""

    epochs: float = 1.0  # passes over the training set; max_steps (if set) caps the run
    max_steps: int | None = None
    batch_size: int = 64  # GLOBAL batch per optimizer step (all processes, all micro-batches)
    micro_batch_size: int | None = None  # per process per forward; None: batch_size / world size
    lr: float = 1e-4
    schedule: str = "constant"  # constant | wsd (warmup-stable-decay) | cosine (warmup then cosine)
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    decay_epochs: float = 0.0  # wsd: length of the final decay phase
    decay_until_epoch: float | None = None  # wsd: the epoch where the decay reaches final_lr; None: the run's end
    decay_shape: str = "linear"  # wsd decay: linear | cosine
    final_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_2d_only: bool = True  # weight decay only on 2-D weight matrices (not biases, norms, token/position tables)
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    ema: float = 0.0  # EMA decay; 0 disables
    val_every_epochs: int = 1
    ckpt_every_steps: int = 500  # also at every epoch end and at the end of the run
    keep_every_steps: int = 0  # also keep checkpoints/step-NNNNNNN every N steps (0: never; `flatdino eval` reads them)
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    log_to: tuple[str, ...] = ()  # experiment trackers beside metrics.jsonl: tensorboard, wandb (track.py)
    keep_old_runs: int = 1  # --no-resume moves the old run aside to RUN.old-<time>; keep this many

    def __post_init__(self):
        _check(self.schedule in ("constant", "wsd", "cosine"), "train.schedule", "constant, wsd or cosine")
        _check(self.decay_shape in ("linear", "cosine"), "train.decay_shape", "linear or cosine")
        _check(self.batch_size >= 1, "train.batch_size", "a positive integer")
        _check(self.epochs > 0 or self.max_steps, "train.epochs", "positive (or set train.max_steps)")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size", "positive")
        _check(0.0 <= self.ema < 1.0, "train.ema", "in [0, 1)")
        _positive(self, "train", "ckpt_every_steps", "log_every", "val_every_epochs", "eps")
        # lr 0 is allowed: it freezes the weights (a fine-tuning check, a data-pipeline dry run)
        _non_negative(self, "train", "keep_every_steps", "lr", "epochs", "warmup_epochs", "warmup_start_lr", "decay_epochs", "final_lr",
                      "weight_decay", "grad_clip", "seed", "num_workers", "keep_old_runs")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "a positive integer (or null)")
        _check(self.decay_until_epoch is None or self.decay_until_epoch >= self.decay_epochs,
               "train.decay_until_epoch", "null or >= train.decay_epochs (the decay starts at their difference)")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "train.betas", "two values in [0, 1)")


STAGES: dict[str, type] = {}  # a preset's `stage:` -> its config class, filled as the classes are declared


@dataclass_transform()
class StageConfig:
    """Base of the three training stages' configs (VAE, DiT, decoder): each subclass is made a frozen
    dataclass and registered in STAGES under its first field's default, `stage` (what a preset's and a
    run's `stage:` key names), so declaring the class is all a new stage needs. The fields' order is
    each subclass's own (config.yaml is written in it)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True)(cls)
        STAGES[cls.stage] = cls


# ----------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class ExtractConfig:
    """Images -> frozen-encoder features (`flatdino extract`)."""

    encoder: str = "dinov2-b-reg4"  # dinov2-b-reg4 | tiny (random weights, for testing)
    encoder_weights: str | None = None
    # adm: the ADM centre crop resized to the encoder input (the generator and VAE pipelines) | whole: the
    # authors' evaluation transform, the whole image resized to crop_size (no crop), then bilinear to the
    # encoder input | knn: the same, encoded at crop_size itself (their k-NN: 256 px, 324 DINOv2 patches)
    preprocess: str = "adm"
    crop_size: int | None = None  # ADM crop / whole-image side; None: 256 for DINOv2-B, the image size for tiny
    # adm: resize to the encoder input, bicubic (generator) | bilinear (VAE eval); whole, knn: area | bilinear
    # (cv2's); None: bicubic for adm, area otherwise
    interp: str | None = None
    dtype: str = "float16"  # stored dtype: float16 | float32
    batch_size: int = 64
    workers: int = 0
    val_split: int = 0  # images held out into <OUT>/val (deterministic)
    mirror: bool = False  # also encode each crop's mirror image (a second view per row, for train-dit)
    strict: bool = False  # fail on the first unreadable image instead of skipping it
    compile: bool = False
    tf32: bool = False

    def __post_init__(self):
        _check(self.preprocess in ("adm", "whole", "knn"), "preprocess", "adm, whole or knn")
        whole = self.preprocess != "adm"
        object.__setattr__(self, "interp", self.interp or ("area" if whole else "bicubic"))
        _check(self.interp in (("area", "bilinear") if whole else ("bicubic", "bilinear")), "interp",
               f"area or bilinear with --preprocess {self.preprocess}" if whole else "bicubic or bilinear")
        _check(self.dtype in ("float16", "float32"), "dtype", "float16 or float32")
        _positive(self, "", "batch_size")
        _non_negative(self, "", "workers", "val_split")
        _check(self.crop_size is None or self.crop_size >= 1, "crop_size", "a positive integer")


# ----------------------------------------------------------------------------- laminator (VAE)
@dataclass(frozen=True)
class VAEModelConfig:
    """FlatDINO beta-VAE: T learned query tokens summarise the patch features (REFERENCE.md).

    kind "flat" is FlatDINO's 1-D laminator; "fae" is the per-patch one-attention-layer FAE.
    feature_dim/num_patches are set from the feature store at train time.
    """

    kind: str = "flat"
    tokens: int = 32
    latent_dim: int = 128
    feature_dim: int = 768
    num_patches: int = 256
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 1024
    dec_depth: int = 24
    dec_heads: int = 16
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    # g > 1: each g x g block of neighbouring patches is one token in and out of the VAE (a g^2 shorter
    # sequence over a fine grid; the features stay whole). 1 (FlatDINO): one token per patch.
    patch_group: int = 1

    def __post_init__(self):
        _check(self.kind in ("flat", "fae"), "model.kind", "flat or fae")
        _positive(self, "model", "tokens", "latent_dim", "feature_dim", "num_patches", "enc_width", "enc_depth",
                  "enc_heads", "dec_width", "dec_depth", "dec_heads", "mlp_ratio", "patch_group")
        if self.patch_group > 1:
            _check(self.kind == "flat", "model.patch_group", "1 for the FAE (it keeps one latent per patch)")
            _check(grid_side(self.num_patches, "model.num_patches") % self.patch_group == 0, "model.patch_group",
                   f"a divisor of the patch grid's side ({math.isqrt(self.num_patches)})")
        _check(self.enc_width % self.enc_heads == 0, "model.enc_width", "divisible by model.enc_heads")
        _check(self.dec_width % self.dec_heads == 0, "model.dec_width", "divisible by model.dec_heads")

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(tokens, latent_dim) of one latent; FAE keeps one latent per patch."""
        return (self.num_patches if self.kind == "fae" else self.tokens, self.latent_dim)


@dataclass(frozen=True)
class VAELossConfig:
    beta: float | None = None  # None: 1e-6 * 512 / (T * d)  (REFERENCE.md)
    huber_delta: float = 1.0
    free_bits: float = 0.0
    loss: str = "huber"  # huber | mse (FAE uses L2)

    def __post_init__(self):
        _check(self.loss in ("huber", "mse"), "loss.loss", "huber or mse")
        _positive(self, "loss", "huber_delta")
        _non_negative(self, "loss", "free_bits")
        _check(self.beta is None or (math.isfinite(self.beta) and self.beta >= 0), "loss.beta", "finite and >= 0")


class VAEStageConfig(StageConfig):
    stage: str = "vae"
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_count: int = 10000  # validation rows held out of the store when it has no val split

    def __post_init__(self):
        _non_negative(self, "", "val_count")

    def beta(self) -> float:
        if self.loss.beta is not None:
            return self.loss.beta
        T, d = self.model.latent_shape
        return 1e-6 * 512 / (T * d)


# ----------------------------------------------------------------------------- generator (DiT)
@dataclass(frozen=True)
class DiTModelConfig:
    """LightningDiT over T tokens of width in_dim (grid=None) or a 2-D grid (RAE baseline)."""

    tokens: int = 32
    in_dim: int = 128
    grid: tuple[int, int] | None = None  # (h, w) for the 2-D RAE baseline; tokens = h * w
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_hidden: int = 3072
    num_classes: int = 1000
    class_dropout: float = 0.1
    pos_embed: str = "sincos"  # sincos (fixed, authors' code) | learned (paper text)
    rope: bool = True
    qk_norm: bool = False
    head_width: int = 0  # DiT-DH: width of the wide shallow DDT head; 0 = no head
    head_depth: int = 0
    head_heads: int = 16
    head_mlp_hidden: int = 0
    head_projector: bool = True  # DiT-DH: Linear trunk -> head; False: none (RAE's nn.Identity for equal widths)
    patch: int = 1  # grid mode: p x p grid cells per DiT token (DiT-XL/2 style); RAE and FAE use 1
    # xavier: every Linear Xavier-uniform (LightningDiT, RAE); trunc_normal: the blocks' Linears
    # trunc-normal(0.02), Xavier only for the embedders (the FlatDINO authors' flat DiT)
    init: str = "xavier"

    def __post_init__(self):
        _check(self.pos_embed in ("sincos", "learned"), "model.pos_embed", "sincos or learned")
        _check(self.init in ("xavier", "trunc_normal"), "model.init", "xavier or trunc_normal")
        _positive(self, "model", "tokens", "in_dim", "width", "depth", "heads", "mlp_hidden", "head_heads", "patch")
        _non_negative(self, "model", "head_width", "head_depth", "head_mlp_hidden", "num_classes")  # 0: unconditional
        _check(0.0 <= self.class_dropout < 1.0, "model.class_dropout", "in [0, 1)")
        _check(self.head_width % self.head_heads == 0, "model.head_width", "divisible by model.head_heads")
        _check(self.width % self.heads == 0, "model.width", "divisible by model.heads")
        _check(self.head_projector or self.head_width == self.width, "model.head_projector",
               "true unless model.head_width equals model.width (without it the trunk feeds the head as it is)")
        _check(self.grid is None or self.grid[0] * self.grid[1] == self.tokens, "model.grid",
               "(h, w) with h * w == model.tokens")
        _check(self.patch == 1 or (self.grid is not None and all(g % self.patch == 0 for g in self.grid)),
               "model.patch", "1, or a divisor of both model.grid sides")

    @property
    def seq_grid(self) -> tuple[int, int] | None:
        """The DiT's own token grid: model.grid in patches of model.patch."""
        return None if self.grid is None else (self.grid[0] // self.patch, self.grid[1] // self.patch)

    @property
    def seq_len(self) -> int:
        """Tokens the transformer runs over (model.tokens / patch^2)."""
        return self.tokens // (self.patch * self.patch)


@dataclass(frozen=True)
class EvalConfig:
    """fd_rep during train-dit (evaluate.py): the EMA model's samples against a validation store."""

    every: int = -1  # evaluate every N `unit`s; -1: `count` evaluations per run; 0: never
    unit: str = "steps"  # steps | epochs
    count: int = 20  # evaluations per run when every = -1
    samples: int = 0  # class-balanced samples per evaluation; 0: 2,000 on CUDA, 240 on the CPU
    seed: int = 0  # the samples' noise: the same images at every evaluation
    reference: str | None = None  # validation feature store; None: the training data's FEATURES/val
    batch_size: int = 256
    nocfg: bool = True  # also fd_rep_nocfg (the same noise, unguided): twice the cost

    def __post_init__(self):
        _check(self.unit in ("steps", "epochs"), "eval.unit", "steps or epochs")
        _check(self.every >= -1, "eval.every", "-1 (about eval.count per run), 0 (off) or a positive integer")
        _check(self.samples == 0 or self.samples >= 2, "eval.samples", "0 (the device's default) or at least 2")
        _positive(self, "eval", "count", "batch_size")
        _non_negative(self, "eval", "seed")


class DiTStageConfig(StageConfig):
    stage: str = "dit"
    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    normalize: bool = False  # RAE mode: (x - mean) / sqrt(var + 1e-5) with per-position stats
    sample_every: int = 0  # write a small sample grid every N steps (needs --vae/--decoder)

    def __post_init__(self):
        _non_negative(self, "", "sample_every")


# ----------------------------------------------------------------------------- pixel decoder
@dataclass(frozen=True)
class DecoderModelConfig:
    """RAE's ViT-MAE-style pixel decoder: (B, P, in_dim) features -> (B, 3, S, S) pixels."""

    in_dim: int = 768
    num_patches: int = 256
    patch_size: int = 16
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_hidden: int = 4096
    ln_eps: float = 1e-12

    def __post_init__(self):
        _positive(self, "model", "in_dim", "num_patches", "patch_size", "width", "depth", "heads", "mlp_hidden",
                  "ln_eps")
        _check(self.width % self.heads == 0, "model.width", "divisible by model.heads")
        grid_side(self.num_patches, "config: model.num_patches")

    @property
    def image_size(self) -> int:
        return grid_side(self.num_patches) * self.patch_size


@dataclass(frozen=True)
class DecoderLossConfig:
    l1: float = 1.0
    lpips: float = 1.0  # 0 (or --no-lpips) trains without LPIPS
    gan: float = 0.75
    disc_start_epoch: float = 6.0  # discriminator updates begin
    gan_start_epoch: float = 8.0  # generator GAN term begins
    max_adaptive_weight: float = 1e4
    noise_tau: float = 0.8  # feature noise sigma ~ noise_tau * U(0,1), training only
    noise_fixed: bool = False  # sigma = noise_tau exactly (FAE's Gaussian embedding decoder)

    def __post_init__(self):
        _non_negative(self, "loss", "l1", "lpips", "gan", "disc_start_epoch", "gan_start_epoch",
                      "max_adaptive_weight", "noise_tau")


class DecoderStageConfig(StageConfig):
    stage: str = "decoder"
    model: DecoderModelConfig = field(default_factory=DecoderModelConfig)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- sampling (`flatdino sample`)
# Where a command's config lives: here for the commands that make the pipeline's artefacts (runs,
# stores, sample sets); a measurement's config (analysis/*.py, reconstruct.py, evaluate.py's ScoreConfig
# for eval and sweep) beside the code that runs it, as are a stage's input files (stages/decoder.py).
@dataclass(frozen=True)
class SampleConfig:
    """What `flatdino sample` makes (sample.run_sample). The sampler fields (cfg_scale ... shift) are
    overrides of the DiT config's flow section, applied by pipeline/options.py's sampling_flow; None
    keeps the run's."""

    dit: str | Path
    vae: str | Path | None  # the VAE the DiT's latents came from; None for rae-* runs and RAE checkpoints
    decoder: str | Path
    stats: str | Path | None = None  # RAE's stat.pt for a normalising DiT (None: beside it)
    guide: str | Path | None = None  # AutoGuidance: a weaker DiT; guide_scale replaces cfg_scale
    ema: bool = True
    classes: tuple[str, ...] = ()  # class ids or names
    all_classes: bool = False
    n: int | None = None  # images in total
    per_class: int | None = None
    cfg_scale: float | None = None
    guide_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None
    paper_sampler: bool = False  # the paper's sampler and steps (flow.paper_*) instead of the measured default
    interval: tuple[float, float] | None = None  # guidance interval in t (t = 1 is data)
    grid: str | None = None
    schedule: tuple[tuple[float, float, float], ...] | None = None  # (lo, hi, weight) per time range
    shift: float | None = None
    seed: int = 0
    out: str | Path | None = None  # None: DIT/samples/<settings>
    batch_size: int = 16
    shard_size: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")
        guided = self.guide is not None
        if not guided and self.guide_scale is not None or guided and self.guide_scale is None and self.schedule is None:
            raise UserError("sample: AutoGuidance needs both --guide RUN_OR_FILE and --guide-scale W (or --cfg-schedule)")
        if guided and self.cfg_scale is not None:
            raise UserError("sample: --cfg and --guide-scale are two guidance methods; pass one")
        if self.schedule is not None and (self.weight is not None or self.interval is not None):
            raise UserError("sample: --cfg-schedule sets the weight per time range; pass it without --cfg, "
                            "--guide-scale and --interval")

    @property
    def weight(self) -> float | None:
        """The guidance weight asked for: guide_scale with a guide, cfg_scale without (None: the run's)."""
        return self.guide_scale if self.guide is not None else self.cfg_scale


# ----------------------------------------------------------------------------- the checks of __post_init__
def _check(ok: Any, key: str, want: str) -> None:
    if not ok:
        raise UserError(f"config: {key} must be {want}")


def _in_range(obj: Any, section: str, names: tuple[str, ...], ok: Callable[[float], bool], want: str) -> None:
    """Range-check numeric fields; NaN and infinities are always refused."""
    for name in names:
        v = getattr(obj, name)
        if not (math.isfinite(v) and ok(v)):
            raise UserError(f"config: {section + '.' if section else ''}{name} must be {want}, got {v!r}")


def _positive(obj: Any, section: str, *names: str) -> None:
    _in_range(obj, section, names, lambda v: v > 0, "finite and > 0")


def _non_negative(obj: Any, section: str, *names: str) -> None:
    _in_range(obj, section, names, lambda v: v >= 0, "finite and >= 0")

"""`flatdino compare`: the paper's claim at equal compute, in one command.

FlatDINO's generator (a DiT on flat latent tokens), the RAE baseline (the same DiT on the encoder's
whole feature grid) and FAE's (on per-patch latents, 2x2 cells per token) train on the same images
for the same budget of training FLOPs, each evaluated with fd_rep (evaluate.py) against the same
validation features at equal fractions of the budget. Written: OUT/compare.json, OUT/compare.md (FLOPs
to reach a quality level, quality at equal FLOPs, sampling speed) and OUT/compare.png (fd_rep against
training FLOPs, one curve per method).

Toy mode (no --features): the quickstart's toy images through the tiny encoder at patch 4, a grid of
12x12 patches against 16 flat tokens (as DINOv2-B's 256 patches against FlatDINO's 32), and tiny
laminators trained here. Given --features, --vae and --fae with the ImageNet presets, it is the GPU
experiment (docs/REPRODUCE.md). FLOPs are counted as `flatdino plot --x flops` counts them
(analysis/flops.py): 3 x the DiT forward plus the laminator's encoder per training image.

Each stage leaves a marker (a rerun skips it) and every training run resumes from its checkpoint, so a
killed comparison reruns where it stopped; OUT/settings.json refuses a rerun with other settings.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.ticker import FuncFormatter
from tqdm import tqdm

from flatdino_cli.analysis.curves import flop_unit
from flatdino_cli.analysis.flops import dit_forward_flops, dit_step_flops
from flatdino_cli.config import ExtractConfig
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.data import FeatureDataset, Store
from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import FD_REP, FD_REP_NOCFG, evaluate_dit, evaluation_parts
from flatdino_cli.extract import extract_features, extract_latents
from flatdino_cli.flow import network_evaluations
from flatdino_cli.data.shapes import with_store_shape
from flatdino_cli.rundir import read_metrics, run_config
from flatdino_cli.runtime import Runtime
from flatdino_cli.stages.dit import train_dit
from flatdino_cli.stages.vae import train_vae
from flatdino_cli.quickstart import QuickstartPlan
from flatdino_cli.toydata import write_toy_dataset
from flatdino_cli.utils import atomic_write_json, atomic_write_text, ensure_dir, read_json, run_once
from flatdino_cli.viz import curve, new_figure, save_figure, style_axes

METHODS = ("flatdino", "rae", "fae")
LABELS = {"flatdino": "FlatDINO (flat tokens)", "rae": "RAE (feature grid)", "fae": "FAE (per-patch latents)"}
TOY_PRESETS = {"flatdino": "tiny-dit", "rae": "tiny-rae-dit", "fae": "tiny-fae-dit"}
IMAGENET_PRESETS = {"flatdino": "xl-32x128", "rae": "rae-xl-256x768", "fae": "fae-xl-16x16x32"}
TOY_LAMINATORS = {"flatdino": "tiny-vae", "fae": "tiny-fae"}
# the toy laminators of the README's comparison: 6 epochs (on 144 patches an epoch costs 4x one on 36),
# and FlatDINO's VAE at depth 2, tiny-vae's architecture before the quickstart's moved to depth 1
TOY_LAMINATOR_SETS = {"flatdino": ("model.enc_depth=2", "model.dec_depth=2", "train.epochs=6", "train.decay_epochs=2.5",
                                   "train.val_every_epochs=2"),
                      "fae": ("train.epochs=6", "train.decay_epochs=2.5")}
TOY_ENCODER = "tiny-p4"
TOY_BUDGET = 8e12  # training FLOPs per generator: 155 steps of the RAE grid, 546 of FlatDINO's at batch 128
TOY_EVALS, TOY_EVAL_SAMPLES = 5, 192
# the toy generators: one global batch for the three (tiny-dit's is 64, the grid presets' 128); evaluated
# unguided (at w = 6 a young model's fd_rep rises while its samples improve: README) with ab2 at 20 steps,
# which matched Euler-50 on the quickstart DiT (README's solver table) at 40% of its cost
TOY_DIT_SETS = ("flow.cfg_scale=1", "flow.sampler=ab2", "flow.steps=20", "eval.nocfg=false", "train.batch_size=128")
SETTINGS = "settings.json"


@dataclass(frozen=True)
class CompareConfig:
    budget: float = 0.0  # training FLOPs per generator; 0: TOY_BUDGET (toy mode only)
    methods: tuple[str, ...] = METHODS
    presets: tuple[tuple[str, str], ...] = ()  # (method, preset) pairs; the rest: toy or ImageNet defaults
    features: str | None = None  # a feature store with a val/ split; None: toy data made here
    vae: str | None = None  # FlatDINO's VAE run (toy mode: trained here)
    fae: str | None = None  # FAE's laminator run (toy mode: trained here)
    evals: int = 0  # evaluations per generator, at equal fractions of the budget; 0: 5 (toy), 20 (eval.count's)
    eval_samples: int = 0  # 0: 192 (toy), else eval.samples' device default (2,000 on CUDA)
    sets: tuple[str, ...] = ()  # "key=value" for every generator, "dit-rae:key=value" for one run (sets_for)
    per_class: int = 250  # toy images per class
    seed: int = 0

    @property
    def toy(self) -> bool:
        return self.features is None

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(f"--methods {','.join(self.methods)}: choose from {', '.join(METHODS)}")
        targets = ("dit", *(f"dit-{m}" for m in METHODS), "vae-flatdino", "vae-fae")
        for s in self.sets:
            target, sep, _ = s.partition(":")
            if sep and "=" not in target and target not in targets:
                raise UserError(f"--set {s}: unknown target {target!r}; use {', '.join(targets)} (or no prefix: "
                                "every generator)")
        for m, _ in self.presets:
            if m not in METHODS:
                raise UserError(f"--preset {m}=...: unknown method {m!r}; use {', '.join(METHODS)}")
        if not self.toy:
            if self.budget <= 0:
                raise UserError("--budget: give the training FLOPs per generator with --features (e.g. 2e20)")
            for m, run, option in (("flatdino", self.vae, "--vae"), ("fae", self.fae, "--fae")):
                if m in self.methods and run is None:
                    raise UserError(f"{option}: the {m} laminator run is needed with --features "
                                    f"(or leave {m} out with --methods)")
        elif self.vae or self.fae:
            raise UserError("--vae/--fae need --features: toy mode trains its own laminators")
        if self.budget < 0 or self.evals < 0 or self.eval_samples < 0 or self.eval_samples == 1:
            raise UserError("--budget, --evals, --eval-samples: positive (at least 2 samples), or 0 for the default")
        object.__setattr__(self, "budget", self.budget or TOY_BUDGET)  # 0 only reaches here in toy mode
        object.__setattr__(self, "evals", self.evals or (TOY_EVALS if self.toy else 20))
        object.__setattr__(self, "eval_samples", self.eval_samples or (TOY_EVAL_SAMPLES if self.toy else 0))

    def preset(self, method: str) -> str:
        return dict(self.presets).get(method) or (TOY_PRESETS if self.toy else IMAGENET_PRESETS)[method]

    def sets_for(self, run: str) -> list[str]:
        """The --set values of the run folder `run` (dit-rae, vae-fae, ...): "TARGET:key=value" goes to
        TARGET, "dit:key=value" and an unprefixed "key=value" to every generator."""
        picked = []
        for s in self.sets:
            target, sep, rest = s.partition(":")
            if not sep or "=" in target:
                target, rest = "dit", s
            if target == run or (target == "dit" and run.startswith("dit-")):
                picked.append(rest)
        return picked

    def dit_sets(self, method: str) -> list[str]:
        return (list(TOY_DIT_SETS) if self.toy else []) + self.sets_for(f"dit-{method}")


def _stage(marks: Path, name: str, fn) -> dict:
    return run_once(marks, name, fn, prefix="compare: ")


def planned_dit(cfg: CompareConfig, method: str, data: Path, vae_run: Path | None, reference: Path):
    """The generator's config for the budget: the preset's recipe with its schedule scaled to the number
    of steps the budget buys (warmup and decay keep their share of the run); (config, FLOPs per step)."""
    sets = cfg.dit_sets(method)
    store = Store.open(data)
    base = with_store_shape(load_preset(cfg.preset(method), sets), store, data)
    vae_model = run_config(vae_run, "vae").model if vae_run is not None else None
    per_step = dit_step_flops(base, vae_model)
    steps = round(cfg.budget / per_step)
    if steps < cfg.evals:
        raise UserError(f"--budget {cfg.budget:.3g}: buys the {method} generator {steps} steps "
                        f"({per_step:.3g} FLOPs each), fewer than --evals {cfg.evals}; raise it")
    spe = len(FeatureDataset(store)) // base.train.batch_size
    if spe < 1:
        raise UserError(f"{data}: fewer rows than one batch of {base.train.batch_size}")
    epochs = steps / spe
    share = epochs / base.train.epochs
    t = base.train
    recipe = [f"train.epochs={epochs}", f"train.max_steps={steps}", f"train.warmup_epochs={t.warmup_epochs * share}",
              f"train.decay_epochs={t.decay_epochs * share}", "eval.every=-1", f"eval.count={cfg.evals}",
              f"eval.samples={cfg.eval_samples}", f"eval.seed={cfg.seed}", f"eval.reference={reference}",
              f"train.seed={cfg.seed}"]
    if t.decay_until_epoch is not None:
        recipe.append(f"train.decay_until_epoch={t.decay_until_epoch * share}")
    return with_store_shape(load_preset(cfg.preset(method), sets + recipe), store, data), per_step


def _check_settings(out: Path, cfg: CompareConfig) -> None:
    path = out / SETTINGS
    mine = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    mine["presets"] = {m: cfg.preset(m) for m in cfg.methods}
    if path.is_file():
        have = read_json(path)
        diff = sorted(k for k in {**have, **mine} if have.get(k) != mine.get(k))
        if diff:
            raise UserError(f"{path}: this folder compared with other {', '.join(diff)}; pass another --out "
                            "(or delete it to start over)")
    else:
        atomic_write_json(path, mine)


def run_compare(out: str | Path, cfg: CompareConfig, rt: Runtime) -> dict:
    out = ensure_dir(Path(out))
    _check_settings(out, cfg)
    marks = out / ".stages"
    features = Path(cfg.features) if cfg.features else out / "features"
    laminators = {"flatdino": Path(cfg.vae) if cfg.vae else out / "vae-flatdino",
                  "fae": Path(cfg.fae) if cfg.fae else out / "vae-fae"}
    if cfg.toy:
        toy = QuickstartPlan(per_class=cfg.per_class, seed=cfg.seed)  # the quickstart's images and held-out split
        n_val = toy.held_out()
        _stage(marks, "toy-data", lambda: {"count": write_toy_dataset(out / "toy", toy.per_class, toy.image_size,
                                                                       toy.seed)["count"]})
        _stage(marks, "extract", lambda: extract_features(
            out / "toy", features, ExtractConfig(encoder=TOY_ENCODER, val_split=n_val, batch_size=128), rt))
        for m in ("flatdino", "fae"):
            if m in cfg.methods:
                _stage(marks, f"train-vae-{m}", lambda m=m: {"step": train_vae(
                    load_preset(TOY_LAMINATORS[m], [*TOY_LAMINATOR_SETS[m], f"train.seed={cfg.seed}",
                                                     *cfg.sets_for(f"vae-{m}")]), laminators[m], rt,
                    features=features)["step"]})
    reference = features / "val"
    if not (reference / "manifest.json").is_file():
        raise UserError(f"--features {features}: has no val/ split to score against (extract with --val-split N)")
    data = {"rae": features}
    for m in ("flatdino", "fae"):
        if m in cfg.methods:
            data[m] = out / f"latents-{m}"
            _stage(marks, f"latents-{m}", lambda m=m: extract_latents(features, laminators[m], data[m], rt))
    results = {}
    for m in cfg.methods:
        vae_run = laminators.get(m)
        dit_cfg, per_step = planned_dit(cfg, m, data[m], vae_run, reference)
        run_dir = out / f"dit-{m}"
        _stage(marks, f"train-dit-{m}", lambda: {"step": train_dit(dit_cfg, run_dir, rt, data[m])["step"]})
        speed = _stage(marks, f"speed-{m}", lambda: sampling_speed(run_dir, reference, cfg, rt))
        results[m] = {**method_result(m, run_dir, dit_cfg, per_step, speed), "preset": cfg.preset(m)}
    report = {"budget": cfg.budget, "toy": cfg.toy, "methods": results, **quality_level(results)}
    if rt.is_main:
        atomic_write_json(out / "compare.json", report)
        report["table"] = str(write_table(out / "compare.md", report))
        report["figure"] = str(plot_compare(out / "compare.png", report))
    return report


def sampling_speed(run_dir: Path, reference: Path, cfg: CompareConfig, rt: Runtime) -> dict:
    """Samples per second into the encoder's feature space (sampler + laminator decoder, no pixel
    decoder) of the final EMA model, timed over the evaluation's samples, one method at a time."""
    pipe, ref, n = evaluation_parts(run_dir, reference, cfg.eval_samples, rt=rt)
    t0 = time.perf_counter()
    scored = evaluate_dit(pipe, ref, n, cfg.seed, None, 256, rt, nocfg=False)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": n / seconds, "samples": n, "nfe": network_evaluations(pipe.cfg.flow),
            "final_fd_rep": scored[FD_REP]}


def method_result(method: str, run_dir: Path, dit_cfg, per_step: float, speed: dict) -> dict:
    rows = [r for r in read_metrics(run_dir) if FD_REP in r]
    evals = [{"step": r["step"], "flops": r["step"] * per_step, FD_REP: r[FD_REP],
              **({FD_REP_NOCFG: r[FD_REP_NOCFG]} if FD_REP_NOCFG in r else {})} for r in rows]
    return {"label": LABELS[method], "run": str(run_dir), "steps": dit_cfg.train.max_steps, "batch_size": dit_cfg.train.batch_size, "tokens": dit_cfg.model.seq_len,
            "flops_per_step": per_step, "sample_dit_flops": dit_forward_flops(dit_cfg) * speed["nfe"], "evals": evals,
            "final": evals[-1][FD_REP] if evals else math.nan,
            "best": min((e[FD_REP] for e in evals), default=math.nan), **speed}


def quality_level(results: dict) -> dict:
    """The level every method reaches (the worst method's best fd_rep) and the training FLOPs each took
    to reach it first (at an evaluation, so a bound to within one evaluation period)."""
    level = max(r["best"] for r in results.values())
    for r in results.values():
        r["flops_to_level"] = next((e["flops"] for e in r["evals"] if e[FD_REP] <= level), None)
    return {"level": level}


def write_table(path: Path, report: dict) -> Path:
    res = report["methods"]
    ref = res.get("flatdino")
    lines = [f"Training budget {report['budget']:.3g} FLOPs per generator; quality level {report['level']:.3g} "
             "(the worst method's best fd_rep).", "",
             "| method | DiT tokens | steps | FLOPs / step | fd_rep at the budget | best fd_rep | FLOPs to the level | "
             "DiT FLOPs / sample (NFE) | samples/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in res.items():
        to = r["flops_to_level"]
        rel = f" ({to / ref['flops_to_level']:.2g}x)" if ref and to and ref["flops_to_level"] and m != "flatdino" else ""
        lines.append(f"| {r['label']} | {r['tokens']} | {r['steps']} | {r['flops_per_step']:.3g} | {r['final']:.4g} | "
                     f"{r['best']:.4g} | {f'{to:.3g}' if to else 'not reached'}{rel} | "
                     f"{r['sample_dit_flops']:.3g} ({r['nfe']}) | {r['samples_per_s']:.3g} |")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def plot_compare(path: Path, report: dict) -> Path:
    scale, unit = flop_unit(report["budget"])
    fig = new_figure(4.6, 3.3, dpi=200)
    ax = fig.add_subplot(1, 1, 1)
    for r in report["methods"].values():
        line = curve(ax, [e["flops"] / scale for e in r["evals"]], [e[FD_REP] for e in r["evals"]], label=r["label"])
        nocfg = [e for e in r["evals"] if FD_REP_NOCFG in e]
        if nocfg:
            curve(ax, [e["flops"] / scale for e in nocfg], [e[FD_REP_NOCFG] for e in nocfg], color=line.get_color(),
                  linestyle="--", marker="")
    ax.axhline(report["level"], color="grey", linewidth=0.7, linestyle=":")
    style_axes(ax, f"training FLOPs ({unit})", "fd_rep (lower is better)", logy=True,
               title=f"equal training FLOPs ({report['budget'] / scale:.3g} {unit} per generator)")
    # plain numbers on the log axis, not powers of ten; minor labels at 2 and 5 x 10^k only
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    fig.tight_layout()
    return save_figure(fig, path)


def format_report(report: dict) -> str:
    lines = [f"compare: budget {report['budget']:.3g} training FLOPs per generator"]
    for m, r in report["methods"].items():
        lines.append(f"  {r['label']:24s} {r['steps']:6d} steps  fd_rep {r['final']:.4g} (best {r['best']:.4g})  "
                     f"{r['samples_per_s']:.3g} samples/s")
    lines += [f"  table  {report.get('table')}", f"  figure {report.get('figure')}"]
    tqdm.write("")  # close any bar's line before the summary
    return "\n".join(lines)

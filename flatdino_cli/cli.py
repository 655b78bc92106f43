"""The `flatdino` command line: one thin function per command (parse -> config -> call).

Heavy imports happen inside the commands so that `flatdino --help` is instant.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli.errors import UserError

app = typer.Typer(
    name="flatdino",
    help="FlatDINO: laminate frozen DINOv2 features into 32 tokens, train flow-matching DiTs on them, "
         "decode to pixels.\n\nFirst run: `flatdino quickstart` (toy data, CPU, minutes). "
         "Every command has --help with an example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
presets_app = typer.Typer(help="List presets, or show one resolved (`flatdino presets show xl-32x128`).",
                          invoke_without_command=True, rich_markup_mode=None)
app.add_typer(presets_app, name="presets")


def command(*args, **kwargs):
    """app.command whose UserErrors become one line on stderr and exit code 1 (no traceback)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            try:
                return fn(*a, **k)
            except UserError as e:
                typer.echo(f"flatdino: error: {e}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                typer.echo("flatdino: interrupted; rerun the same command to resume", err=True)
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(inner)

    return wrap


# shared option types -----------------------------------------------------------------------------
Preset = Annotated[str, typer.Option("--preset", "-p", help="Preset name (`flatdino presets`) or a YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config value, dotted and type-checked: --set train.lr=1e-4 (repeatable).")]
Device = Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda, cuda:1.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                                                 help="torch.compile the model (default: on for CUDA, off for CPU).")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume",
                                      help="Resume from the run dir's checkpoint if it has one (default). "
                                           "--no-resume starts over and moves old checkpoints aside.")]
Seed = Annotated[Optional[int], typer.Option(help="Training seed (overrides train.seed).")]


def _overrides(sets: list[str] | None, **cli_values) -> list[str]:
    """--set items plus shortcut options (--epochs, --batch-size, --seed) given on the command line."""
    out = list(sets or [])
    out += [f"{k}={v}" for k, v in cli_values.items() if v is not None]
    return out


def _runtime(device: str, precision: str, compile: Optional[bool]):
    from flatdino_cli.runtime import setup_runtime

    return setup_runtime(device, precision, compile)


# presets -------------------------------------------------------------------------------------------
@presets_app.callback()
def presets_list(ctx: typer.Context):
    """List the presets shipped with flatdino.

    Example: flatdino presets; flatdino presets show vae-32x128 --set model.tokens=64
    """
    if ctx.invoked_subcommand is None:
        from flatdino_cli.config import list_presets, load_preset

        for name in list_presets():
            try:
                stage = load_preset(name).stage
            except UserError as e:
                stage = f"BROKEN: {e}"
            typer.echo(f"{name:24s} {stage}")


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or YAML file.")], sets: SetOpt = None):
    """Print a preset fully resolved (YAML) and the parameter count of the models it builds."""
    try:
        import yaml

        from flatdino_cli.config import load_preset, to_dict
        from flatdino_cli.models import count_parameters

        cfg = load_preset(name, _overrides(sets))
        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        for part, n in count_parameters(cfg).items():
            typer.echo(f"# parameters, {part}: {n:,} ({n / 1e6:.1f}M)")
    except UserError as e:
        typer.echo(f"flatdino: error: {e}", err=True)
        raise typer.Exit(1) from None


# data ----------------------------------------------------------------------------------------------
@command("toy-data")
def toy_data(
    out: Annotated[Path, typer.Argument(help="Output folder (an ImageFolder tree, one folder per class).")],
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 200,
    size: Annotated[int, typer.Option(help="Image side in pixels (the tiny encoder expects 48).")] = 48,
    seed: Annotated[int, typer.Option(help="Generation seed; same seed, same bytes.")] = 0,
):
    """Write the embedded procedural toy dataset (10+ shape x colour classes) as an ImageFolder tree.

    Example: flatdino toy-data runs/toy --per-class 200
    """
    from flatdino_cli.toydata import write_toy_dataset

    summary = write_toy_dataset(out, per_class=per_class, size=size, seed=seed)
    typer.echo(f"toy-data: {summary['count']} images in {summary['classes']} classes -> {out}")


@command()
def extract(
    source: Annotated[Path, typer.Argument(help="Images (ImageFolder tree, flat folder or `path label` list), "
                                                "or with --vae a FEATURE STORE.")],
    out: Annotated[Path, typer.Argument(help="Output store directory.")],
    encoder: Annotated[str, typer.Option(help="dinov2-b-reg4 (the paper's encoder) or tiny (random weights, "
                                              "for tests and the CPU quickstart).")] = "dinov2-b-reg4",
    encoder_weights: Annotated[Optional[Path], typer.Option(
        help="Local DINOv2 weights (.safetensors/.pth, timm or Hugging Face key names) instead of the HF cache.")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="A train-vae run: turn the feature store SOURCE into a "
                                                     "latent store of the posterior mean mu.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per encoder forward.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for decoding images.")] = 0,
    val_split: Annotated[int, typer.Option(help="Hold out N images (deterministic) into OUT/val.")] = 0,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 (default for features) or float32.")] = "",
    interp: Annotated[str, typer.Option(help="Resize to the encoder input: bicubic (generator pipeline) or "
                                             "bilinear (VAE evaluation).")] = "bicubic",
    crop_size: Annotated[Optional[int], typer.Option(help="ADM center-crop size (default 256 for DINOv2-B).")] = None,
    class_index: Annotated[Optional[Path], typer.Option(help="JSON/txt mapping ImageNet synset folders to 0-999.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store that was made differently.")] = False,
    device: Device = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the encoder.")] = False,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 matmuls on CUDA (faster, slightly less exact).")] = False,
):
    """Images -> frozen DINOv2 features (N, 256, 768) in a resumable store; with --vae, features -> latents.

    Killed at any moment and rerun, it resumes without recomputing finished rows and ends
    byte-identical to an uninterrupted run. Unreadable images are skipped, named, and counted in the
    manifest (--strict fails instead).

    Examples:
      flatdino extract imagenet/train stores/in1k --encoder dinov2-b-reg4 --batch-size 256 --workers 8
      flatdino extract runs/toy runs/toy-feats --encoder tiny --val-split 100
      flatdino extract runs/toy-feats runs/toy-latents --vae runs/vae
    """
    from flatdino_cli.config import ExtractConfig
    from flatdino_cli.runtime import setup_runtime

    rt = setup_runtime(device, "fp32", False)
    if vae is not None:
        from flatdino_cli.extract import extract_latents

        summary = extract_latents(source, vae, out, rt, batch_size=batch_size, dtype=dtype or "float32",
                                  overwrite=overwrite)
        typer.echo(f"extract: latents -> {', '.join(summary['stores'])}")
        return
    from flatdino_cli.extract import extract_features

    cfg = ExtractConfig(encoder=encoder, encoder_weights=str(encoder_weights) if encoder_weights else None,
                        crop_size=crop_size, interp=interp, dtype=dtype or "float16", batch_size=batch_size,
                        workers=workers, val_split=val_split, strict=strict, compile=compile, tf32=tf32)
    summary = extract_features(source, out, cfg, rt, overwrite=overwrite, class_index=class_index)
    typer.echo(f"extract: {summary['images']} images -> {', '.join(summary['stores'])} "
               f"({summary['skipped']} unreadable skipped)")


@command("train-vae")
def train_vae(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (created; resumed if it has a checkpoint).")],
    preset: Preset = "vae-32x128",
    features: Annotated[Optional[Path], typer.Option(help="Feature store from `flatdino extract`.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Train on images encoded on the fly (with --encoder), "
                                                        "re-augmented every epoch as in the paper.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder for --images mode.")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for --encoder.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Overrides train.epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch (overrides train.batch_size); "
                                                           "use --set train.micro_batch_size=N to accumulate.")] = None,
    seed: Seed = None,
    sets: SetOpt = None,
    device: Device = "auto",
    precision: Precision = "auto",
    compile: Compile = None,
    resume: Resume = True,
):
    """Train the FlatDINO laminator (beta-VAE) on DINOv2 features.

    beta defaults to 1e-6 * 512 / (T * d); validation logs Huber, KL per token and the mean cosine
    similarity of reconstructed features, and keeps checkpoints/best by validation loss.
    Multi-GPU: torchrun --nproc-per-node 8 -m flatdino_cli.cli train-vae ... (multi-node: add
    torchrun's --nnodes/--node-rank/--rdzv-endpoint flags).

    Example: flatdino train-vae --preset vae-32x128 --features stores/in1k --out runs/vae
    """
    from flatdino_cli.config import load_preset
    from flatdino_cli.stages.vae import train_vae as run

    cfg = load_preset(preset, _overrides(sets, **{"train.epochs": epochs, "train.batch_size": batch_size,
                                                  "train.seed": seed}))
    if cfg.stage != "vae":
        raise UserError(f"--preset {preset}: is a {cfg.stage} preset; train-vae needs a vae-* preset")
    rt = _runtime(device, precision, compile)
    summary = run(cfg, out, rt, features=features, images=images, encoder_name=encoder,
                  encoder_weights=str(encoder_weights) if encoder_weights else None, resume=resume)
    if rt.is_main:
        typer.echo(f"train-vae: {summary['step']} steps, best val loss {summary['best_val']:.4g} -> {out}")


@command("train-dit")
def train_dit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (created; resumed if it has a checkpoint).")],
    latents: Annotated[Path, typer.Option(help="Latent store (`flatdino extract --vae`), or a feature store "
                                               "for the rae-* baseline presets.")],
    preset: Preset = "xl-32x128",
    epochs: Annotated[Optional[float], typer.Option(help="Overrides train.epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch (overrides train.batch_size); "
                                                           "use --set train.micro_batch_size=N to accumulate.")] = None,
    compute_stats: Annotated[bool, typer.Option(
        "--compute-stats", help="(RAE mode) recompute the per-position mean/var of the store into RUN/stats.pt "
                                "(RAE's format); otherwise computed once when missing.")] = False,
    vae: Annotated[Optional[Path], typer.Option(help="VAE run, to write sample grids during training.")] = None,
    decoder: Annotated[Optional[Path], typer.Option(help="Pixel decoder (run dir or RAE model.pt) for sample grids.")] = None,
    seed: Seed = None,
    sets: SetOpt = None,
    device: Device = "auto",
    precision: Precision = "auto",
    compile: Compile = None,
    resume: Resume = True,
):
    """Train the LightningDiT flow-matching generator on latents (the paper's recipe by default).

    AdamW (0.9, 0.95), wd 1e-4, clip 1.0, constant lr 2e-4, EMA 0.9995, global batch 1024 (set
    train.micro_batch_size to accumulate on small GPUs). Logs the loss per t-bucket to metrics.jsonl;
    with --vae and --decoder (and --set sample_every=N) writes a small sample grid every N steps.
    Multi-GPU: torchrun --nproc-per-node 8 -m flatdino_cli.cli train-dit ...

    Example: flatdino train-dit --preset xl-32x128 --latents stores/in1k-latents --out runs/dit-xl
    """
    from flatdino_cli.config import load_preset
    from flatdino_cli.stages.dit import train_dit as run

    cfg = load_preset(preset, _overrides(sets, **{"train.epochs": epochs, "train.batch_size": batch_size,
                                                  "train.seed": seed}))
    if cfg.stage != "dit":
        raise UserError(f"--preset {preset}: is a {cfg.stage} preset; train-dit needs a DiT preset (xl-32x128, ...)")
    rt = _runtime(device, precision, compile)
    on_step = None
    if cfg.sample_every and vae is not None and decoder is not None and rt.is_main:
        from flatdino_cli.sample import training_grid_hook

        on_step = training_grid_hook(cfg, out, vae, decoder, rt)
    summary = run(cfg, out, rt, latents, resume=resume, recompute_stats=compute_stats, on_step=on_step)
    if rt.is_main:
        typer.echo(f"train-dit: {summary['step']} steps -> {out}")


@command()
def flops(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="A DiT preset (default: the paper's "
                                                                          "three tables).")] = None,
    vs: Annotated[Optional[str], typer.Option(help="The DiT preset to compare against.")] = None,
    vae: Annotated[Optional[str], typer.Option(help="VAE preset whose encoder the latent DiT pays for "
                                                    "(default vae-32x128's architecture).")] = None,
    exact: Annotated[bool, typer.Option(help="Add exact encoder costs instead of the paper's rounded ones.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (FLOPs, not GFLOPs).")] = False,
    measure: Annotated[bool, typer.Option(help="Also measure forward throughput over a batch sweep and plot it.")] = False,
    batches: Annotated[str, typer.Option(help="Batch sizes for --measure, comma separated.")] = "1,2,4,8",
    seconds: Annotated[float, typer.Option(help="Timing budget per batch size for --measure.")] = 1.0,
    out: Annotated[Path, typer.Option(help="Where --measure writes throughput.png and flops.json.")] = Path("flops"),
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Analytic FLOPs (the paper's Appendix H) for any two DiT presets, optionally measured.

    One multiply-add = 1 FLOP, batch 1, forward; per layer 2*S*D*(6D + S); a training step is
    3 x forward + the per-image encoding (DINOv2-B, plus the laminator's encoder for latent DiTs).

    Examples:
      flatdino flops                      (the paper's three tables)
      flatdino flops --preset xl-32x128 --vs rae-xl-256x768 --measure --device cuda
    """
    import json

    from flatdino_cli.analysis import flops as F
    from flatdino_cli.config import load_preset

    vae_cfg = load_preset(vae).model if vae else None
    if preset is None and vs is None:
        tables = F.appendix_h_tables(paper_rounding=not exact)
    else:
        a, b = (load_preset(n) for n in (preset or "xl-32x128", vs or "rae-xl-256x768"))
        for name, c in ((preset, a), (vs, b)):
            if c.stage != "dit":
                raise UserError(f"flops: preset {name} is a {c.stage} preset; pass DiT presets")
        tables = [F.flops_table(a, b, vae_cfg, paper_rounding=not exact)]
    result: dict = {"tables": tables}
    if measure:
        import torch

        from flatdino_cli.models import build_model

        rt = _runtime(device, precision, False)
        dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float32
        sizes = [int(x) for x in batches.split(",") if x.strip()]
        names = (preset or "xl-32x128", vs or "rae-xl-256x768")
        runs = []
        for name in names:
            cfg = load_preset(name)
            runs.append(F.measure_throughput(lambda c=cfg: build_model(c).eval(), sizes, cfg.model.tokens,
                                             cfg.model.in_dim, rt.device, dtype, seconds))
        out.mkdir(parents=True, exist_ok=True)
        F.plot_throughput(runs[0], runs[1], list(names), out / "throughput.png")
        result["measured"] = {"dtype": str(dtype), "device": str(rt.device), names[0]: runs[0], names[1]: runs[1]}
        speed = [ra["forward_per_s"] / rb["forward_per_s"] for ra, rb in zip(*runs) if "forward_per_s" in ra and "forward_per_s" in rb]
        result["measured"]["speedup"] = speed
        (out / "flops.json").write_text(json.dumps(result, indent=2))
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(F.format_table(tables))
    if measure:
        analytic = tables[0]["ratio"]["forward"]
        for bsz, sp in zip(sizes, result["measured"]["speedup"]):
            typer.echo(f"batch {bsz:5d}: measured forward speedup {sp:5.2f}x  (analytic {analytic:.2f}x, {dtype})")
        typer.echo(f"flops: plot -> {out / 'throughput.png'}")


# analyses ------------------------------------------------------------------------------------------
AnalysisOut = Annotated[Path, typer.Option("--out", "-o", help="Output folder for the JSON, figures and arrays.")]


def _analysis_numbers(text: str, option: str, cast=float) -> list:
    """'10,20,100' -> [10, 20, 100]; a one-line UserError naming the option otherwise."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. 10,20,100") from None
    if not values:
        raise UserError(f"{option}: give at least one value")
    return values


@command("ablate-tokens")
def ablate_tokens(
    vae: Annotated[Path, typer.Option(help="A train-vae run directory.")],
    features: Annotated[Path, typer.Option(help="Feature store the heatmaps average over (e.g. STORE/val).")],
    out: AnalysisOut = Path("analysis/ablation"),
    n: Annotated[int, typer.Option("--n", help="Average over the first N images of the store.")] = 10000,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    unit_batch: Annotated[int, typer.Option(help="Tokens ablated per decoder call (x batch size latents).")] = 8,
    example: Annotated[int, typer.Option(help="Which of the N images the overlay figure is drawn on.")] = 0,
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Per-token ablation heatmaps (the paper's Figure 6): zero token k of mu, decode, and map the
    per-patch L2 change of the features, averaged over N images.

    Writes OUT/heatmaps.npy (T, P), OUT/token_ablation.png (T panels on the patch grid, one shared
    colour scale), OUT/token_ablation_overlay.png (the maps over an example image, when the store's
    images are readable) and OUT/ablation.json (per-token total effect, peak patch, spread).

    Example: flatdino ablate-tokens --vae runs/vae --features stores/in1k/val --n 10000 --out analysis/ablation
    """
    from flatdino_cli.analysis.ablate import run_ablate

    r = run_ablate(vae, features, out, n=n, batch_size=batch_size, unit_batch=unit_batch,
                   rt=_runtime(device, precision, False), example=example)
    typer.echo(f"ablate-tokens: {r['units']} {r['unit']}s x {r['num_patches']} patches over {r['n_images']} images "
               f"-> {out / r['figure']}")


@command()
def pca(
    features: Annotated[Path, typer.Option(help="Feature store (its first N images are analysed).")],
    images: Annotated[Optional[Path], typer.Option(help="Images for the pixel-patch source (default: the "
                                                        "store's own source files, when readable).")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="A train-vae run: also analyse decode(mu) features.")] = None,
    out: AnalysisOut = Path("analysis/pca"),
    n: Annotated[int, typer.Option("--n", help="Images per source (the paper: 10,048 -> 2.57M patches).")] = 10048,
    max_vectors: Annotated[Optional[int], typer.Option(help="Stop each source after this many vectors.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    chunk_size: Annotated[int, typer.Option(help="Vectors per float64 covariance update (bounds memory).")] = 65536,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images.")] = 0,
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Linear compressibility (the paper's Table 3): PCA explained variance of pixel patches, DINO
    features and VAE-reconstructed features; dims for 95 % and 99 % of the variance.

    Exact and memory-bounded: float64 covariance accumulated chunk by chunk, then eigendecomposed.
    Writes OUT/pca.json and OUT/pca.png.

    Example: flatdino pca --features stores/in1k/val --images imagenet/val --vae runs/vae --out analysis/pca
    """
    from flatdino_cli.analysis.pca import run_pca

    r = run_pca(features, out, images=images, vae_run=vae, n=n, batch_size=batch_size, max_vectors=max_vectors,
                chunk_size=chunk_size, workers=workers, rt=_runtime(device, precision, False))
    for name, s in r["sources"].items():
        typer.echo(f"pca: {name:7s} D={s['dim']:4d}  95%: {s['dims']['0.95']:4d}  99%: {s['dims']['0.99']:4d}  "
                   f"({s['n_vectors']} vectors)")
    typer.echo(f"pca: -> {out / 'pca.json'}, {out / r['figure']}")


@command()
def knn(
    latents: Annotated[Path, typer.Option(help="Training store: latents (`extract --vae`) or DINOv2 features.")],
    val: Annotated[Optional[Path], typer.Option(help="Validation store (default: LATENTS/val, else a held-out "
                                                     "split of LATENTS).")] = None,
    out: AnalysisOut = Path("analysis/knn"),
    k: Annotated[str, typer.Option("--k", help="Neighbour counts, comma separated.")] = "10,20,100",
    temperature: Annotated[float, typer.Option(help="Vote weight exp(sim / T).")] = 0.07,
    val_count: Annotated[int, typer.Option(help="Held-out rows when there is no validation store.")] = 10000,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 256,
    device: Device = "auto",
):
    """Weighted k-NN classification probe (the paper's Appendix I): per-token L2 norm, mean-pool,
    L2 norm, cosine top-k, votes weighted exp(sim / 0.07). Writes OUT/knn.json and OUT/knn.png.

    Example: flatdino knn --latents stores/in1k-latents --out analysis/knn
    """
    from flatdino_cli.analysis.knn import run_knn

    r = run_knn(latents, out, val=val, ks=_analysis_numbers(k, "--k", int), temperature=temperature,
                val_count=val_count, seed=seed, batch_size=batch_size, rt=_runtime(device, "fp32", False))
    for kk, acc in r["k"].items():
        typer.echo(f"knn: k={kk:>4s} top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%")
    typer.echo(f"knn: {r['n_train']} train / {r['n_val']} val -> {out / 'knn.json'}, {out / r['figure']}")


@command()
def noise(
    vae: Annotated[Path, typer.Option(help="A train-vae run directory.")],
    features: Annotated[Path, typer.Option(help="Feature store (its first N images are used).")],
    decoder: Annotated[Optional[Path], typer.Option(help="Pixel decoder (run dir or RAE model.pt): adds PSNR.")] = None,
    out: AnalysisOut = Path("analysis/noise"),
    sigmas: Annotated[str, typer.Option(help="Noise levels, comma separated.")] = "0,0.2,0.4,0.6,0.8,1.0",
    n: Annotated[int, typer.Option("--n", help="Images to average over.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Robustness of the VAE decoder to Gaussian noise on the latents (the paper's Appendix B):
    feature cosine and relative L2 vs the clean decode and vs the DINOv2 features, next to the same
    noise put on the DINOv2 features; with --decoder also pixel PSNR. Writes OUT/noise.json, OUT/noise.png.

    Example: flatdino noise --vae runs/vae --features stores/in1k/val --decoder rae/ViTXL_n08 --out analysis/noise
    """
    from flatdino_cli.analysis.noise import run_noise

    r = run_noise(vae, features, out, sigmas=_analysis_numbers(sigmas, "--sigmas"), n=n, batch_size=batch_size,
                  decoder=decoder, seed=seed, rt=_runtime(device, precision, False))
    for s, cos in zip(r["sigmas"], r["latent"]["cosine_vs_clean"]):
        typer.echo(f"noise: sigma {s:4.2f}  cosine vs clean decode {cos:.4f}")
    typer.echo(f"noise: -> {out / 'noise.json'}, {out / r['figure']}")


@command()
def redundancy(
    features: Annotated[Path, typer.Option(help="Feature store (its first N images are used).")],
    out: AnalysisOut = Path("analysis/redundancy"),
    n: Annotated[int, typer.Option("--n", help="Images to average over.")] = 5000,
    bins: Annotated[int, typer.Option(help="Distance bins.")] = 50,
    max_distance: Annotated[Optional[float], typer.Option(help="Upper end of the distance range in patches "
                                                               "(default 10, scaled down on grids < 16x16).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    device: Device = "auto",
):
    """Spatial redundancy (the paper's Figure 5): cosine similarity of patch pairs vs their distance
    on the patch grid, mean and std per bin. Writes OUT/redundancy.json and OUT/redundancy.png.

    Example: flatdino redundancy --features stores/in1k/val --n 5000 --out analysis/redundancy
    """
    from flatdino_cli.analysis.redundancy import run_redundancy

    r = run_redundancy(features, out, n=n, bins=bins, max_distance=max_distance, batch_size=batch_size,
                       rt=_runtime(device, "fp32", False))
    if r.get("note"):
        typer.echo(f"redundancy: {r['note']}")
    typer.echo(f"redundancy: {r['n_images']} images -> {out / 'redundancy.json'}, {out / r['figure']}")


def main():  # pragma: no cover - console entry for `python -m flatdino_cli.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

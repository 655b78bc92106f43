"""The `flatdino` command line: one thin function per command (parse -> config -> call).

Heavy imports happen inside the commands so that `flatdino --help` is instant.
"""

from __future__ import annotations

import errno
import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli import preempt
from flatdino_cli.errors import UserError
from flatdino_cli.hub import resolve as resolve_model_ref
from flatdino_cli.utils import check_out_dir, comma_list

app = typer.Typer(
    name="flatdino",
    help="FlatDINO: laminate frozen DINOv2 features into 32 tokens, train flow-matching DiTs on them, "
         "decode to pixels.\n\nFirst run: `flatdino quickstart` (toy data, CPU, minutes). "
         "Every command has --help with an example.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (measured: no start-up cost)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from flatdino_cli import __version__

        typer.echo(f"flatdino {__version__}")
        raise typer.Exit()


presets_app = typer.Typer(help="List presets, or show one resolved (`flatdino presets show xl-32x128`).",
                          invoke_without_command=True, rich_markup_mode=None)
app.add_typer(presets_app, name="presets")
workspace_app = typer.Typer(help="List the workspace's runs and stores, or set its defaults.\n\n"
                                 "Example: flatdino workspace; flatdino workspace set decoder rae/model.pt",
                            invoke_without_command=True, rich_markup_mode=None)
app.add_typer(workspace_app, name="workspace")


@app.callback()
def main_options(
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", envvar="FLATDINO_WORKSPACE",
        help="Project folder: where runs/ and stores/ are written and found (default: the current folder).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit. Example: flatdino --version")] = False,
):
    # the environment carries the choice to workspace.root() (and to any process this one starts)
    import os

    if workspace is not None:
        os.environ["FLATDINO_WORKSPACE"] = str(workspace)


MODEL_OPTIONS = ("vae", "dit", "decoder", "guide")  # options naming a run: also an export folder or hf:ORG/NAME


_ONE_LINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _warning_line(message, category, *_args, **_kwargs) -> str:
    """Warnings (skipped files, duplicate folders) as one line each, without Python's source echo."""
    return f"flatdino: warning: {message}\n"


def _fail(message: str, code: int) -> None:
    """End the command with `message` on a line of its own (open progress bars closed first)."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    typer.echo(message, err=True)
    raise typer.Exit(code) from None


def command(*args, **kwargs):
    """app.command whose UserErrors become one line on stderr and exit code 1 (no traceback)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line
            try:
                with preempt.handle_signals():
                    k = {n: resolve_model_ref(v) if n in MODEL_OPTIONS else v for n, v in k.items()}
                    return fn(*a, **k)
            except UserError as e:
                _fail(f"flatdino: error: {e}", 1)
            except preempt.Preempted as e:  # SIGTERM / SIGUSR1: what was finished is saved
                if e.quiet:  # a torchrun rank other than 0: rank 0 says it once
                    raise typer.Exit(preempt.PREEMPTED_EXIT) from None
                _fail(e.message, preempt.PREEMPTED_EXIT)
            except KeyboardInterrupt as e:  # a loop that saves as it goes says how far it got (preempt.safe_points)
                _fail(str(e) or "flatdino: interrupted; rerun the same command to resume", preempt.INTERRUPTED_EXIT)
            except OSError as e:  # a full disk or a forbidden folder met by a write no check foresaw
                if e.errno not in _ONE_LINE_ERRNOS:
                    raise
                _fail(f"flatdino: error: {e.filename or 'writing'}: {e.strerror}; free some space or fix "
                      "the permissions, then rerun the same command to resume", 1)
            finally:
                warnings.formatwarning = formatwarning

        return app.command(*args, **kwargs)(inner)

    return wrap


# shared option types -----------------------------------------------------------------------------
Preset = Annotated[str, typer.Option("--preset", "-p", help="Preset name (`flatdino presets`) or a YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config value, dotted and type-checked: --set train.lr=1e-4 (repeatable).")]
Device = Annotated[str, typer.Option(help="auto (cuda if present), cpu, cuda, cuda:1.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")]
# the measuring commands (sample, reconstruct, ablate-tokens, pca, noise) run in fp32 unless asked, as the
# authors' rFID and our FID protocol do: one default, so no number silently comes from bf16
MeasurePrecision = Annotated[str, typer.Option(help="fp32 (default: what measured numbers assume), bf16 or auto.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                                                 help="torch.compile the model (default: on for CUDA, off for CPU).")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume",
                                      help="Resume from the run dir's checkpoint if it has one (default). "
                                           "--no-resume starts over and moves the old run aside to "
                                           "RUN.old-<time> (keeps the last train.keep_old_runs, default 1).")]
NewData = Annotated[bool, typer.Option("--new-data", help="Resume on a store of other data than the run was "
                                                          "trained on (fine-tuning on new data on purpose); "
                                                          "both are recorded in inputs.json.")]
Seed = Annotated[Optional[int], typer.Option(help="Training seed (overrides train.seed).")]
RunOut = Annotated[Optional[Path], typer.Option("--out", "-o", help=(
    "Run directory (created; resumed if it has a checkpoint). Default: the workspace's runs/<stage>-<preset>, "
    "or a new -N suffix unless that run has the same config (then it is resumed)."))]
Epochs = Annotated[Optional[float], typer.Option(help="Overrides train.epochs.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Global batch (overrides train.batch_size); "
                                                      "use --set train.micro_batch_size=N to accumulate.")]
LogTo = Annotated[Optional[list[str]], typer.Option(
    "--log-to", help="Also log to an experiment tracker: tensorboard or wandb (repeatable; metrics.jsonl always; "
                     "needs pip install \"flatdino[track]\"). Example: --log-to tensorboard --log-to wandb "
                     "(offline: WANDB_MODE=offline).")]


def _log_to(names: list[str] | None) -> str | None:
    """--log-to a --log-to b -> the override value [a, b] of train.log_to."""
    return f"[{', '.join(names)}]" if names else None


def _overrides(sets: list[str] | None, **cli_values) -> list[str]:
    """--set items plus shortcut options (--epochs, --batch-size, --seed) given on the command line."""
    out = list(sets or [])
    out += [f"{k}={v}" for k, v in cli_values.items() if v is not None]
    return out


def _runtime(device: str, precision: str, compile: Optional[bool]):
    from flatdino_cli.runtime import setup_runtime

    return setup_runtime(device, precision, compile)


def _train_start(command: str, stage: str, wanted: str, preset: str, sets, epochs, batch_size, seed, log_to,
                 out: Optional[Path], device: str, precision: str, compile: Optional[bool], pick=None, shape=None):
    """What every train-* command does first: the preset with its overrides, the stage check, the
    inputs `pick(cfg)` resolves (in the workspace), the config `shape(cfg, picked)` fits to them (so the
    workspace resumes the run whose recorded config is that), the run dir (--out or the workspace's),
    the out-dir check, the runtime. Returns (cfg, picked, out, rt)."""
    from flatdino_cli import workspace as ws
    from flatdino_cli.config_yaml import load_preset

    cfg = load_preset(preset, _overrides(sets, **{"train.epochs": epochs, "train.batch_size": batch_size,
                                                  "train.seed": seed, "train.log_to": _log_to(log_to)}))
    if cfg.stage != stage:
        raise UserError(f"--preset {preset}: is a {cfg.stage} preset; {command} needs {wanted}")
    picked = pick(cfg) if pick is not None else None
    cfg = shape(cfg, picked) if shape is not None else cfg
    out = ws.run_dir(command, out, stage, preset, cfg)
    check_out_dir(out)
    return cfg, picked, out, _runtime(device, precision, compile)


# presets -------------------------------------------------------------------------------------------
@presets_app.callback()
def presets_list(ctx: typer.Context):
    """List the presets shipped with flatdino.

    \b
    Examples:
      flatdino presets
      flatdino presets show vae-32x128 --set model.tokens=64
    """
    if ctx.invoked_subcommand is None:
        from flatdino_cli.config_yaml import list_presets, load_preset

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

        from flatdino_cli.config_yaml import load_preset, to_dict
        from flatdino_cli.models import count_parameters

        cfg = load_preset(name, _overrides(sets))
        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        for part, n in count_parameters(cfg).items():
            typer.echo(f"# parameters, {part}: {n:,} ({n / 1e6:.1f}M)")
    except UserError as e:
        typer.echo(f"flatdino: error: {e}", err=True)
        raise typer.Exit(1) from None


# workspace -----------------------------------------------------------------------------------------
@workspace_app.callback()
def workspace_list(ctx: typer.Context):
    """List the workspace's runs and stores, newest first: stage, preset, progress, best metric, size and
    what each was made from (store -> VAE -> latents -> DiT).

    Example: flatdino workspace; flatdino --workspace ~/flatdino-in1k workspace
    """
    if ctx.invoked_subcommand is None:
        from flatdino_cli.workspace import listing

        typer.echo(listing())


@workspace_app.command("set")
def workspace_set(key: Annotated[str, typer.Argument(help="decoder, encoder-weights, inception-weights or "
                                                          "reference-batch.")],
                  value: Annotated[str, typer.Argument(help="A file or folder (none clears the key).")]):
    """Set a workspace default that commands use when the option is not given.

    Example: flatdino workspace set decoder rae/decoders/dinov2/wReg_base/ViTXL_n08/model.pt
    """
    from flatdino_cli.workspace import set_setting

    try:
        typer.echo(set_setting(key, value))
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

    \b
    Example:
      flatdino toy-data runs/toy --per-class 200
    """
    from flatdino_cli.toydata import write_toy_dataset

    summary = write_toy_dataset(out, per_class=per_class, size=size, seed=seed)
    typer.echo(f"toy-data: {summary['count']} images in {summary['classes']} classes -> {out}")


@command()
def extract(
    source: Annotated[Path, typer.Argument(help="Images (ImageFolder tree, flat folder or `path label` list), "
                                                "or with --vae a FEATURE STORE.")],
    out: Annotated[Optional[Path], typer.Argument(help="Output store directory (default: the workspace's "
                                                       "stores/<source>-<encoder>, or stores/<source>-latents-<vae>).")] = None,
    encoder: Annotated[str, typer.Option(help="dinov2-b-reg4 (the paper's encoder), dinov2-s-reg4 (RAE's DiT-XL "
                                              "anchor), dinov2-g-reg4 (FAE) or tiny (random weights, for tests "
                                              "and the CPU quickstart).")] = "dinov2-b-reg4",
    encoder_weights: Annotated[Optional[Path], typer.Option(
        help="Local DINOv2 weights (.safetensors/.pth, timm or Hugging Face key names) instead of the HF cache.")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="A train-vae run: turn the feature store SOURCE into a "
                                                     "latent store of the posterior mean mu.")] = None,
    decoded: Annotated[bool, typer.Option("--decoded", help="With --vae: store the VAE's reconstruction "
                                          "decode(mu) as features (to fine-tune a pixel decoder on).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per encoder forward.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for decoding images.")] = 0,
    val_split: Annotated[int, typer.Option(help="Hold out N images (deterministic) into OUT/val.")] = 0,
    mirror: Annotated[bool, typer.Option(help="Also encode each crop's mirror image (a second view per row: "
                                              "train-dit then draws crop or mirror every epoch).")] = False,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float16 (default for features) or float32.")] = "",
    preprocess: Annotated[str, typer.Option(help="adm: the ADM centre crop, resized to the encoder input (the "
                                                 "generator and VAE pipelines); whole: the authors' evaluation "
                                                 "transform, the whole image resized to CROP_SIZE (no crop), then "
                                                 "bilinear to the encoder input; knn: the same, encoded at "
                                                 "CROP_SIZE itself (their k-NN: 256 px, 324 DINOv2 patches).")] = "adm",
    interp: Annotated[str, typer.Option(help="adm: resize to the encoder input, bicubic (generator pipeline, "
                                             "default) or bilinear (VAE evaluation); whole/knn: area (cv2 "
                                             "INTER_AREA, default) or bilinear (INTER_LINEAR, for images "
                                             "smaller than CROP_SIZE such as CIFAR).")] = "",
    crop_size: Annotated[Optional[int], typer.Option(help="ADM center-crop size, or the whole-image side "
                                                          "(default 256 for DINOv2-B).")] = None,
    class_index: Annotated[Optional[Path], typer.Option(help="JSON/txt mapping ImageNet synset folders to 0-999.")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first unreadable image instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store that was made differently.")] = False,
    new_data: Annotated[bool, typer.Option("--new-data", help="With --vae: accept features of another encoder "
                                                              "than the VAE was trained on (recorded).")] = False,
    device: Device = "auto",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the encoder.")] = False,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 matmuls on CUDA (faster, slightly less exact).")] = False,
):
    """Images -> frozen DINOv2 features (N, 256, 768) in a resumable store; with --vae, features -> latents.

    Killed at any moment and rerun, it resumes without recomputing finished rows and ends
    byte-identical to an uninterrupted run. Unreadable images are skipped, named, and counted in the
    manifest (--strict fails instead). SIGTERM / SIGUSR1 stop it after the chunk in flight is saved
    (exit code 75), saying how many images are done.

    \b
    Examples:
      flatdino extract imagenet/train stores/in1k --encoder dinov2-b-reg4 --batch-size 256 --workers 8
      flatdino extract runs/toy runs/toy-feats --encoder tiny --val-split 100
      flatdino extract imagenet/val stores/knn-val --preprocess knn   (Table 10's k-NN input: 324 patches)
      flatdino extract stores/in1k --vae runs/vae-vae-32x128     (-> stores/in1k-latents-vae-vae-32x128)
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.config import ExtractConfig
    from flatdino_cli.runtime import setup_runtime

    made = f"{'decoded' if decoded else 'latents'}-{vae.resolve().name}" if vae is not None else encoder
    out = ws.store_dir("extract", out, f"{source.resolve().name}-{made}")
    encoder_weights = ws.setting("encoder-weights", encoder_weights) if vae is None and encoder != "tiny" else encoder_weights
    rt = setup_runtime(device, "fp32", False)
    if vae is not None:
        from flatdino_cli.extract import extract_latents

        summary = extract_latents(source, vae, out, rt, batch_size=batch_size, dtype=dtype or "float32",
                                  overwrite=overwrite, decoded=decoded, new_data=new_data)
        typer.echo(f"extract: {'decoded features' if decoded else 'latents'} -> {', '.join(summary['stores'])}")
        return
    if decoded:
        raise UserError("--decoded goes with --vae RUN")
    from flatdino_cli.extract import extract_features

    cfg = ExtractConfig(encoder=encoder, encoder_weights=str(encoder_weights) if encoder_weights else None,
                        preprocess=preprocess, crop_size=crop_size, interp=interp or None,
                        dtype=dtype or "float16", batch_size=batch_size,
                        workers=workers, val_split=val_split, strict=strict, compile=compile, tf32=tf32,
                        mirror=mirror)
    summary = extract_features(source, out, cfg, rt, overwrite=overwrite, class_index=class_index)
    typer.echo(f"extract: {summary['images']} images -> {', '.join(summary['stores'])} "
               f"({summary['skipped']} unreadable skipped)")


@command("train-vae")
def train_vae(
    out: RunOut = None,
    preset: Preset = "vae-32x128",
    features: Annotated[Optional[Path], typer.Option(help="Feature store from `flatdino extract` (default: the "
                                                          "workspace's newest, unless --images).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Train on images encoded on the fly (with --encoder), "
                                                        "re-augmented every epoch as in the paper.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder for --images mode.")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for --encoder.")] = None,
    val_features: Annotated[Optional[Path], typer.Option(help="Validation feature store (ImageNet val, "
                                                              "`extract --interp bilinear`) that picks "
                                                              "checkpoints/best.")] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    sets: SetOpt = None,
    device: Device = "auto",
    precision: Precision = "auto",
    compile: Compile = None,
    resume: Resume = True,
    log_to: LogTo = None,
    new_data: NewData = False,
):
    """Train the FlatDINO laminator (beta-VAE) on DINOv2 features.

    beta defaults to 1e-6 * 512 / (T * d); validation logs the Huber loss, Huber + beta * KL, KL per
    token and the mean cosine similarity of reconstructed features, and keeps checkpoints/best by the
    validation Huber loss alone (the authors' criterion).

    SIGTERM / SIGUSR1 (cluster preemption): saves checkpoints/latest at the step reached and exits with
    code 75; rerun the same command to continue.

    \b
    Multi-GPU (multi-node: add torchrun's --nnodes/--node-rank/--rdzv-endpoint):
      torchrun --nproc-per-node 8 -m flatdino_cli.cli train-vae ...

    \b
    Examples:
      flatdino train-vae --preset vae-32x128 --features stores/in1k   (-> runs/vae-vae-32x128)
      flatdino train-vae --preset vae-32x128 --images imagenet/train --encoder dinov2-b-reg4 \\
        --val-features stores/in1k-val-bilinear --out runs/vae
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.stages.vae import train_vae as run

    def pick(cfg):
        picked = features if features is not None or images is not None else ws.pick_features("train-vae")
        return picked, ws.setting("encoder-weights", encoder_weights) if images is not None else encoder_weights

    cfg, (features, encoder_weights), out, rt = _train_start(
        "train-vae", "vae", "a vae-* preset", preset, sets, epochs, batch_size, seed, log_to, out, device, precision,
        compile, pick)
    summary = run(cfg, out, rt, features=features, images=images, encoder_name=encoder,
                  encoder_weights=str(encoder_weights) if encoder_weights else None, resume=resume,
                  val_features=val_features, new_data=new_data)
    if rt.is_main:
        ws.note_run(out, "vae", preset)
        best = summary["best_val"]
        val = (f"best val {'Huber' if cfg.loss.loss == 'huber' else cfg.loss.loss.upper()} {best:.4g}"
               if best != float("inf") else "no validation yet (it runs at each epoch end; train longer)")
        typer.echo(f"train-vae: {summary['step']} steps, {val} -> {out}")


@command("train-dit")
def train_dit(
    out: RunOut = None,
    latents: Annotated[Optional[Path], typer.Option(help="Latent store (`flatdino extract --vae`), or a feature "
                                                         "store for the rae-* baseline presets (default: the "
                                                         "workspace's newest that fits the preset).")] = None,
    preset: Preset = "xl-32x128",
    epochs: Epochs = None,
    batch_size: BatchSize = None,
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
    log_to: LogTo = None,
    new_data: NewData = False,
):
    """Train the LightningDiT flow-matching generator on latents (the paper's recipe by default).

    AdamW (0.9, 0.95), wd 1e-4, clip 1.0, constant lr 2e-4, EMA 0.9995, global batch 1024 (set
    train.micro_batch_size to accumulate on small GPUs). Logs the loss per t-bucket to metrics.jsonl;
    with --vae and --decoder (and --set sample_every=N) writes a small sample grid every N steps.

    SIGTERM / SIGUSR1 (cluster preemption): saves checkpoints/latest at the step reached and exits with
    code 75; rerun the same command to continue.

    \b
    Multi-GPU:
      torchrun --nproc-per-node 8 -m flatdino_cli.cli train-dit ...

    \b
    Example:
      flatdino train-dit --preset xl-32x128   (the newest fitting latents -> runs/dit-xl-32x128)
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.data import Store, with_store_shape
    from flatdino_cli.stages.dit import train_dit as run

    cfg, latents, out, rt = _train_start(
        "train-dit", "dit", "a DiT preset (xl-32x128, ...)", preset, sets, epochs, batch_size, seed, log_to, out,
        device, precision, compile, lambda cfg: latents if latents is not None else ws.pick_latents("train-dit", cfg),
        lambda cfg, store: with_store_shape(cfg, Store.open(store), store))
    on_step = None
    if cfg.sample_every and decoder is not None and (vae is not None or cfg.model.grid) and rt.is_main:
        from flatdino_cli.stages.dit import training_grid_hook

        on_step = training_grid_hook(cfg, out, vae, decoder, rt)
    summary = run(cfg, out, rt, latents, resume=resume, recompute_stats=compute_stats, on_step=on_step,
                  new_data=new_data)
    if rt.is_main:
        ws.note_run(out, "dit", preset)
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

    \b
    Examples:
      flatdino flops                      (the paper's three tables)
      flatdino flops --preset xl-32x128 --vs rae-xl-256x768 --measure --device cuda
    """
    import json

    from flatdino_cli.analysis import flops as F

    sizes = comma_list(batches, "--batches", int) if measure else None
    rt = _runtime(device, precision, False) if measure else None
    result = F.run_flops(preset, vs, vae, exact=exact, sizes=sizes, seconds=seconds, out=out, rt=rt)
    tables = result["tables"]
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(F.format_table(tables))
    if measure:
        analytic = tables[0]["ratio"]["forward"]
        dtype = result["measured"]["dtype"]
        for bsz, sp in zip(sizes, result["measured"]["speedup"]):
            typer.echo(f"batch {bsz:5d}: measured forward speedup {sp:5.2f}x  (analytic {analytic:.2f}x, {dtype})")
        typer.echo(f"flops: plot -> {out / 'throughput.png'}")


@command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (train-vae/-dit/-decoder), overlaid.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The figure (PNG).")] = Path("curves.png"),
    x: Annotated[str, typer.Option("--x", help="steps, or flops: training compute of DiT runs (the FLOPs "
                                               "module's count), to compare runs on one compute axis.")] = "steps",
    label: Annotated[Optional[list[str]], typer.Option(help="Legend name per run, in order (default: the "
                                                            "run folder's name).")] = None,
    smooth: Annotated[float, typer.Option(help="EMA weight of the smoothed loss in [0, 1) (raw drawn faint).")] = 0.9,
    title: Annotated[Optional[str], typer.Option(help="Figure title.")] = None,
):
    """Training curves from metrics.jsonl: loss (smoothed, raw faint), loss per t-bucket, lr, val metrics.

    \b
    Examples:
      flatdino plot runs/dit-xl --out curves.png
      flatdino plot runs/dit-xl runs/rae-xl --label FlatDINO --label RAE --x flops --out compute.png
    """
    from flatdino_cli.analysis.curves import plot_runs

    r = plot_runs(runs, out, labels=label or (), axis=x, smoothing=smooth, title=title)
    typer.echo(f"plot: {len(r['runs'])} run(s), panels {', '.join(r['panels'])} -> {r['out']}")


@command()
def export(
    run: Annotated[Path, typer.Argument(help="A train-vae, train-dit or train-decoder run directory.")],
    out: Annotated[Path, typer.Argument(help="The model folder to write (upload it with `hf upload ORG/NAME OUT`).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at OUT.")] = False,
    format: Annotated[str, typer.Option("--format", help="flatdino (any run) or diffusers (a train-decoder run "
                                                         "with its encoder, as an AutoencoderRAE folder).")] = "flatdino",
    encoder_weights: Annotated[Optional[Path], typer.Option(help="(diffusers) The encoder weights the decoder was "
                                                                 "trained on, when inputs.json cannot find them.")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="(diffusers) Latent statistics to include: RAE's stat.pt, "
                                                       "an rae-* run's stats.pt or an AutoencoderRAE folder.")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="(diffusers, DiT runs) The VAE run (default: the one in "
                                                     "inputs.json; none for rae-* runs).")] = None,
    decoder: Annotated[Optional[Path], typer.Option(help="(diffusers, DiT runs) The pixel decoder to ship.")] = None,
):
    """Write a run as a Hugging Face model folder: model.safetensors, config.json, README.md (model card).

    Any --vae/--dit/--decoder option then takes the folder, or hf:ORG/NAME[@REV] once it is in the
    local Hugging Face cache (`hf download ORG/NAME`); nothing is downloaded by flatdino itself.
    `--format diffusers` writes a decoder run as a diffusers AutoencoderRAE folder instead, and a DiT run
    (with --decoder) as a pipeline for `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`.

    \b
    Examples:
      flatdino export runs/vae exports/flatdino-vae-32x128
      flatdino sample --dit hf:me/flatdino-xl --vae hf:me/flatdino-vae --decoder rae/model.pt -c 207
      flatdino export runs/decoder exports/rae-decoder --format diffusers --stats runs/dit-rae/stats.pt
    """
    from flatdino_cli.export import export_diffusers, export_run

    if format not in ("flatdino", "diffusers"):
        raise UserError(f"--format {format!r}: choose flatdino or diffusers")
    if format == "flatdino" and any(v is not None for v in (encoder_weights, stats, vae, decoder)):
        raise UserError("export: --encoder-weights, --stats, --vae and --decoder go with --format diffusers")
    if format == "diffusers":
        r = export_diffusers(run, out, encoder_weights, stats, overwrite=overwrite, vae=vae, decoder=decoder)
        what = "an AutoencoderRAE" if r["stage"] == "decoder" else "a diffusers pipeline"
        typer.echo(f"export: {r['stage']} run at step {r['step']} as {what} -> {r['out']} ({', '.join(r['files'])})")
        return
    r = export_run(run, out, overwrite=overwrite)
    typer.echo(f"export: {r['stage']} run at step {r['step']} ({r['weights']['source']}) -> {r['out']} "
               f"({', '.join(r['files'])})")


@command()
def info(
    path: Annotated[str, typer.Argument(help="A run, an exported model folder or hf:ORG/NAME, a store, a sample "
                                             "set, or one of RAE's released files (model.pt, stat.pt, a diffusers "
                                             "AutoencoderRAE folder).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """What a run, store, sample set or checkpoint is, at a glance: stage, preset, sizes, data, steps, best
    val, disk; for a sample set its models, solver and network evaluations per image.

    \b
    Examples:
      flatdino info runs/dit-xl
      flatdino info stores/in1k
      flatdino info runs/dit-xl/samples/dit-xl-n50000-cfg1.5-euler50-seed0
      flatdino info rae/decoders/dinov2/wReg_base/ViTXL_n08/model.pt
    """
    import json

    from flatdino_cli.info import describe

    facts = describe(path)
    if json_out:
        typer.echo(json.dumps(dict(facts), indent=2))
        return
    for label, value in facts:
        typer.echo(f"{label:12s} {value}")


# analyses ------------------------------------------------------------------------------------------
AnalysisOut = Annotated[Path, typer.Option("--out", "-o", help="Output folder for the JSON, figures and arrays.")]


@command("ablate-tokens")
def ablate_tokens(
    vae: Annotated[Optional[Path], typer.Option(help="A train-vae run directory (default: the workspace's "
                                                     "newest finished one).")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Feature store the heatmaps average over (default: "
                                                          "the validation split of the VAE's training store).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: "
                                                                    "VAE/analysis/ablation).")] = None,
    n: Annotated[int, typer.Option("--n", help="Average over the first N images of the store.")] = 10000,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    unit_batch: Annotated[int, typer.Option(help="Tokens ablated per decoder call (x batch size latents).")] = 8,
    example: Annotated[int, typer.Option(help="Which of the N images the overlay figure is drawn on.")] = 0,
    device: Device = "auto",
    precision: MeasurePrecision = "fp32",
):
    """Per-token ablation heatmaps (the paper's Figure 6): zero token k of mu, decode, and map the
    per-patch L2 change of the features, averaged over N images.

    Writes OUT/heatmaps.npy (T, P), OUT/token_ablation.png (T panels on the patch grid, one shared
    colour scale), OUT/token_ablation_overlay.png (the maps over an example image, when the store's
    images are readable) and OUT/ablation.json (per-token total effect, peak patch, spread).

    \b
    Example:
      flatdino ablate-tokens   (the newest VAE run, on its store's val split)
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.analysis.ablate import run_ablate

    vae, features = ws.pick_ablate(vae, features)
    out = out or vae / "analysis" / "ablation"

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
    precision: MeasurePrecision = "fp32",
):
    """Linear compressibility (the paper's Table 3): PCA explained variance of pixel patches, DINO
    features and VAE-reconstructed features; dims for 95 % and 99 % of the variance.

    Exact and memory-bounded: float64 covariance accumulated chunk by chunk, then eigendecomposed.
    Writes OUT/pca.json and OUT/pca.png.

    \b
    Example:
      flatdino pca --features stores/in1k/val --images imagenet/val --vae runs/vae --out analysis/pca
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

    \b
    Example:
      flatdino knn --latents stores/in1k-latents --out analysis/knn
    """
    from flatdino_cli.analysis.knn import run_knn

    r = run_knn(latents, out, val=val, ks=comma_list(k, "--k", int), temperature=temperature,
                val_count=val_count, seed=seed, batch_size=batch_size, rt=_runtime(device, "fp32", False))
    for kk, acc in r["k"].items():
        typer.echo(f"knn: k={kk:>4s} top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%")
    typer.echo(f"knn: {r['n_train']} train / {r['n_val']} val -> {out / 'knn.json'}, {out / r['figure']}")


@command()
def noise(
    vae: Annotated[Path, typer.Option(help="A train-vae run directory.")],
    features: Annotated[Path, typer.Option(help="Feature store (its first N images are used).")],
    decoder: Annotated[Optional[Path], typer.Option(help="Pixel decoder (run dir or RAE model.pt): adds rFID "
                                                         "and PSNR against the original images.")] = None,
    out: AnalysisOut = Path("analysis/noise"),
    sigmas: Annotated[str, typer.Option(help="Noise levels, comma separated.")] = "0,0.2,0.4,0.6,0.8,1.0",
    n: Annotated[Optional[int], typer.Option("--n", help="Images to average over (default: all, as the "
                                                         "paper's validation set).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    inception_weights: Annotated[Optional[Path], typer.Option(
        help="clean-fid's inception-2015-12-05.pt for rFID (default: clean-fid's cache).")] = None,
    device: Device = "auto",
    precision: MeasurePrecision = "fp32",
):
    """Robustness of the VAE decoder to Gaussian noise on the latents (the paper's Appendix B): with
    --decoder, rFID and PSNR of the decoded images against the original images per sigma (what the
    paper reports), for noise on the latents and on the DINOv2 features; always feature cosine and
    relative L2 vs the clean decode and vs the DINOv2 features. Writes OUT/noise.json, OUT/noise.png.

    \b
    Example:
      flatdino noise --vae runs/vae --features stores/in1k/val --decoder rae/ViTXL_n08 --out analysis/noise
    """
    from flatdino_cli.analysis.noise import run_noise

    r = run_noise(vae, features, out, sigmas=comma_list(sigmas, "--sigmas", float), n=n, batch_size=batch_size,
                  decoder=decoder, seed=seed, rt=_runtime(device, precision, False),
                  inception_weights=inception_weights)
    lat = r["latent"]
    for i, s in enumerate(r["sigmas"]):
        extra = "".join(f"  {name} {lat[key][i]:.4g}" for key, name in (("rfid", "rFID"), ("psnr_vs_image", "PSNR"))
                        if lat.get(key) and lat[key][i] is not None)
        typer.echo(f"noise: sigma {s:4.2f}{extra}  cosine vs clean decode {lat['cosine_vs_clean'][i]:.4f}")
    for note in r["notes"]:
        typer.echo(f"noise: {note}")
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

    \b
    Example:
      flatdino redundancy --features stores/in1k/val --n 5000 --out analysis/redundancy
    """
    from flatdino_cli.analysis.redundancy import run_redundancy

    r = run_redundancy(features, out, n=n, bins=bins, max_distance=max_distance, batch_size=batch_size,
                       rt=_runtime(device, "fp32", False))
    if r.get("note"):
        typer.echo(f"redundancy: {r['note']}")
    typer.echo(f"redundancy: {r['n_images']} images -> {out / 'redundancy.json'}, {out / r['figure']}")


# generation ----------------------------------------------------------------------------------------


@command()
def sample(
    dit: Annotated[Optional[Path], typer.Option(help="A train-dit run (FlatDINO latents or an rae-* baseline), or "
                                                     "RAE's released stage2_model.pt (or its folder); default: the "
                                                     "workspace's newest finished run.")] = None,
    decoder: Annotated[Optional[Path], typer.Option(help="Pixel decoder: a train-decoder run or RAE's model.pt "
                                                         "(default: `workspace set decoder`, else the newest "
                                                         "train-decoder run).")] = None,
    vae: Annotated[Optional[Path], typer.Option(help="The VAE run the DiT's latents came from (default: the one "
                                                     "recorded in DIT/inputs.json; none for rae-* runs).")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="RAE's stat.pt for a normalising DiT (default: RUN/stats.pt, "
                                                       "or stat.pt beside an RAE checkpoint).")] = None,
    guide: Annotated[Optional[Path], typer.Option(help="AutoGuidance: a weaker DiT (run or RAE file) on the same "
                                                       "latents and classes; needs --guide-scale.")] = None,
    guide_scale: Annotated[Optional[float], typer.Option(help="AutoGuidance weight w: v = v_guide + w (v - v_guide), "
                                                              "inside --interval (RAE's best: 1.42).")] = None,
    grid: Annotated[Optional[str], typer.Option(help="Time grid: ours (steps steps to t = 1) or rae (RAE's: steps "
                                                     "points to t_RAE = 0.00689, guidance only if w > 1); default: "
                                                     "flow.grid (rae for RAE checkpoints).")] = None,
    class_: Annotated[Optional[list[str]], typer.Option(
        "--class", "-c", help="Class id or name (ImageNet names like 'golden retriever', or the run's own class "
                              "names); repeatable.")] = None,
    classes: Annotated[Optional[str], typer.Option(
        help="'all' (every class: a class-balanced FID set, 50 per class unless --per-class/-n say otherwise) "
             "or a comma-separated list of ids/names.")] = None,
    per_class: Annotated[Optional[int], typer.Option(help="Images per class.")] = None,
    n: Annotated[Optional[int], typer.Option("-n", "--n", help="Images in total (default 16), split evenly "
                                                                "over the classes in contiguous blocks.")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale (default: the DiT config's "
                                                               "flow.cfg_scale; 1 = none).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (default: flow.steps, 50).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help=(
        "euler, heun (2 evaluations a step), ab2 / ab3 (Adams-Bashforth multistep, one evaluation a step), "
        "dopri5 (torchdiffeq's adaptive solver; `pip install flatdino[ode]`) or sde (Euler-Maruyama on the "
        "reverse SDE, SiT's sampler; FAE's unguided numbers use it with --steps 250 --cfg 1). "
        "Default: flow.sampler."))] = None,
    interval: Annotated[Optional[str], typer.Option(help="Guidance interval LO,HI in t (t=1 is data), e.g. "
                                                         "0.225,1 (default: flow.cfg_interval).")] = None,
    shift: Annotated[Optional[float], typer.Option(help=(
        "Time-grid shift k of the sampler, t' = t / (k - (k-1) t) (default: flow.shift, the training shift; "
        "SiT's SDE grid is uniform: --shift 1)."))] = None,
    cfg_schedule: Annotated[Optional[str], typer.Option(help=(
        "Piecewise guidance LO-HI:W,... in t (t=1 is data), weight W on LO <= t < HI and none elsewhere, "
        "e.g. FAE's three-part CFG 0-0.1:0.9,0.1-0.3:1.5,0.3-1:2.5 (default: flow.cfg_schedule, if set).")
    )] = None,
    seed: Annotated[int, typer.Option(help="Image i's noise is seeded by (seed, i): same image for any "
                                           "batch size.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: "
                                                                    "DIT/samples/<settings>).")] = None,
    batch_size: Annotated[int, typer.Option(help=(
        "Images per sampler batch; on CPU rounded up to a multiple of 8, so a seed gives identical "
        "images at any batch size."))] = 32,
    shard_size: Annotated[int, typer.Option(help="Images per resumable shard.")] = 1000,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="EMA weights (default) or the raw ones.")] = True,
    device: Device = "auto",
    precision: MeasurePrecision = "fp32",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help=(
        "torch.compile the DiT: a one-off compile (about a minute) that pays off over a large FID set "
        "(bench/sample.py measures both)."))] = False,
):
    """Sample images from a trained DiT: latents -> VAE decoder -> pixel decoder -> PNGs, grid, ADM .npz.

    Writes OUT/images/<class>_<index>.png, OUT/grid.png, OUT/samples_<N>x<S>x<S>x3.npz (uint8 NHWC
    under arr_0, labels under arr_1: the format of ADM's evaluator and `flatdino fid`) and
    OUT/samples.json (dit/vae/decoder paths + weight hashes, guidance, steps, seed). Resumable: a
    killed run, rerun, keeps finished shards and images; SIGTERM / SIGUSR1 stop it after the batch in
    flight is saved (exit code 75). The same command samples rae-* baseline runs (raw DINOv2
    features, de-normalised with RUN/stats.pt, no --vae).

    \b
    Examples:
      flatdino sample --dit runs/dit-xl --decoder rae/ViTXL_n08/model.pt --class 207 --cfg 4.5 -n 16
      flatdino sample --dit runs/dit-xl --decoder rae/model.pt -c goldfinch -c "golden retriever" -n 16
      flatdino sample --dit runs/dit-xl --decoder rae/model.pt --classes all --per-class 50 --batch-size 256
      flatdino sample --dit models/DiTs/.../DiTDH-XL/stage2_model.pt --stats models/stats/.../stat.pt \\
          --guide models/DiTs/.../DiTDH-S_ep14/stage2_model.pt --guide-scale 1.42 --decoder ViTXL_n08 -c 207
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.sample import run_sample

    dit, vae, decoder = ws.pick_sample(dit, vae, decoder)
    names = list(class_ or [])
    all_classes = classes is not None and classes.strip().lower() == "all"
    if classes is not None and not all_classes:
        names += comma_list(classes, "--classes", allow_empty=True)
    rt = _runtime(device, precision, compile)
    m = run_sample(dit, vae, decoder, names, all_classes, n=n, per_class=per_class, cfg_scale=cfg, steps=steps,
                   sampler=sampler, interval=interval, seed=seed, out=out, batch_size=batch_size,
                   shard_size=shard_size, ema=ema, rt=rt, stats=stats, guide=guide, guide_scale=guide_scale, grid=grid,
                   schedule=cfg_schedule, shift=shift)
    flow = m["identity"]["flow"]
    guidance = "autoguidance" if m["identity"].get("guide") else "cfg"
    weights = (" / ".join(f"{w:g} on [{lo:g}, {hi:g})" for lo, hi, w in flow["cfg_schedule"])
               if flow.get("cfg_schedule") else f"{flow['cfg_scale']:g}")
    typer.echo(f"sample: {m['identity']['count']} images ({guidance} {weights}, {flow['sampler']} "
               f"{flow['steps']} steps, {m.get('network_evaluations') or '?'} network evaluations per image, seed "
               f"{m['identity']['seed']}) -> {m['out']}/{m['npz']}, {m['out']}/grid.png")


@command("export-rae")
def export_rae(
    run: Annotated[Path, typer.Argument(help="A train-dit run on a square 2-D grid (rae-* presets).")],
    out: Annotated[Path, typer.Argument(help="Output .pt: a raw state dict for RAE's own model class.")],
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="EMA weights (default) or the raw ones.")] = True,
):
    """Write a DiT run as an RAE stage-2 checkpoint (RAE's key names and time frame), loadable by RAE's
    LightningDiT / DiTwDDTHead with strict=True; prints the model params for RAE's config.

    Example: flatdino export-rae runs/rae-dh-xl models/DiTs/ours/stage2_model.pt
    """
    import json

    from flatdino_cli.export import export_rae as export

    params = export(run, out, ema)
    typer.echo(f"export-rae: {out} ({params.pop('target')}) params: {json.dumps(params)}")


@command()
def reconstruct(
    images: Annotated[Path, typer.Argument(help="Images: a folder, an ImageFolder tree, one image or a list file.")],
    vae: Annotated[Path, typer.Option(help="A train-vae run.")],
    decoder: Annotated[Optional[Path], typer.Option(help="Pixel decoder: a train-decoder run or RAE's model.pt "
                                                         "(default: `workspace set decoder`).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("reconstructions"),
    tokens: Annotated[Optional[int], typer.Option(
        "--tokens", "--tokens-kept", help="Keep only the first K latent tokens (the rest zeroed).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder (default: the one that made the VAE's "
                                                        "training features; another one is refused).")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for the encoder.")] = None,
    n: Annotated[Optional[int], typer.Option("-n", "--n", help="Only the first N images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    device: Device = "auto",
    precision: MeasurePrecision = "fp32",
):
    """Images -> DINOv2 -> VAE mu -> VAE decoder -> pixel decoder, side by side with the originals.

    Writes OUT/grid_XXX.png (original | reconstruction pairs), OUT/images/<i>.png (reconstructions,
    for `flatdino fid OUT/images --ref ...`) and OUT/reconstruct.json: per-image PSNR (capped at 100 dB
    for identical images), SSIM (11x11 Gaussian window, on [0,1] RGB, mean over channels) and the
    cosine similarity of decoded vs encoder features, with their means.

    \b
    Examples:
      flatdino reconstruct imagenet/val --vae runs/vae --decoder rae/model.pt -n 64 --out recon
      flatdino reconstruct imagenet/val --vae runs/vae --decoder rae/model.pt -n 64 --tokens 8 --out recon-k8
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.reconstruct import run_reconstruct

    decoder = ws.setting("decoder", decoder)
    if decoder is None:
        raise UserError("reconstruct: pass --decoder, or once per workspace: flatdino workspace set decoder PATH")

    r = run_reconstruct(images, vae, decoder, out, tokens=tokens, encoder=encoder,
                        encoder_weights=str(encoder_weights) if encoder_weights else None, n=n,
                        batch_size=batch_size, rt=_runtime(device, precision, False))
    m = r["mean"]
    typer.echo(f"reconstruct: {r['count']} images, {r['tokens_kept']}/{r['tokens']} tokens: PSNR {m['psnr']:.2f} dB, "
               f"SSIM {m['ssim']:.4f}, feature cosine {m['feature_cosine']:.4f} -> {out / 'reconstruct.json'}")


@command("train-decoder")
def train_decoder(
    images: Annotated[Path, typer.Option(help="Training images (ImageFolder tree or flat folder): the pixel targets.")],
    out: RunOut = None,
    preset: Preset = "decoder-xl",
    encoder: Annotated[Optional[str], typer.Option(help="Frozen encoder run on the fly: dinov2-b-reg4 or tiny "
                                                        "(with --features: only checked against the store).")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for --encoder.")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Feature store of exactly these images (`flatdino "
                                                          "extract`), instead of encoding on the fly.")] = None,
    no_lpips: Annotated[bool, typer.Option("--no-lpips", help="Train without LPIPS (sets loss.lpips=0).")] = False,
    lpips_weights: Annotated[Optional[Path], typer.Option(help="LPIPS v0.1 linear layers (lpips' vgg.pth); "
                                                               "default: the pip lpips package's copy.")] = None,
    vgg_weights: Annotated[Optional[Path], typer.Option(help="torchvision VGG16 weights (vgg16-397923af.pth); "
                                                             "default: torch.hub.get_dir()/checkpoints/.")] = None,
    disc: Annotated[str, typer.Option(help="GAN discriminator: patch (trainable PatchGAN, no weights) or dino-s8 "
                                           "(RAE's frozen DINO ViT-S/8 + trainable heads).")] = "patch",
    disc_weights: Annotated[Optional[Path], typer.Option(help="DINO ViT-S/8 weights for --disc dino-s8 (default: "
                                                              "the HF cache of timm/vit_small_patch8_224.dino).")] = None,
    init: Annotated[Optional[Path], typer.Option(help="Start from this decoder (run or weights file, same "
                                                      "architecture), e.g. FAE's pixel fine-tuning.")] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    sets: SetOpt = None,
    device: Device = "auto",
    precision: Precision = "auto",
    compile: Compile = None,
    resume: Resume = True,
    log_to: LogTo = None,
    new_data: NewData = False,
):
    """Train RAE's pixel decoder (features -> pixels): L1 + LPIPS + adaptive-weight GAN, noise-augmented.

    Features get noise sigma = noise_tau * U(0,1) during training; the discriminator starts at
    loss.disc_start_epoch, the GAN term at loss.gan_start_epoch. No weights are ever downloaded:
    LPIPS needs local VGG16 + LPIPS files (or --no-lpips). Validation logs PSNR on held-out images
    next to the PSNR of the mean training image.

    SIGTERM / SIGUSR1 (cluster preemption): saves checkpoints/latest at the step reached and exits with
    code 75; rerun the same command to continue.

    \b
    Examples:
      flatdino train-decoder --preset decoder-xl --images imagenet/train --features stores/in1k \\
          --lpips-weights vgg.pth --out runs/decoder-xl
      flatdino train-decoder --preset tiny-decoder --images runs/toy --encoder tiny --out runs/toy-decoder
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.stages.decoder import train_decoder as run

    cfg, encoder_weights, out, rt = _train_start(
        "train-decoder", "decoder", "decoder-xl, tiny-decoder, ...", preset, sets, epochs, batch_size, seed, log_to,
        out, device, precision, compile,
        lambda cfg: ws.setting("encoder-weights", encoder_weights) if encoder not in (None, "tiny") else encoder_weights)
    summary = run(cfg, out, rt, images, encoder_name=encoder,
                  encoder_weights=str(encoder_weights) if encoder_weights else None, features=features,
                  no_lpips=no_lpips, lpips_weights=lpips_weights, resume=resume, vgg_weights=vgg_weights,
                  disc=disc, disc_weights=disc_weights, init=init, new_data=new_data)
    if rt.is_main:
        ws.note_run(out, "decoder", preset)
        v = summary["val"]
        psnr = (f", val PSNR {v['psnr']:.2f} dB vs mean image {v['psnr_mean_image']:.2f} dB" if "psnr" in v else "")
        typer.echo(f"train-decoder: {summary['step']} steps{psnr} -> {out}")


@command()
def quickstart(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where everything goes (default: the "
                                                                    "workspace's runs/quickstart).")] = None,
    laminator: Annotated[str, typer.Option(help="flat (FlatDINO, 1-D tokens) or fae (per-patch FAE latents).")] = "flat",
    per_class: Annotated[int, typer.Option(help="Toy images per class (12 classes).")] = 250,
    seed: Annotated[int, typer.Option(help="Seed for data, training and sampling.")] = 0,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Stage override STAGE:key=value with STAGE in vae, dit, decoder "
                      "(e.g. --set vae:train.epochs=10).")] = None,
    device: Device = "cpu",
):
    """The whole pipeline on the embedded toy data in ~10 minutes on a laptop CPU.

    Toy images -> tiny encoder features -> tiny VAE -> latents -> tiny DiT -> tiny pixel decoder ->
    a class-conditional sample grid (one row per class), reconstructions, token-ablation heatmaps,
    the FLOPs table, and the class accuracy of the samples as judged by a small CNN trained on unseen
    real toy images. Rerunning skips finished stages; a killed stage resumes where it stopped.

    \b
    Example:
      flatdino quickstart --out runs/quickstart
    """
    from flatdino_cli import workspace as ws
    from flatdino_cli.quickstart import QuickstartPlan, format_summary, run_quickstart

    if laminator not in ("flat", "fae"):
        raise UserError(f"--laminator {laminator}: use flat or fae")
    for item in sets or []:
        if ":" not in item or item.split(":", 1)[0] not in ("vae", "dit", "decoder"):
            raise UserError(f"--set {item}: expected STAGE:key=value with STAGE in vae, dit, decoder")
    rt = _runtime(device, "auto", False)
    plan = QuickstartPlan(per_class=per_class, laminator=laminator, seed=seed, overrides=tuple(sets or ()))
    summary = run_quickstart(out or ws.root() / "runs" / "quickstart", rt, plan)
    typer.echo(format_summary(summary))


@command()
def fid(
    samples: Annotated[Path, typer.Argument(help="Generated images: a folder of PNG/JPG or an ADM .npz (arr_0).")],
    ref: Annotated[Optional[Path], typer.Option(help="Reference: image folder, ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz, "
                                                     "its mu/sigma used when present) or clean-fid statistics .npz "
                                                     "(default: `workspace set reference-batch`).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(
        help="clean-fid's inception-2015-12-05.pt (default: ~/.cache/flatdino/, or $XDG_CACHE_HOME/flatdino/).")] = None,
    dino: Annotated[Optional[str], typer.Option(help="Also FD-DINOv2 with this encoder (dinov2-b-reg4 or tiny).")] = None,
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local weights for --dino.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per Inception forward.")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full JSON instead of a summary.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON here.")] = None,
    device: Device = "auto",
):
    """gFID / rFID and friends: FID, sFID, Inception Score, precision/recall (k=3), FD-DINOv2.

    Inception features follow the ADM evaluator (TF-Inception resize inside the network), so numbers
    are comparable with papers that use ADM's suite. Reference statistics are computed once and
    cached beside the reference, keyed by a hash of its contents; extraction resumes if killed.

    \b
    Examples:
      flatdino fid runs/dit/samples/all-n50000 --ref VIRTUAL_imagenet256_labeled.npz
      flatdino fid runs/recon-val/images --ref runs/recon-val/originals --json   (rFID)
    """
    import json

    from flatdino_cli import workspace as ws
    from flatdino_cli.analysis.fid import run_fid
    from flatdino_cli.runtime import resolve_device

    ref = ws.setting("reference-batch", ref)
    if ref is None:
        raise UserError("fid: pass --ref, or once per workspace: flatdino workspace set reference-batch REF.npz")
    inception_weights = ws.setting("inception-weights", inception_weights)

    dev = resolve_device(device)
    dino_encoder = None
    if dino:
        from flatdino_cli.encoders import load_encoder

        dino_encoder = load_encoder(dino, str(encoder_weights) if encoder_weights else None, device=dev)
    result = run_fid(samples, ref, inception_weights=inception_weights, batch_size=batch_size, device=str(dev),
                     dino_encoder=dino_encoder, json_out=out)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    for key in ("fid", "sfid", "is", "precision", "recall", "fd_dinov2"):
        if result.get(key) is not None:
            typer.echo(f"{key:10s} {result[key]:.4f}")
    for note in result.get("notes", []):
        typer.echo(f"note: {note}")


@command("eval")
def eval_(
    runs: Annotated[list[Path], typer.Argument(help="train-dit runs (each kept checkpoint, oldest first, then "
                                                    "latest) or RAE's stage2_model.pt files.")],
    reference: Annotated[Optional[Path], typer.Option(help=(
        "Validation feature store of the encoder the DiT generates for (default: the one the run was evaluated "
        "against in training, else its training data's FEATURES/val). Required for an RAE checkpoint."))] = None,
    samples: Annotated[int, typer.Option(help="Class-balanced samples per checkpoint (0: 2,000 on CUDA, 240 on the "
                                              "CPU, as train-dit). Compare numbers made with the same count.")] = 0,
    seed: Annotated[int, typer.Option(help="The samples' noise (train-dit's eval.seed is 0).")] = 0,
    nocfg: Annotated[bool, typer.Option("--nocfg/--no-nocfg", help="Also fd_rep_nocfg (unguided; twice the cost).")] = True,
    vae: Annotated[Optional[Path], typer.Option(help="VAE run (default: the one recorded with the DiT's latents).")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="RAE's stat.pt for an RAE checkpoint (default: beside it).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per sampler batch.")] = 256,
    out: Annotated[Optional[Path], typer.Option(help="Also write every row as JSON here.")] = None,
    device: Device = "auto",
    precision: MeasurePrecision = "fp32",
):
    """fd_rep after the fact: the quality number train-dit logs, for a run's checkpoints or RAE's DiT.

    Samples with the DiT's own sampler setting (its flow section), maps the samples into the encoder's
    feature space (VAE decoder, or de-normalisation for RAE grids) and computes the Frechet distance to the
    reference store's statistics (see `flatdino_cli/evaluate.py`: no pixel decoder, not Inception FID).
    Results are cached in RUN/fd_rep.json; a rerun computes only new checkpoints. Keep checkpoints during
    training with --set train.keep_every_steps=N. Runs under torchrun: each rank samples its share.

    \b
    Examples:
      flatdino eval runs/dit-xl-32x128 runs/dit-dh-xl-32x128
      flatdino eval models/DiTs/.../DiTDH-XL/stage2_model.pt --reference stores/imagenet-val --samples 2000
    """
    from flatdino_cli.evaluate import FD_REP, FD_REP_NOCFG, evaluate_checkpoints
    from flatdino_cli.utils import atomic_write_json

    rt = _runtime(device, precision, False)
    rows = []
    for run in runs:
        for row in evaluate_checkpoints(run, reference, samples, seed, batch_size, nocfg, stats, vae, rt=rt):
            rows.append({"run": str(run), **row})
            if rt.is_main:
                where = f"{row['checkpoint']} (step {row['step']:,})" if row["step"] is not None else "RAE checkpoint"
                extra = f", {FD_REP_NOCFG} {row[FD_REP_NOCFG]:.4g}" if FD_REP_NOCFG in row else ""
                typer.echo(f"eval: {run} {where}: {FD_REP} {row[FD_REP]:.4g}{extra} ({row['samples']} samples vs "
                           f"{row['reference']})")
    if out is not None and rt.is_main:
        atomic_write_json(out, rows)
        typer.echo(f"eval: {len(rows)} rows -> {out}")


@command()
def sweep(
    dit: Annotated[Path, typer.Argument(help="A train-dit run or RAE's stage2_model.pt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of sweep.json (resumable), sweep.md, sweep.png.")],
    cfg: Annotated[Optional[str], typer.Option("--cfg", help="Guidance scales, e.g. 1,1.5,2,3,4.5 (default: the DiT's).")] = None,
    interval: Annotated[Optional[str], typer.Option(help="Guidance intervals LO,HI separated by ';', e.g. '0,1;0.225,1'.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Sampler steps, e.g. 10,25,50.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Samplers, e.g. euler,heun,ab2,sde (see `sample --help`).")] = None,
    shift: Annotated[Optional[str], typer.Option(help="Time-grid shifts, e.g. 1,3.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Validation feature store (default: as `flatdino eval`).")] = None,
    samples: Annotated[int, typer.Option(help="Samples per point (0: 2,000 on CUDA, 240 on the CPU).")] = 0,
    seed: Annotated[int, typer.Option(help="The samples' noise: the same images at every point.")] = 0,
    vae: Annotated[Optional[Path], typer.Option(help="VAE run (default: the one recorded with the DiT's latents).")] = None,
    stats: Annotated[Optional[Path], typer.Option(help="RAE's stat.pt for an RAE checkpoint (default: beside it).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per sampler batch.")] = 256,
    device: Device = "auto",
    precision: MeasurePrecision = "fp32",
):
    """Score a grid of sampler knobs (guidance scale and interval, steps, sampler, shift) with fd_rep.

    Every point samples the same class-balanced images (same noise) and scores them as `flatdino eval`
    does (guided only); network evaluations per image and images/s are written beside each point. A point
    already in OUT/sweep.json is not computed again, so a killed or extended sweep reruns cheaply. The
    cfg axis is the paper's Figure 14. No pixel FID: fd_rep only (see `flatdino eval --help`).

    \b
    Examples:
      flatdino sweep runs/dit-xl-32x128 --out sweeps/cfg --cfg 1,1.5,2,3,4.5,6
      flatdino sweep runs/dit-xl-32x128 --out sweeps/nfe --sampler euler,heun,ab2 --steps 10,15,20,25,50
    """
    from flatdino_cli.sweep import parse_grid, run_sweep

    grid = parse_grid(cfg, interval, steps, sampler, shift)
    r = run_sweep(dit, out, grid, reference, samples, seed, batch_size, vae, stats, _runtime(device, precision, False))
    best = min(r["points"], key=lambda p: p["fd_rep"])
    typer.echo(f"sweep: {len(r['points'])} points, best fd_rep {best['fd_rep']:.4g} (cfg {best['cfg']:g}, "
               f"{best['sampler']} {best['steps']} steps, {best['nfe']} evaluations per image) -> "
               f"{r.get('table')}, {r.get('figure')}")


def main():  # pragma: no cover - the `flatdino` console script and `python -m flatdino_cli.cli`
    from flatdino_cli.cpu import apply_cpu_defaults

    apply_cpu_defaults()  # how OpenMP threads wait (cpu.py): before any command imports torch
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""presets, workspace, export, export-rae, info, quickstart, compare: around the runs, and the two commands
that run the others.

Imports inside the commands keep `flatdino --help` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli.cli.common import Device, ModelOption, Precision, SetOpt, runtime
from flatdino_cli.errors import UserError
from flatdino_cli.utils import comma_list


def presets_list(ctx: typer.Context):
    """List the presets shipped with flatdino.

    \b
    Examples:
      flatdino presets
      flatdino presets show vae-32x128 --set model.tokens=64
    """
    if ctx.invoked_subcommand is None:
        from flatdino_cli.config_yaml import list_presets, load_preset  # startup

        for name in list_presets():
            try:
                stage = load_preset(name).stage
            except UserError as e:
                stage = f"BROKEN: {e}"
            typer.echo(f"{name:24s} {stage}")


def presets_show(name: Annotated[str, typer.Argument(help="Preset name or YAML file.")], sets: SetOpt = None):
    """Print a preset fully resolved (YAML) and the parameter count of the models it builds."""
    import yaml  # startup

    from flatdino_cli.config_yaml import load_preset, to_dict  # startup
    from flatdino_cli.models import count_parameters  # startup

    cfg = load_preset(name, list(sets or []))
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    for part, n in count_parameters(cfg).items():
        typer.echo(f"# parameters, {part}: {n:,} ({n / 1e6:.1f}M)")


def workspace_list(ctx: typer.Context):
    """List the workspace's runs and stores, newest first: stage, preset, progress, best metric, size and
    what each was made from (store -> VAE -> latents -> DiT).

    Example: flatdino workspace; flatdino --workspace ~/flatdino-in1k workspace
    """
    if ctx.invoked_subcommand is None:
        from flatdino_cli.workspace.listing import listing  # startup

        typer.echo(listing())


def workspace_set(key: Annotated[str, typer.Argument(help="decoder, encoder-weights, inception-weights or "
                                                          "reference-batch.")],
                  value: Annotated[str, typer.Argument(help="A file or folder (none clears the key).")]):
    """Set a workspace default that commands use when the option is not given.

    Example: flatdino workspace set decoder rae/decoders/dinov2/wReg_base/ViTXL_n08/model.pt
    """
    from flatdino_cli.workspace.settings import set_setting  # startup

    typer.echo(set_setting(key, value))


def export(
    run: Annotated[Path, typer.Argument(help="A train-vae, train-dit or train-decoder run directory.")],
    out: Annotated[Path, typer.Argument(help="The model folder to write (upload it with `hf upload ORG/NAME OUT`).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at OUT.")] = False,
    format: Annotated[str, typer.Option("--format", help="flatdino (any run) or diffusers (a train-decoder run "
                                                         "with its encoder, as an AutoencoderRAE folder).")] = "flatdino",
    encoder_weights: Annotated[Optional[Path], typer.Option(help="(diffusers) The encoder weights the decoder was "
                                                                 "trained on, when inputs.json cannot find them.")] = None,
    stats: ModelOption(help="(diffusers) Latent statistics to include: RAE's stat.pt, an rae-* run's stats.pt or an "
                       "AutoencoderRAE folder.") = None,
    vae: ModelOption(help="(diffusers, DiT runs) The VAE run (default: the one in inputs.json; none for rae-* "
                     "runs).") = None,
    decoder: ModelOption(help="(diffusers, DiT runs) The pixel decoder to ship.") = None,
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
    from flatdino_cli.export import export_diffusers, export_run  # startup

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


def export_rae(
    run: Annotated[Path, typer.Argument(help="A train-dit run on a square 2-D grid (rae-* presets).")],
    out: Annotated[Path, typer.Argument(help="Output .pt: a raw state dict for RAE's own model class.")],
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="EMA weights (default) or the raw ones.")] = True,
):
    """Write a DiT run as an RAE stage-2 checkpoint (RAE's key names and time frame), loadable by RAE's
    LightningDiT / DiTwDDTHead with strict=True; prints the model params for RAE's config.

    Example: flatdino export-rae runs/rae-dh-xl models/DiTs/ours/stage2_model.pt
    """
    import json  # startup

    from flatdino_cli.export import export_rae as export  # startup

    params = export(run, out, ema)
    typer.echo(f"export-rae: {out} ({params.pop('target')}) params: {json.dumps(params)}")


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
    import json  # startup

    from flatdino_cli.info import describe  # startup

    facts = describe(path)
    if json_out:
        typer.echo(json.dumps(dict(facts), indent=2))
        return
    for label, value in facts:
        typer.echo(f"{label:12s} {value}")


def quickstart(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where everything goes (default: the "
                                                                    "workspace's runs/quickstart).")] = None,
    laminator: Annotated[str, typer.Option(help="flat (FlatDINO, 1-D tokens) or fae (per-patch FAE latents).")] = "flat",
    encoder: Annotated[Optional[str], typer.Option(
        help="tiny-p4 (patch 4: 12x12 patches, `compare`'s grid; the default for flat) or tiny (patch 8: 6x6 "
             "patches, the default for fae; flat samples named right about 4 points less often; see the README).",
        show_default=False)] = None,
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
    from flatdino_cli.workspace.paths import root  # startup
    from flatdino_cli.quickstart import QuickstartPlan, format_summary, run_quickstart  # startup

    plan = QuickstartPlan(per_class=per_class, laminator=laminator, seed=seed, overrides=tuple(sets or ()),
                          encoder=encoder)
    summary = run_quickstart(out or root() / "runs" / "quickstart", runtime(device, "auto", False), plan)
    typer.echo(format_summary(summary))


def compare(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder of the runs, compare.json, compare.md and "
                                                                    "compare.png (resumable; default: the workspace's "
                                                                    "runs/compare).")] = None,
    budget: Annotated[float, typer.Option(help="Training FLOPs per generator, counted as `flatdino plot --x flops` does "
                                               "(0: 8e12 in toy mode; required with --features).")] = 0.0,
    methods: Annotated[str, typer.Option(help="Generators to train: flatdino, rae, fae.")] = "flatdino,rae,fae",
    features: Annotated[Optional[Path], typer.Option(help="Feature store with a val/ split (ImageNet: the GPU experiment); "
                                                          "default: toy images through the tiny encoder at patch 4.")] = None,
    vae: ModelOption(help="FlatDINO VAE run for --features (toy mode trains one).") = None,
    fae: Annotated[Optional[Path], typer.Option(help="FAE laminator run for --features (toy mode trains one).")] = None,
    preset: Annotated[Optional[list[str]], typer.Option(help="METHOD=PRESET, repeatable (defaults: tiny-dit, tiny-rae-dit, "
                                                             "tiny-fae-dit; with --features xl-32x128, rae-xl-256x768, fae-xl-16x16x32).")] = None,
    evals: Annotated[int, typer.Option(help="fd_rep evaluations per generator, at equal fractions of the budget "
                                            "(0: 5 in toy mode, 20 with --features).")] = 0,
    eval_samples: Annotated[int, typer.Option(help="Samples per evaluation (0: 192 in toy mode; with --features "
                                                   "2,000 on CUDA, 240 on the CPU).")] = 0,
    sets: SetOpt = None,
    per_class: Annotated[int, typer.Option(help="Toy images per class (toy mode).")] = 250,
    seed: Annotated[int, typer.Option(help="Training and evaluation seed of every run.")] = 0,
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Train FlatDINO's, the RAE grid's and FAE's generators for the same training FLOPs and compare them.

    The same DiT size on the same images: FlatDINO on flat latent tokens, RAE on the encoder's whole
    feature grid, FAE on per-patch latents. Each is evaluated with fd_rep (see `flatdino eval --help`)
    against the same validation features at equal fractions of the budget. Writes OUT/compare.md
    (FLOPs to reach a quality level, fd_rep at the budget, samples/s) and OUT/compare.png (fd_rep
    against training FLOPs). Toy mode (no --features) makes its own data and laminators and evaluates
    unguided with ab2 at 20 steps; killed, it resumes where it stopped. --set goes to every generator,
    or to one run with a prefix: dit-rae:train.lr=1e-4, vae-flatdino:train.epochs=12.

    \b
    Examples:
      flatdino compare --out runs/compare
      flatdino compare --features stores/in1k --vae runs/vae-32x128 --fae runs/fae-16x16x32 --budget 1e19 --out runs/compare-in1k
    """
    from flatdino_cli.workspace.paths import root  # startup
    from flatdino_cli.compare import CompareConfig, format_report, run_compare  # startup

    pairs = tuple(tuple(p.split("=", 1)) for p in preset or [])
    if any(len(p) != 2 for p in pairs):
        raise UserError("--preset: give METHOD=PRESET, e.g. --preset rae=rae-xl-256x768")
    cfg = CompareConfig(budget=budget, methods=tuple(comma_list(methods, "--methods")), presets=pairs,
                        features=str(features) if features else None, vae=str(vae) if vae else None,
                        fae=str(fae) if fae else None, evals=evals, eval_samples=eval_samples,
                        sets=tuple(sets or ()), per_class=per_class, seed=seed)
    report = run_compare(out or root() / "runs" / "compare", cfg, runtime(device, precision, None))
    typer.echo(format_report(report))

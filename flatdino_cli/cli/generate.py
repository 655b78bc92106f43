"""sample, sweep, eval, fid, reconstruct: images from a DiT, and how good they are.

Imports inside the commands keep `flatdino --help` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli.cli.common import Device, MeasurePrecision, ModelOption, runtime
from flatdino_cli.errors import UserError
from flatdino_cli.utils import comma_list

# eval and sweep score DiT checkpoints alike
ScoredVae = ModelOption(help="VAE run (default: the one recorded with the DiT's latents).")
ScoredStats = ModelOption(help="RAE's stat.pt for an RAE checkpoint (default: beside it).")
# sample, sweep and eval: the paper's sampler instead of the DiT's (measured) default
PaperSampler = Annotated[bool, typer.Option("--paper-sampler", help=(
    "Sample with the paper's sampler and steps for this DiT's family (flow.paper_sampler / flow.paper_steps: "
    "Euler 50; FAE's presets Euler 250), to reproduce its numbers, instead of the measured default "
    "(flow.sampler / flow.steps)."))]


def sample(
    dit: ModelOption(help="A train-dit run (FlatDINO latents or an rae-* baseline), or RAE's released stage2_model.pt (or "
                     "its folder); default: the workspace's newest finished run.") = None,
    decoder: ModelOption(help="Pixel decoder: a train-decoder run or RAE's model.pt (default: `workspace set decoder`, else "
                         "the newest train-decoder run).") = None,
    vae: ModelOption(help="The VAE run the DiT's latents came from (default: the one recorded in DIT/inputs.json; none for "
                     "rae-* runs).") = None,
    stats: ModelOption(help="RAE's stat.pt for a normalising DiT (default: RUN/stats.pt, or stat.pt beside an RAE "
                       "checkpoint).") = None,
    guide: ModelOption(help="AutoGuidance: a weaker DiT (run or RAE file) on the same latents and classes; needs "
                       "--guide-scale.") = None,
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
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (default: flow.steps).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help=(
        "euler, heun (2 evaluations a step), ab2 / ab3 (Adams-Bashforth multistep, one evaluation a step), "
        "dopri5 (torchdiffeq's adaptive solver; `pip install flatdino[ode]`) or sde (Euler-Maruyama on the "
        "reverse SDE, SiT's sampler; FAE's unguided numbers use it with --steps 250 --cfg 1). "
        "Default: flow.sampler."))] = None,
    paper_sampler: PaperSampler = False,
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
    from flatdino_cli.config import SampleConfig  # startup
    from flatdino_cli.pipeline.options import parse_interval, parse_schedule  # startup
    from flatdino_cli.sample import run_sample  # startup
    from flatdino_cli.workspace.pick import pick_sample  # startup

    dit, vae, decoder = pick_sample(dit, vae, decoder)
    names = list(class_ or [])
    all_classes = classes is not None and classes.strip().lower() == "all"
    if classes is not None and not all_classes:
        names += comma_list(classes, "--classes", allow_empty=True)
    rt = runtime(device, precision, compile)
    m = run_sample(SampleConfig(
        dit, vae, decoder, stats=stats, guide=guide, ema=ema, classes=names, all_classes=all_classes, n=n,
        per_class=per_class, cfg_scale=cfg, guide_scale=guide_scale, steps=steps, sampler=sampler,
        paper_sampler=paper_sampler, interval=parse_interval(interval), grid=grid, schedule=parse_schedule(cfg_schedule),
        shift=shift, seed=seed, out=out, batch_size=batch_size, shard_size=shard_size), rt)
    flow = m["identity"]["flow"]
    guidance = "autoguidance" if m["identity"].get("guide") else "cfg"
    weights = (" / ".join(f"{w:g} on [{lo:g}, {hi:g})" for lo, hi, w in flow["cfg_schedule"])
               if flow.get("cfg_schedule") else f"{flow['cfg_scale']:g}")
    nfe = m.get("network_evaluations")
    setting = "the paper's " if paper_sampler else ""
    typer.echo(f"sample: {m['identity']['count']} images ({guidance} {weights}, {setting}{flow['sampler']} "
               f"{flow['steps']} steps, {'?' if nfe is None else format(nfe, 'g')} network evaluations per image, seed "
               f"{m['identity']['seed']}) -> {m['out']}/{m['npz']}, {m['out']}/grid.png")


def reconstruct(
    images: Annotated[Path, typer.Argument(help="Images: a folder, an ImageFolder tree, one image or a list file.")],
    vae: Annotated[Path, typer.Option(help="A train-vae run.")],
    decoder: ModelOption(help="Pixel decoder: a train-decoder run or RAE's model.pt (default: `workspace set "
                         "decoder`).") = None,
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
    from flatdino_cli.reconstruct import ReconstructConfig, run_reconstruct  # startup
    from flatdino_cli.workspace.settings import setting  # startup

    decoder = setting("decoder", decoder)
    if decoder is None:
        raise UserError("reconstruct: pass --decoder, or once per workspace: flatdino workspace set decoder PATH")

    rt = runtime(device, precision, False)
    cfg = ReconstructConfig(images, vae, decoder, out, tokens=tokens, encoder=encoder,
                            encoder_weights=str(encoder_weights) if encoder_weights else None, n=n,
                            batch_size=batch_size)
    r = run_reconstruct(cfg, rt)
    m = r["mean"]
    typer.echo(f"reconstruct: {r['count']} images, {r['tokens_kept']}/{r['tokens']} tokens: PSNR {m['psnr']:.2f} dB, "
               f"SSIM {m['ssim']:.4f}, feature cosine {m['feature_cosine']:.4f} -> {out / 'reconstruct.json'}")


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
    import json  # startup

    from flatdino_cli.analysis.fid import dino_encoder, run_fid  # startup
    from flatdino_cli.runtime import resolve_device  # startup
    from flatdino_cli.workspace.settings import setting  # startup

    ref = setting("reference-batch", ref)
    if ref is None:
        raise UserError("fid: pass --ref, or once per workspace: flatdino workspace set reference-batch REF.npz")
    inception_weights = setting("inception-weights", inception_weights)
    dev = resolve_device(device)
    result = run_fid(samples, ref, inception_weights=inception_weights, batch_size=batch_size, device=str(dev),
                     dino_encoder=dino_encoder(dino, encoder_weights, dev), json_out=out)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    for key in ("fid", "sfid", "is", "precision", "recall", "fd_dinov2"):
        if result.get(key) is not None:
            typer.echo(f"{key:10s} {result[key]:.4f}")
    for note in result.get("notes", []):
        typer.echo(f"note: {note}")


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
    paper_sampler: PaperSampler = False,
    vae: ScoredVae = None,
    stats: ScoredStats = None,
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
    from flatdino_cli.evaluate import FD_REP, FD_REP_NOCFG, ScoreConfig, evaluate_checkpoints  # startup
    from flatdino_cli.utils import atomic_write_json  # startup

    rt = runtime(device, precision, False)
    cfg = ScoreConfig(reference=reference, samples=samples, seed=seed, batch_size=batch_size, vae_run=vae, stats=stats,
                      paper_sampler=paper_sampler)
    rows = []
    for run in runs:
        for row in evaluate_checkpoints(run, cfg, nocfg, rt=rt):
            rows.append({"run": str(run), **row})
            if rt.is_main:
                where = f"{row['checkpoint']} (step {row['step']:,})" if row["step"] is not None else "RAE checkpoint"
                extra = f", {FD_REP_NOCFG} {row[FD_REP_NOCFG]:.4g}" if FD_REP_NOCFG in row else ""
                typer.echo(f"eval: {run} {where}: {FD_REP} {row[FD_REP]:.4g}{extra} ({row['samples']} samples vs "
                           f"{row['reference']})")
    if out is not None and rt.is_main:
        atomic_write_json(out, rows)
        typer.echo(f"eval: {len(rows)} rows -> {out}")


def sweep(
    dit: Annotated[Path, typer.Argument(help="A train-dit run or RAE's stage2_model.pt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of sweep.json (resumable), sweep.md, sweep.png.")],
    cfg: Annotated[Optional[str], typer.Option("--cfg", help="Guidance scales, e.g. 1,1.5,2,3,4.5 (default: the DiT's).")] = None,
    interval: Annotated[Optional[str], typer.Option(help="Guidance intervals LO,HI separated by ';', e.g. '0,1;0.225,1'.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Sampler steps, e.g. 10,25,50.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Samplers, e.g. euler,heun,ab2,sde (see `sample --help`).")] = None,
    shift: Annotated[Optional[str], typer.Option(help="Time-grid shifts, e.g. 1,3.")] = None,
    paper_sampler: PaperSampler = False,
    reference: Annotated[Optional[Path], typer.Option(help="Validation feature store (default: as `flatdino eval`).")] = None,
    samples: Annotated[int, typer.Option(help="Samples per point (0: 2,000 on CUDA, 240 on the CPU).")] = 0,
    seed: Annotated[int, typer.Option(help="The samples' noise: the same images at every point.")] = 0,
    vae: ScoredVae = None,
    stats: ScoredStats = None,
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
    from flatdino_cli.evaluate import ScoreConfig  # startup
    from flatdino_cli.sweep import parse_grid, run_sweep  # startup

    grid = parse_grid(cfg, interval, steps, sampler, shift)
    score = ScoreConfig(reference=reference, samples=samples, seed=seed, batch_size=batch_size, vae_run=vae,
                        stats=stats, paper_sampler=paper_sampler)
    r = run_sweep(dit, out, grid, score, runtime(device, precision, False))
    best = min(r["points"], key=lambda p: p["fd_rep"])
    typer.echo(f"sweep: {len(r['points'])} points, best fd_rep {best['fd_rep']:.4g} (cfg {best['cfg']:g}, "
               f"{best['sampler']} {best['steps']} steps, {best['nfe']} evaluations per image) -> "
               f"{r.get('table')}, {r.get('figure')}")

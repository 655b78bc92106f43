"""ablate-tokens, pca, knn, noise, redundancy, flops, plot: the paper's analyses, a JSON and a figure each.

Imports inside the commands keep `flatdino --help` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flatdino_cli.cli.common import Device, MeasurePrecision, ModelOption, Precision, runtime
from flatdino_cli.utils import comma_list

AnalysisOut = Annotated[Path, typer.Option("--out", "-o", help="Output folder for the JSON, figures and arrays.")]


def ablate_tokens(
    vae: ModelOption(help="A train-vae run directory (default: the workspace's newest finished one).") = None,
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
    from flatdino_cli.workspace.pick import pick_ablate  # startup
    from flatdino_cli.analysis.ablate import AblateConfig, run_ablate  # startup

    vae, features = pick_ablate(vae, features)
    out = out or vae / "analysis" / "ablation"

    cfg = AblateConfig(vae, features, out, n=n, batch_size=batch_size, unit_batch=unit_batch, example=example)
    r = run_ablate(cfg, runtime(device, precision, False))
    typer.echo(f"ablate-tokens: {r['units']} {r['unit']}s x {r['num_patches']} patches over {r['n_images']} images "
               f"-> {out / r['figure']}")


def pca(
    features: Annotated[Path, typer.Option(help="Feature store (its first N images are analysed).")],
    images: Annotated[Optional[Path], typer.Option(help="Images for the pixel-patch source (default: the "
                                                        "store's own source files, when readable).")] = None,
    vae: ModelOption(help="A train-vae run: also analyse decode(mu) features.") = None,
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
    from flatdino_cli.analysis.pca import PCAConfig, run_pca  # startup

    cfg = PCAConfig(features, out, images=images, vae_run=vae, n=n, batch_size=batch_size, max_vectors=max_vectors,
                    chunk_size=chunk_size, workers=workers)
    r = run_pca(cfg, runtime(device, precision, False))
    for name, s in r["sources"].items():
        typer.echo(f"pca: {name:7s} D={s['dim']:4d}  95%: {s['dims']['0.95']:4d}  99%: {s['dims']['0.99']:4d}  "
                   f"({s['n_vectors']} vectors)")
    typer.echo(f"pca: -> {out / 'pca.json'}, {out / r['figure']}")


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
    from flatdino_cli.analysis.knn import KNNConfig, run_knn  # startup

    cfg = KNNConfig(latents, out, val=val, ks=tuple(comma_list(k, "--k", int)), temperature=temperature,
                    val_count=val_count, seed=seed, batch_size=batch_size)
    r = run_knn(cfg, runtime(device, "fp32", False))
    for kk, acc in r["k"].items():
        typer.echo(f"knn: k={kk:>4s} top-1 {acc['top1']:6.2f}%  top-5 {acc['top5']:6.2f}%")
    typer.echo(f"knn: {r['n_train']} train / {r['n_val']} val -> {out / 'knn.json'}, {out / r['figure']}")


def noise(
    vae: Annotated[Path, typer.Option(help="A train-vae run directory.")],
    features: Annotated[Path, typer.Option(help="Feature store (its first N images are used).")],
    decoder: ModelOption(help="Pixel decoder (run dir or RAE model.pt): adds rFID and PSNR against the original "
                         "images.") = None,
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
    from flatdino_cli.analysis.noise import NoiseConfig, run_noise  # startup

    cfg = NoiseConfig(vae, features, out, sigmas=tuple(comma_list(sigmas, "--sigmas", float)), n=n,
                      batch_size=batch_size, decoder=decoder, seed=seed, inception_weights=inception_weights)
    r = run_noise(cfg, runtime(device, precision, False))
    lat = r["latent"]
    for i, s in enumerate(r["sigmas"]):
        extra = "".join(f"  {name} {lat[key][i]:.4g}" for key, name in (("rfid", "rFID"), ("psnr_vs_image", "PSNR"))
                        if lat.get(key) and lat[key][i] is not None)
        typer.echo(f"noise: sigma {s:4.2f}{extra}  cosine vs clean decode {lat['cosine_vs_clean'][i]:.4f}")
    for note in r["notes"]:
        typer.echo(f"noise: {note}")
    typer.echo(f"noise: -> {out / 'noise.json'}, {out / r['figure']}")


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
    from flatdino_cli.analysis.redundancy import RedundancyConfig, run_redundancy  # startup

    cfg = RedundancyConfig(features, out, n=n, bins=bins, max_distance=max_distance, batch_size=batch_size)
    r = run_redundancy(cfg, runtime(device, "fp32", False))
    if r.get("note"):
        typer.echo(f"redundancy: {r['note']}")
    typer.echo(f"redundancy: {r['n_images']} images -> {out / 'redundancy.json'}, {out / r['figure']}")


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
    import json  # startup

    from flatdino_cli.analysis import flops as F  # startup

    sizes = comma_list(batches, "--batches", int) if measure else None
    rt = runtime(device, precision, False) if measure else None
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
    from flatdino_cli.analysis.curves import plot_runs  # startup

    r = plot_runs(runs, out, labels=label or (), axis=x, smoothing=smooth, title=title)
    typer.echo(f"plot: {len(r['runs'])} run(s), panels {', '.join(r['panels'])} -> {r['out']}")

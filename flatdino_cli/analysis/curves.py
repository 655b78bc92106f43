"""`flatdino plot`: training curves of one or more runs, overlaid, from their metrics.jsonl.

Panels (only those some run has data for): training loss (EMA-smoothed, raw faint), the DiT's loss
per t-bucket, the learning rate, each validation metric, and fd_rep (train-dit's evaluations: guided
solid, unguided dashed). The x axis is optimizer steps, or
training compute from the FLOPs module (DiT runs): step x global batch x FLOPs per image, the
paper's convention (1 multiply-add = 1 FLOP; 3 x forward + encoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker
import numpy as np

from flatdino_cli.analysis.flops import dit_step_flops
from flatdino_cli.errors import UserError
from flatdino_cli.evaluate import FD_REP, FD_REP_NOCFG
from flatdino_cli.rundir import is_run_dir, read_metrics, run_config, run_inputs
from flatdino_cli.viz import new_figure, save_figure

VAL_ORDER = ("loss", "psnr", "cosine", "huber", "kl_per_token")  # first val panels; the rest follow
MAX_VAL_PANELS = 3
RUN_STYLES = ("-", "--", ":", "-.")
FLOP_UNITS = ((1e18, "EFLOPs"), (1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1.0, "FLOPs"))


@dataclass
class RunCurves:
    label: str
    stage: str
    train: list[dict] = field(default_factory=list)  # rows with "loss"
    val: list[dict] = field(default_factory=list)  # rows with "val/..."
    quality: list[dict] = field(default_factory=list)  # train-dit's evaluation rows (fd_rep, ...)
    flops_per_step: float | None = None

    def x(self, rows: list[dict], axis: str) -> np.ndarray:
        steps = np.array([r["step"] for r in rows], dtype=float)
        return steps * self.flops_per_step if axis == "flops" else steps


def smooth(y: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (weight 0 = raw)."""
    out, avg = [], 0.0
    for i, v in enumerate(y, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return np.array(out)


def _vae_of_dit_run(run_dir: Path) -> Any | None:
    """The VAE config a latent DiT was trained on (via inputs.json), None for a raw-feature (RAE) run."""
    latents = run_inputs(run_dir).get("latents", {})
    if latents.get("kind") == "features":
        return None
    vae_run = latents.get("identity", {}).get("vae_run")
    if vae_run is None or not is_run_dir(vae_run):
        raise UserError(f"{run_dir}: --x flops needs the VAE run its latents came from ({vae_run or 'not recorded'}) "
                        "to count the encoder; plot against --x steps instead")
    return run_config(vae_run, "vae")


def flops_per_step(run_dir: Path, cfg: Any) -> float:
    """Training FLOPs of one optimizer step of a DiT run (analysis/flops.py: dit_step_flops)."""
    if cfg.stage != "dit":
        raise UserError(f"{run_dir}: a {cfg.stage} run; --x flops is for train-dit runs (use --x steps)")
    vae = _vae_of_dit_run(run_dir)
    return dit_step_flops(cfg, vae.model if vae is not None else None)


def load_curves(run_dir: str | Path, label: str, axis: str) -> RunCurves:
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: has no metrics.jsonl rows yet; train it first")
    curves = RunCurves(label, cfg.stage, [r for r in rows if "loss" in r],
                       [r for r in rows if any(k.startswith("val/") for k in r)],
                       [r for r in rows if FD_REP in r or FD_REP_NOCFG in r])
    if axis == "flops":
        curves.flops_per_step = flops_per_step(run_dir, cfg)
    return curves


def flop_unit(values: float) -> tuple[float, str]:
    return next((s, u) for s, u in FLOP_UNITS if values >= s or s == 1.0)


def _val_keys(runs: list[RunCurves]) -> list[str]:
    keys = dict.fromkeys(k[4:] for r in runs for row in r.val for k in row if k.startswith("val/"))
    ordered = [k for k in VAL_ORDER if k in keys] + [k for k in keys if k not in VAL_ORDER]
    return ordered[:MAX_VAL_PANELS]


def _bucket_keys(runs: list[RunCurves]) -> list[str]:
    return sorted(dict.fromkeys(k for r in runs for row in r.train for k in row if k.startswith("loss_t")))


def _series(rows: list[dict], key: str, run: RunCurves, axis: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in rows if key in r]
    return run.x(rows, axis), np.array([r[key] for r in rows], dtype=float)


def _log_if_wide(ax, values: list[np.ndarray]) -> None:
    v = np.concatenate([x[np.isfinite(x)] for x in values]) if values else np.array([])
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ax.set_yscale("log")


def plot_runs(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] = (), axis: str = "steps",
              smoothing: float = 0.9, title: str | None = None) -> dict:
    """Draw the curves of `runs` into one PNG at `out`; returns {out, panels, runs}."""
    if axis not in ("steps", "flops"):
        raise UserError(f"--x {axis}: use steps or flops")
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smooth {smoothing}: must be in [0, 1)")
    if labels and len(labels) != len(runs):
        raise UserError(f"--label given {len(labels)} times for {len(runs)} runs; give one per run or none")
    labels = list(labels) or default_labels(runs)
    curves = [load_curves(r, label, axis) for r, label in zip(runs, labels)]

    scale, unit = 1.0, ""
    if axis == "flops":
        scale, unit = flop_unit(max(c.flops_per_step * max([r["step"] for r in c.train] or [1]) for c in curves))
    xlabel = "optimizer steps" if axis == "steps" else f"training compute ({unit})"
    panels = (["loss"] + (["buckets"] if _bucket_keys(curves) else []) + ["lr"] + [f"val/{k}" for k in _val_keys(curves)]
              + ([FD_REP] if any(c.quality for c in curves) else []))
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig = new_figure(3.4 * cols, 2.7 * rows_n + (0.3 if title else 0), dpi=200)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    first = None
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows_n, cols, i + 1, sharex=first)  # one x range: val points line up with training
        first = first or ax
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        drawn = []
        if panel == "loss":
            for c, color in zip(curves, colors):
                x, y = _series(c.train, "loss", c, axis)
                ax.plot(x / scale, y, color=color, alpha=0.25, linewidth=0.7)
                ax.plot(x / scale, smooth(y, smoothing), color=color, linewidth=1.6, label=c.label)
                drawn.append(y)
            ax.set_title("training loss", fontsize=9)
        elif panel == "buckets":
            keys = _bucket_keys(curves)
            cmap = matplotlib.colormaps["viridis"]
            for j, (c, style) in enumerate(zip(curves, RUN_STYLES * len(curves))):
                for b, key in enumerate(keys):
                    x, y = _series(c.train, key, c, axis)
                    if len(y):
                        ax.plot(x / scale, smooth(y, smoothing), linestyle=style, linewidth=1.3,
                                color=cmap(b / max(1, len(keys) - 1) * 0.9),
                                label=f"t {key[6:]}" if j == 0 else None)
                        drawn.append(y)
            if len(curves) > 1:  # line styles name the runs
                for c, style in zip(curves, RUN_STYLES * len(curves)):
                    ax.plot([], [], linestyle=style, color="0.3", label=c.label)
            ax.set_title("loss per t-bucket (t = 1 is data)", fontsize=9)
        elif panel == "lr":
            for c, color, style in zip(curves, colors, RUN_STYLES * len(curves)):
                x, y = _series(c.train, "lr", c, axis)
                ax.plot(x / scale, y, color=color, linestyle=style, linewidth=1.4, label=c.label)
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))  # no offset over the title
            ax.set_title("learning rate", fontsize=9)
        elif panel == FD_REP:
            for c, color in zip(curves, colors):
                for key, style in ((FD_REP, "-"), (FD_REP_NOCFG, "--")):
                    x, y = _series(c.quality, key, c, axis)
                    if len(y):
                        ax.plot(x / scale, y, color=color, linestyle=style, marker="o", markersize=3, linewidth=1.4,
                                label=f"{c.label} {'guided' if key == FD_REP else 'unguided'}")
                        drawn.append(y)
            _log_if_wide(ax, drawn)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.4g}"))  # no offset
            ax.set_title("fd_rep (feature-space FD, lower is better)", fontsize=9)
            ax.legend(fontsize=6, frameon=False)
        else:
            for c, color in zip(curves, colors):
                x, y = _series(c.val, panel, c, axis)
                if len(y):
                    ax.plot(x / scale, y, color=color, marker="o", markersize=3, linewidth=1.4, label=c.label)
                    drawn.append(y)
            ax.set_title(f"validation {panel[4:]}" + (" (dB)" if panel.endswith("psnr") else ""), fontsize=9)
        if panel in ("loss", "buckets"):
            _log_if_wide(ax, drawn)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.25, linewidth=0.5)
        if ax.get_legend_handles_labels()[0] and (panel == "buckets" or (i == 0 and len(curves) > 1)):
            ax.legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    path = save_figure(fig, out)
    return {"out": str(path), "panels": panels, "runs": [c.label for c in curves]}


def default_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run folder's name, or parent/name where names repeat (runs/flat/dit vs runs/fae/dit)."""
    names = [Path(r).resolve().name for r in runs]
    return [f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]

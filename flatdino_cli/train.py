"""ONE training loop, shared by train-vae, train-dit and train-decoder.

A stage hands `fit` a `Task` (model, datasets, loss function, optional validation, extra state and
an optional second optimizer step, `after_step`);
the loop owns everything else: data order, gradient accumulation, DDP, autocast, AdamW, schedules,
clipping, EMA, NaN guard, logging (tqdm + metrics.jsonl), validation, best/latest checkpoints and
exact resume. Resume is bitwise: the data order is a function of (seed, epoch), the global RNG is
re-seeded from (seed, step, micro-batch, rank) before every forward, and a checkpoint holds the
optimizer state, step and RNG states.

The run dir's files are written through rundir.py, the checkpoints through checkpoint.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from flatdino_cli import preempt
from flatdino_cli.checkpoint import (checkpoint_dir, kept_checkpoint, load_into, load_state, load_weights,
                                     save_checkpoint, verify_checkpoint)
from flatdino_cli.config import TrainConfig
from flatdino_cli.config_yaml import to_dict
from flatdino_cli.errors import UserError
from flatdino_cli.lock import FolderLock
from flatdino_cli.rundir import (MetricsLog, clear_finished, mark_finished, merge_inputs, move_run_aside,
                                 refuse_damaged_run, write_config, write_inputs)
from flatdino_cli.runtime import Runtime
from flatdino_cli.track import open_trackers

LossFn = Callable[[nn.Module, Any, "StepInfo"], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class StepInfo:
    step: int  # optimizer steps completed before this one
    epoch: int
    total_steps: int
    steps_per_epoch: int
    rt: Runtime


@dataclass
class Task:
    """What a stage plugs into the loop; everything else is shared."""

    model: nn.Module
    train_set: Dataset
    loss_fn: LossFn  # (model, batch on device, info) -> (scalar loss, {name: float})
    config: Any  # the stage config, written as config.yaml
    val_set: Dataset | None = None
    val_fn: Callable[[nn.Module, Iterable, Runtime], dict[str, float]] | None = None  # needs "loss"
    collate_fn: Callable | None = None
    val_collate_fn: Callable | None = None  # None: collate_fn
    aux: dict[str, Any] = field(default_factory=dict)  # extra state_dict() objects saved in state.pt
    # after each step; returns the path of an image it wrote (a sample grid), logged to the trackers
    on_step: Callable[[int, nn.Module, nn.Module | None], Path | None] | None = None
    # a second optimizer step (the GAN discriminator): once per optimizer step, after the model's, on
    # every rank, outside the model's autocast and no_sync, so it is the same for any micro-batching
    after_step: Callable[[StepInfo], dict[str, float]] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # provenance, written as inputs.json
    # a quality evaluation of the EMA model (model without EMA) on every rank, every eval_period(total
    # steps, steps per epoch) steps and at the end, logged before the checkpoint of that step: a resume
    # neither repeats nor skips one
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    eval_period: Callable[[int, int], int] | None = None
    find_unused_parameters: bool = False
    keep_files: tuple[str, ...] = ()  # run-dir files made for this run (stats.pt): --no-resume copies them aside


class TrainingDiverged(UserError):
    pass


# ----------------------------------------------------------------------------- schedule and optimizer
def lr_at(step: int, total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate before optimizer step `step` (0-based)."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, total - 1 - warm)  # the last step (total - 1) runs at final_lr, as in wsd
        frac = min(1.0, (step - warm) / span)
        return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * frac))
    decay = int(round(cfg.decay_epochs * steps_per_epoch))  # wsd
    # the decay ends with the run, or at decay_until_epoch whatever the run's length (RAE's DiT-DH recipe
    # decays on an 800-epoch clock, so its 80-epoch runs end at 1.9e-4, not at final_lr)
    end = total if cfg.decay_until_epoch is None else int(round(cfg.decay_until_epoch * steps_per_epoch))
    start = end - decay
    if decay <= 0 or step < start:
        return cfg.lr
    frac = min(1.0, (step - start + 1) / decay)
    if cfg.decay_shape == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.lr + (cfg.final_lr - cfg.lr) * frac


def param_groups(model: nn.Module, weight_decay: float, decay_2d_only: bool) -> list[dict]:
    """decay_2d_only: weight decay on 2-D weight matrices only, the authors' `ndim == 2` rule. Biases,
    norm scales, and the (1, T, W) learned query tokens and position tables are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not decay_2d_only:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


class EpochBatches:
    """Micro-batch index lists of one epoch for one rank, from optimizer step `start` on.

    The epoch order is a permutation seeded by (seed, epoch); optimizer step s uses the global slice
    perm[s*B:(s+1)*B], of which rank r takes its contiguous share, split into `accum` micro-batches.
    """

    def __init__(self, n: int, batch: int, micro: int, seed: int, epoch: int, start: int, rank: int, world: int):
        g = torch.Generator().manual_seed(seed * 10_007 + epoch)
        self.perm = torch.randperm(n, generator=g).tolist()
        self.batch, self.micro, self.start, self.rank, self.world = batch, micro, start, rank, world
        self.steps = n // batch

    def __iter__(self):
        per_rank = self.batch // self.world
        for s in range(self.start, self.steps):
            mine = self.perm[s * self.batch + self.rank * per_rank: s * self.batch + (self.rank + 1) * per_rank]
            for i in range(0, per_rank, self.micro):
                yield mine[i: i + self.micro]

    def __len__(self):
        return (self.steps - self.start) * (self.batch // self.world // self.micro)


# ----------------------------------------------------------------------------- the loop
def _to_device(batch: Any, rt: Runtime) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(rt.device, non_blocking=rt.pin_memory)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(_to_device(b, rt) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, rt) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, rt) for k, v in batch.items()}
    return batch


def _plan(n: int, cfg: TrainConfig, rt: Runtime) -> tuple[int, int, int, int]:
    """(micro batch, accumulation steps, steps per epoch, total steps)."""
    world = rt.world_size
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size={cfg.batch_size} must be divisible by the {world} processes")
    micro = min(cfg.micro_batch_size or cfg.batch_size // world, cfg.batch_size // world)
    if (cfg.batch_size // world) % micro:
        raise UserError(f"train.micro_batch_size={micro} must divide the per-process batch {cfg.batch_size // world}")
    accum = cfg.batch_size // world // micro
    spe = n // cfg.batch_size
    if spe == 0:
        raise UserError(f"train.batch_size={cfg.batch_size} is larger than the training set ({n} items); "
                        "lower it with --batch-size")
    total = math.ceil(cfg.epochs * spe)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if cfg.epochs else cfg.max_steps
    return micro, accum, spe, max(1, total)


def _check_resume_layout(state: dict, cfg: TrainConfig, rt: Runtime, micro: int, ckpt: Path) -> None:
    """A step is a global batch: another global batch size would resume at the wrong place in the data
    order, so it is refused. Another process count or micro-batch is sound (each step still sees the
    same global batch) but draws other noise per micro-batch, so it is only no longer bitwise equal."""
    if int(state.get("batch_size", cfg.batch_size)) != cfg.batch_size:
        raise UserError(f"{ckpt}: this run was trained with train.batch_size={state['batch_size']}, not "
                        f"{cfg.batch_size}; resume with the same global batch or start over with --no-resume")
    was = (int(state.get("world_size", rt.world_size)), int(state.get("micro_batch_size", micro)))
    if was != (rt.world_size, micro) and rt.is_main:
        tqdm.write(f"resuming with {rt.world_size} process(es) x micro-batch {micro} (was {was[0]} x {was[1]}): "
                   "training continues on the same global batches, but not bitwise equal to an uninterrupted run")


def unwrap(m: nn.Module) -> nn.Module:
    """The network inside torch.compile's and DDP's wrappers (the loop hands a task's loss the wrapped one)."""
    m = getattr(m, "_orig_mod", m)
    return getattr(m, "module", m)


def fit(task: Task, cfg: TrainConfig, run_dir: Path, rt: Runtime, resume: bool = True,
        desc: str = "train", new_data: bool = False) -> dict:
    """Train `task.model` in place; returns a summary {step, best_val, run_dir, ...}.

    The run dir is locked against a second writer for the whole run (rank 0 holds the lock). SIGTERM /
    SIGUSR1 finish the step in flight, save `latest` and raise preempt.Preempted (every rank stops at
    the same step, whichever rank got the signal)."""
    run_dir = Path(run_dir)
    plan = _plan(len(task.train_set), cfg, rt)
    with FolderLock(run_dir, "run directory") if rt.is_main else contextlib.nullcontext(), preempt.deferred():
        return _fit(task, cfg, run_dir, rt, plan, resume, desc, new_data)


def _restore(ckpt: Path, task: Task, model: nn.Module, ema: nn.Module | None, opt, cfg: TrainConfig, rt: Runtime,
             micro: int) -> tuple[int, float]:
    """Load a checkpoint into the run: weights, EMA, optimizer, task.aux states and the torch RNG;
    returns (step, best_val)."""
    verify_checkpoint(ckpt, warn=rt.is_main)  # the bytes a run resumes from are the bytes it wrote
    load_into(model, load_weights(ckpt / "model.safetensors"), ckpt / "model.safetensors")
    if ema is not None:
        ema_file = ckpt / "ema.safetensors"
        load_into(ema, load_weights(ema_file) if ema_file.exists() else model.state_dict(), ema_file)
    state = load_state(ckpt / "state.pt")
    _check_resume_layout(state, cfg, rt, micro, ckpt)
    opt.load_state_dict(state["optimizer"])
    for name, obj in task.aux.items():
        obj.load_state_dict(state["aux"][name])
    torch.set_rng_state(state["rng_torch"])
    return int(state["step"]), float(state["best_val"])


def _fit(task: Task, cfg: TrainConfig, run_dir: Path, rt: Runtime, plan: tuple[int, int, int, int],
         resume: bool, desc: str, new_data: bool) -> dict:
    n = len(task.train_set)
    micro, accum, spe, total = plan
    if resume:
        refuse_damaged_run(run_dir)
    elif rt.is_main:
        move_run_aside(run_dir, cfg.keep_old_runs, task.keep_files)
    rt.barrier()
    model = task.model.to(rt.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if cfg.ema > 0 else None
    opt = rt.adamw(param_groups(model, cfg.weight_decay, cfg.decay_2d_only), cfg.lr, cfg.betas, cfg.eps)

    step, best_val = 0, math.inf
    ckpt = checkpoint_dir(run_dir) if resume else None
    inputs = merge_inputs(run_dir, task.inputs, new_data) if ckpt is not None else task.inputs
    if ckpt is not None:
        step, best_val = _restore(ckpt, task, model, ema, opt, cfg, rt, micro)
        if rt.is_main:
            tqdm.write(f"resuming {run_dir} from step {step}/{total}")

    if rt.is_main:
        clear_finished(run_dir)
        write_config(run_dir, task.config)
        write_inputs(run_dir, inputs)
    trackers = open_trackers(cfg.log_to, run_dir, to_dict(task.config), step, rt.is_main)
    log = MetricsLog(run_dir, rt.is_main, step, trackers)

    net = model
    if rt.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.is_cuda else None,
            find_unused_parameters=task.find_unused_parameters)
    net = rt.maybe_compile(net)

    def state_dict() -> dict:
        return {"step": step, "epoch": step // spe, "best_val": best_val, "optimizer": opt.state_dict(),
                "aux": {k: v.state_dict() for k, v in task.aux.items()}, "rng_torch": torch.get_rng_state(),
                "batch_size": cfg.batch_size, "world_size": rt.world_size, "micro_batch_size": micro,
                "total_steps": total}

    def checkpoint(which: str) -> None:
        if rt.is_main:
            save_checkpoint(run_dir, which, model, ema, state_dict())
        rt.barrier()

    # the progress bar and the trackers are closed however the loop ends (diverged, Ctrl-C, an error):
    # a tracker closed late would lose the events still in its buffer
    eval_every = task.eval_period(total, spe) if task.evaluate is not None and task.eval_period else 0
    bar = tqdm(total=total, initial=step, desc=desc, disable=not rt.is_main, dynamic_ncols=True, unit="step")
    try:
        window: dict[str, list[float]] = {}
        t_window, samples_window = time.perf_counter(), 0
        while step < total:
            epoch, pos = divmod(step, spe)
            batches = EpochBatches(n, cfg.batch_size, micro, cfg.seed, epoch, pos, rt.rank, rt.world_size)
            if hasattr(task.train_set, "set_epoch"):  # per-epoch draws (e.g. each row's view) follow (seed, epoch)
                task.train_set.set_epoch(epoch)
            loader = DataLoader(task.train_set, batch_sampler=batches, num_workers=cfg.num_workers,
                                collate_fn=task.collate_fn, pin_memory=rt.pin_memory,
                                persistent_workers=False, worker_init_fn=preempt.worker_ignores_stop)
            net.train()
            it = iter(loader)
            while step < total and step // spe == epoch:
                info = StepInfo(step, epoch, total, spe, rt)
                lr = lr_at(step, total, spe, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                losses = []
                for a in range(accum):
                    batch = _to_device(next(it), rt)
                    torch.manual_seed(step_seed(cfg.seed, step, a, rt.rank))
                    sync = net.no_sync() if rt.distributed and a < accum - 1 else contextlib.nullcontext()
                    with sync:
                        with rt.autocast():
                            loss, metrics = task.loss_fn(net, batch, info)
                        (loss / accum).backward()
                    losses.append(loss.detach().float())
                    for k, v in metrics.items():
                        window.setdefault(k, []).append(float(v))
                mean_loss = rt.all_reduce_mean(torch.stack(losses).mean())
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if not (torch.isfinite(mean_loss) and torch.isfinite(gnorm)):
                    last = checkpoint_dir(run_dir)
                    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                    raise TrainingDiverged(f"{desc}: non-finite loss/gradient at step {step + 1} "
                                           f"(loss={mean_loss.item()}, grad-norm={gnorm.item()}); stopped, {where}")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if task.after_step is not None:
                    torch.manual_seed(step_seed(cfg.seed, step, -1, rt.rank))  # micro index -1: any accum draws alike
                    for k, v in task.after_step(info).items():
                        window.setdefault(k, []).append(float(v))
                if ema is not None:
                    ema_update(ema, model, cfg.ema)
                step += 1
                samples_window += cfg.batch_size
                window.setdefault("loss", []).append(mean_loss.item())
                window.setdefault("grad_norm", []).append(gnorm.item())
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    dt = time.perf_counter() - t_window
                    row = {k: sum(v) / len(v) for k, v in window.items()}
                    row.update(lr=lr, samples_per_s=samples_window / max(dt, 1e-9))
                    log.write(step=step, epoch=step / spe, **row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}")
                    window, t_window, samples_window = {}, time.perf_counter(), 0
                if task.on_step is not None and rt.is_main:
                    written = task.on_step(step, model, ema)
                    if written is not None:
                        log.image(written, step)
                epoch_end = step % spe == 0
                if epoch_end and task.val_fn is not None and task.val_set is not None and len(task.val_set):
                    ep = step // spe
                    if ep % max(1, cfg.val_every_epochs) == 0 or step == total:
                        val = _validate(task, model, rt)
                        log.write(step=step, epoch=step / spe, **{f"val/{k}": v for k, v in val.items()})
                        bar.write(f"{desc} epoch {ep}: " + ", ".join(f"val {k} {v:.4g}" for k, v in val.items()))
                        if val["loss"] < best_val:
                            best_val = val["loss"]
                            checkpoint("best")
                if eval_every and (step % eval_every == 0 or step == total):
                    t_eval = time.perf_counter()
                    quality = task.evaluate(ema if ema is not None else model)
                    quality["eval_seconds"] = time.perf_counter() - t_eval
                    log.write(step=step, epoch=step / spe, **quality)
                    if rt.is_main:
                        bar.write(f"{desc} step {step:,}: " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()))
                    t_window += quality["eval_seconds"]  # samples_per_s stays the training rate
                # a stop request on any rank stops every rank here, after the same step (DDP: one int all-reduce)
                stop = step < total and rt.any_rank(preempt.requested() is not None)
                if stop or step % cfg.ckpt_every_steps == 0 or epoch_end or step == total:
                    checkpoint("latest")
                if cfg.keep_every_steps and step % cfg.keep_every_steps == 0:
                    checkpoint(kept_checkpoint(step))
                if stop:
                    raise preempt.Preempted(f"{desc}: preempted at step {step:,}, saved; rerun the same command "
                                            "to continue", quiet=not rt.is_main)
        if rt.is_main:
            mark_finished(run_dir, step, best_val)
    finally:
        bar.close()
        log.close()
    return {"step": step, "best_val": best_val, "run_dir": str(run_dir), "steps_per_epoch": spe}


@torch.no_grad()
def _validate(task: Task, model: nn.Module, rt: Runtime) -> dict[str, float]:
    was = model.training
    model.eval()
    loader = DataLoader(task.val_set, batch_size=256, shuffle=False, collate_fn=task.val_collate_fn or task.collate_fn)
    batches = (_to_device(b, rt) for b in loader)
    with rt.autocast():
        out = task.val_fn(model, batches, rt)
    model.train(was)
    return {k: float(v) for k, v in out.items()}

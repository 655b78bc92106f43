"""ONE training loop, shared by train-vae, train-dit and train-decoder.

A stage hands `fit` a `Task` (model, datasets, loss function, optional validation, extra state and
an optional second optimizer step, `after_step`);
the loop owns everything else: data order, gradient accumulation, DDP, autocast, AdamW, schedules,
clipping, EMA, NaN guard, logging (tqdm + metrics.jsonl), validation, best/latest checkpoints and
exact resume. Resume is bitwise: the data order is a function of (seed, epoch), the global RNG is
re-seeded from (seed, step, micro-batch, rank) before every forward, and a checkpoint holds the
optimizer state, step and RNG states.

The run dir's files are written through rundir.py, the checkpoints through checkpoint.py; a step's
arithmetic (learning rate, weight-decay groups, EMA, seeds, data order) is steps.py's.
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
from flatdino_cli.steps import EpochBatches, ema_update, lr_at, param_groups, step_seed
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
    run = _start(task, cfg, run_dir, rt, plan, resume, desc, new_data)
    # the progress bar and the trackers are closed however the loop ends (diverged, Ctrl-C, an error):
    # a tracker closed late would lose the events still in its buffer
    try:
        while run.step < run.total:
            epoch = run.step // run.spe
            batches = run.epoch_batches(epoch)
            while run.step < run.total and run.step // run.spe == epoch:
                lr = run.train_step(batches)
                run.log_window(lr)
                run.show_step()
                epoch_end = run.step % run.spe == 0
                if epoch_end:
                    run.validate_epoch()
                run.evaluate_quality()
                run.save_or_stop(epoch_end)
        if rt.is_main:
            mark_finished(run_dir, run.step, run.best_val)
    finally:
        run.bar.close()
        run.log.close()
    return {"step": run.step, "best_val": run.best_val, "run_dir": str(run_dir), "steps_per_epoch": run.spe}


def _start(task: Task, cfg: TrainConfig, run_dir: Path, rt: Runtime, plan: tuple[int, int, int, int],
           resume: bool, desc: str, new_data: bool) -> _Run:
    """Set the run up: its run dir (checked, or moved aside), model, EMA, optimizer, resumed state, the
    config and inputs written, metrics log, trackers and progress bar."""
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

    eval_every = task.eval_period(total, spe) if task.evaluate is not None and task.eval_period else 0
    bar = tqdm(total=total, initial=step, desc=desc, disable=not rt.is_main, dynamic_ncols=True, unit="step")
    return _Run(task, cfg, run_dir, rt, desc, micro, accum, spe, total, model, ema, opt, net, log, bar,
                eval_every, step, best_val)


@dataclass
class _Run:
    """One training run in flight: what its steps share, and the phases of a step."""

    task: Task
    cfg: TrainConfig
    run_dir: Path
    rt: Runtime
    desc: str
    micro: int
    accum: int
    spe: int  # optimizer steps per epoch
    total: int
    model: nn.Module
    ema: nn.Module | None
    opt: Any
    net: nn.Module  # the model as the loss sees it (DDP, compiled)
    log: MetricsLog
    bar: Any
    eval_every: int  # 0: no quality evaluation
    step: int
    best_val: float
    # the metrics since the last log row, the time and the samples they took
    window: dict[str, list[float]] = field(default_factory=dict)
    t_window: float = field(default_factory=time.perf_counter)
    samples_window: int = 0

    def epoch_batches(self, epoch: int):
        """An iterator over this rank's micro-batches of `epoch`, from the current step on."""
        task, cfg, rt = self.task, self.cfg, self.rt
        batches = EpochBatches(len(task.train_set), cfg.batch_size, self.micro, cfg.seed, epoch,
                               self.step % self.spe, rt.rank, rt.world_size)
        if hasattr(task.train_set, "set_epoch"):  # per-epoch draws (e.g. each row's view) follow (seed, epoch)
            task.train_set.set_epoch(epoch)
        loader = DataLoader(task.train_set, batch_sampler=batches, num_workers=cfg.num_workers,
                            collate_fn=task.collate_fn, pin_memory=rt.pin_memory,
                            persistent_workers=False, worker_init_fn=preempt.worker_ignores_stop)
        self.net.train()
        return iter(loader)

    def _record(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            self.window.setdefault(k, []).append(float(v))

    def train_step(self, batches) -> float:
        """One optimizer step (accumulated micro-batches, divergence check, AdamW, the task's after_step,
        EMA); returns its learning rate."""
        cfg, rt = self.cfg, self.rt
        info = StepInfo(self.step, self.step // self.spe, self.total, self.spe, rt)
        lr = lr_at(self.step, self.total, self.spe, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        mean_loss = self._accumulate(batches, info)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self._refuse_divergence(mean_loss, gnorm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.task.after_step is not None:
            torch.manual_seed(step_seed(cfg.seed, self.step, -1, rt.rank))  # micro index -1: any accum draws alike
            self._record(self.task.after_step(info))
        if self.ema is not None:
            ema_update(self.ema, self.model, cfg.ema)
        self.step += 1
        self.samples_window += cfg.batch_size
        self._record({"loss": mean_loss.item(), "grad_norm": gnorm.item()})
        self.bar.update(1)
        return lr

    def _accumulate(self, batches, info: StepInfo) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns the mean loss over all ranks."""
        rt, accum = self.rt, self.accum
        losses = []
        for a in range(accum):
            batch = _to_device(next(batches), rt)
            torch.manual_seed(step_seed(self.cfg.seed, self.step, a, rt.rank))
            sync = self.net.no_sync() if rt.distributed and a < accum - 1 else contextlib.nullcontext()
            with sync:
                with rt.autocast():
                    loss, metrics = self.task.loss_fn(self.net, batch, info)
                (loss / accum).backward()
            losses.append(loss.detach().float())
            self._record(metrics)
        return rt.all_reduce_mean(torch.stack(losses).mean())

    def _refuse_divergence(self, mean_loss: torch.Tensor, gnorm: torch.Tensor) -> None:
        if torch.isfinite(mean_loss) and torch.isfinite(gnorm):
            return
        last = checkpoint_dir(self.run_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{self.desc}: non-finite loss/gradient at step {self.step + 1} "
                               f"(loss={mean_loss.item()}, grad-norm={gnorm.item()}); stopped, {where}")

    def log_window(self, lr: float) -> None:
        """Every log_every steps and at the end: the window's means as one metrics row."""
        if self.step % self.cfg.log_every and self.step != self.total:
            return
        dt = time.perf_counter() - self.t_window
        row = {k: sum(v) / len(v) for k, v in self.window.items()}
        row.update(lr=lr, samples_per_s=self.samples_window / max(dt, 1e-9))
        self.log.write(step=self.step, epoch=self.step / self.spe, **row)
        self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}")
        self.window, self.t_window, self.samples_window = {}, time.perf_counter(), 0

    def show_step(self) -> None:
        """The task's per-step image (a sample grid), logged to the trackers."""
        if self.task.on_step is not None and self.rt.is_main:
            written = self.task.on_step(self.step, self.model, self.ema)
            if written is not None:
                self.log.image(written, self.step)

    def validate_epoch(self) -> None:
        """At an epoch's end, every val_every_epochs epochs and at the end: validate, keep the best."""
        task = self.task
        if task.val_fn is None or task.val_set is None or not len(task.val_set):
            return
        ep = self.step // self.spe
        if ep % max(1, self.cfg.val_every_epochs) and self.step != self.total:
            return
        val = _validate(task, self.model, self.rt)
        self.log.write(step=self.step, epoch=self.step / self.spe, **{f"val/{k}": v for k, v in val.items()})
        self.bar.write(f"{self.desc} epoch {ep}: " + ", ".join(f"val {k} {v:.4g}" for k, v in val.items()))
        if val["loss"] < self.best_val:
            self.best_val = val["loss"]
            self.checkpoint("best")

    def evaluate_quality(self) -> None:
        """Every eval_every steps and at the end: the task's quality evaluation of the EMA model."""
        if not self.eval_every or (self.step % self.eval_every and self.step != self.total):
            return
        t_eval = time.perf_counter()
        quality = self.task.evaluate(self.ema if self.ema is not None else self.model)
        quality["eval_seconds"] = time.perf_counter() - t_eval
        self.log.write(step=self.step, epoch=self.step / self.spe, **quality)
        if self.rt.is_main:
            self.bar.write(f"{self.desc} step {self.step:,}: " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()))
        self.t_window += quality["eval_seconds"]  # samples_per_s stays the training rate

    def save_or_stop(self, epoch_end: bool) -> None:
        """Save `latest` (and a kept checkpoint) when due; on a stop request save and raise Preempted."""
        cfg, step = self.cfg, self.step
        # a stop request on any rank stops every rank here, after the same step (DDP: one int all-reduce)
        stop = step < self.total and self.rt.any_rank(preempt.requested() is not None)
        if stop or step % cfg.ckpt_every_steps == 0 or epoch_end or step == self.total:
            self.checkpoint("latest")
        if cfg.keep_every_steps and step % cfg.keep_every_steps == 0:
            self.checkpoint(kept_checkpoint(step))
        if stop:
            raise preempt.Preempted(f"{self.desc}: preempted at step {step:,}, saved; rerun the same command "
                                    "to continue", quiet=not self.rt.is_main)

    def checkpoint(self, which: str) -> None:
        if self.rt.is_main:
            save_checkpoint(self.run_dir, which, self.model, self.ema, self._state_dict())
        self.rt.barrier()

    def _state_dict(self) -> dict:
        cfg = self.cfg
        return {"step": self.step, "epoch": self.step // self.spe, "best_val": self.best_val,
                "optimizer": self.opt.state_dict(), "aux": {k: v.state_dict() for k, v in self.task.aux.items()},
                "rng_torch": torch.get_rng_state(), "batch_size": cfg.batch_size, "world_size": self.rt.world_size,
                "micro_batch_size": self.micro, "total_steps": self.total}


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

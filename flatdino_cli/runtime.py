"""Device, precision, compilation and process-group setup: every CUDA-specific choice lives here.

CPU runs default to fp32 (some CPUs emulate bf16 at ~1/100 of fp32 speed); CUDA runs default to
bf16 autocast, fused AdamW, pinned host memory and torch.compile. Under `torchrun` the process group
is initialised from the environment (nccl on CUDA, gloo on CPU). How CPU threads wait (passive) and how
many there are is settled before torch loads, by the `flatdino` entry point: cpu.py says why.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatdino_cli.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16
    compile: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    jpeg_on_device: bool | None = None  # decode JPEGs where the encoder runs; None: on CUDA (nvJPEG)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def decode_jpeg_on_device(self) -> bool:
        """extract decodes JPEGs on the device in batches (CPU decoding limits a GPU's extract rate)."""
        return self.is_cuda if self.jpeg_on_device is None else self.jpeg_on_device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def pin_memory(self) -> bool:
        return self.is_cuda

    def autocast(self):
        """bf16 autocast where asked for; a no-op context for fp32."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def maybe_compile(self, model: torch.nn.Module, dynamic: bool | None = None) -> torch.nn.Module:
        """torch.compile(model) when compiling; dynamic=False for callers whose shapes are few and fixed."""
        return torch.compile(model, dynamic=dynamic) if self.compile else model

    def adamw(self, param_groups, lr: float, betas, eps: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=self.is_cuda or None)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world_size
        return x

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (one 4-byte all-reduce; no collective, and no cost,
        in a single process)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


CPU = Runtime(torch.device("cpu"), "fp32", False)  # the runtime of library calls given none


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:1)") from None
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, ...: untested here, and several ops lack kernels there
        raise UserError(f"--device {device}: not supported (flatdino runs on cpu or cuda); use --device cpu")
    return dev


def setup_runtime(device: str = "auto", precision: str = "auto", compile: bool | None = None,
                  tf32: bool = True) -> Runtime:
    """Resolve device/precision/compile and join the torchrun process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {precision}: use auto, fp32 or bf16")
    if dev.type == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if compile is None:
        compile = dev.type == "cuda"
    return Runtime(dev, precision, compile, rank, world, local_rank)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """This machine's measured dense-matmul rate (FLOP/s, counting a multiply-add as 2)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            synchronize(device)
            if time.perf_counter() - start > seconds:
                break
    return 2 * n**3 * reps / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)

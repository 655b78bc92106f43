"""Generation: per-image noise, the sampling loop over fixed-size chunks, and `generate` (images).

Noise: image i of a sample set gets eps_i ~ N(0, I) from its own generator seeded by (seed, i) (the sde
sampler draws its per-step noise from the same generator, after eps_i). On
the CPU every network forward then runs on a fixed CPU_CHUNK images (see `generate`), so one seed
gives bit-identical images whatever the batch size, the resume point or the image's place in its
batch; other devices give the same images up to float rounding.

Speed (bench/sample.py): the guided and unguided halves share one DiT forward (flow.guided_velocity);
each image goes through the decoders once, at the sampler batch; `--compile` compiles the DiT once per
pipeline (sampling_dit).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig, make_velocity_fn, network_evaluations, sample
from flatdino_cli.pipeline import Pipeline
from flatdino_cli.runtime import CPU, Runtime

# Images per network forward on the CPU, whatever --batch-size says. The DiT's per-image
# conditioning (time embedder, adaLN projections) runs GEMMs with one row per image, and MKL rounds a
# row differently with the number of rows (other kernels below 4 rows, row splits across threads), so
# image i differed in the last bits between --batch-size 1 and 8, now and then by a grey level. With
# one fixed shape an image's numbers depend neither on its batch nor on its place in it (checked at
# 1 and 2 threads, with and without DDT head, Euler/Heun, CFG). 8 rows stay clear of the few-row
# kernels and keep CPU GEMMs efficient; on CUDA, speed matters more and the user's batch is used.
CPU_CHUNK = 8


def image_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for image `index` of a run seeded `seed` (SeedSequence mixing: no two
    (seed, index) pairs share a stream the way seed + index would)."""
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded image_seed(seed, i): its first draw is the image's eps."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int],
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(B, *shape) float32 CPU noise, row b drawn from its own generator (image_generators; advanced)."""
    gens = generators if generators is not None else image_generators(seed, indices)
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def sampler_batch(batch_size: int, device: torch.device | str) -> int:
    """Images per generate() call for --batch-size: on the CPU rounded up to a multiple of CPU_CHUNK
    (a smaller batch would be padded to CPU_CHUNK anyway), elsewhere batch_size itself."""
    batch_size = max(1, batch_size)
    return -(-batch_size // CPU_CHUNK) * CPU_CHUNK if torch.device(device).type == "cpu" else batch_size


def sampling_dit(pipe: Pipeline, rt: Runtime) -> nn.Module:
    """The DiT as generate() runs it: torch.compile'd once per pipeline when rt.compile. Static shapes:
    the sampler only ever feeds a chunk and its guided double ([x, x] with [y, null], one forward)."""
    if not rt.compile:
        return pipe.dit
    if pipe.compiled is None or pipe.compiled[0] is not pipe.dit:
        pipe.compiled = (pipe.dit, rt.maybe_compile(pipe.dit, dynamic=False))
    return pipe.compiled[1]


@torch.no_grad()
def sample_chunks(pipe: Pipeline, labels: Sequence[int], indices: Sequence[int], seed: int,
                  flow: FlowConfig | None = None, batch_size: int = 16, rt: Runtime = CPU, exact: bool = True,
                  evaluations: list[tuple[int, int]] | None = None):
    """Yield (DiT samples (B, N, d) on rt.device, k): image j < k of the chunk is class labels[.] from the
    noise of image indices[.], in order. On the CPU every chunk has CPU_CHUNK rows, the last one padded
    with copies of its last image (drop rows >= k; bit-identical images at any batch size, see
    CPU_CHUNK); elsewhere, or with exact=False (statistics over many images, where the last bits do
    not matter but CPU_CHUNK's many small forwards do), batch_size rows, unpadded. The one sampling
    loop of generate and evaluate. `evaluations` receives (k, network evaluations per image) per chunk,
    counted from the times the sampler evaluated at (dopri5's count differs from chunk to chunk)."""
    flow = flow or pipe.cfg.flow
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} indices")
    fixed = exact and rt.device.type == "cpu"
    chunk = CPU_CHUNK if fixed else max(1, batch_size)

    def run(net):  # a network as the sampler calls it: under the runtime's autocast, fp32 out
        def forward(x, t, y_):
            with rt.autocast():
                return net(x, t, y_).float()
        return forward

    main = run(sampling_dit(pipe, rt))
    guide = run(pipe.guide) if pipe.guide is not None else None
    for lo in range(0, len(labels), chunk):
        idx, lab = list(indices[lo: lo + chunk]), list(labels[lo: lo + chunk])
        k = len(idx)
        if fixed:  # pad to the fixed shape; the copies are dropped after decoding
            idx, lab = idx + idx[-1:] * (chunk - k), lab + lab[-1:] * (chunk - k)
        gens = image_generators(seed, idx)
        noise = image_noise(seed, idx, pipe.latent_shape, gens).to(rt.device)  # (B, N, d)
        y = torch.tensor(lab, dtype=torch.long, device=rt.device)
        velocity = make_velocity_fn(main, y, flow, pipe.cfg.model.num_classes, guide)

        def step_noise(i: int, idx=idx, gens=gens) -> torch.Tensor:  # the sde sampler's draws, per image
            return image_noise(seed, idx, pipe.latent_shape, gens)

        times: list[float] | None = [] if evaluations is not None else None
        x = sample(velocity, noise, flow.steps, flow.shift, flow.sampler, flow.grid, flow.sde_diffusion,
                   flow.sde_last_step, step_noise, flow.ode_rtol, flow.ode_atol, record=times)
        if evaluations is not None:
            evaluations.append((k, network_evaluations(flow, times)))
        yield x, k


@torch.no_grad()
def generate(pipe: Pipeline, labels: Sequence[int], indices: Sequence[int], seed: int,
             flow: FlowConfig | None = None, batch_size: int = 16, rt: Runtime = CPU,
             evaluations: list[tuple[int, int]] | None = None) -> np.ndarray:
    """uint8 images (len(labels), S, S, 3): image k is class labels[k] from the noise of image indices[k]
    (sample_chunks; `evaluations` as there), each chunk decoded at once."""
    out = [pipe.decode(x, rt)[:k]
           for x, k in sample_chunks(pipe, labels, indices, seed, flow, batch_size, rt, evaluations=evaluations)]
    S = pipe.image_size
    return np.concatenate(out) if out else np.zeros((0, S, S, 3), np.uint8)

"""Flow matching: every time/sign convention of the toolkit, in one place.

Our convention (FlatDINO's): t = 0 is noise, t = 1 is data.

    x_t = (1 - t) * eps + t * z,    eps ~ N(0, I),  z = data
    v   = dx_t/dt = z - eps         (the regression target; loss = MSE)

Sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on a shifted grid, or (sampler
sde) the reverse SDE of the same path, SiT's Euler-Maruyama sampler (`sample`).

RAE's convention is the mirror image: t_R = 0 is data, t_R = 1 is noise, x = (1 - t_R) z + t_R eps,
target u = eps - z. The same point and the same target are reached with t = 1 - t_R and v = -u
(`rae_to_ours_time`, `rae_to_ours_velocity`); RAE's shift s*t_R / (1 + (s-1)*t_R) is our
`shift_time` on the mirrored time, so one `shift` number means the same thing in both frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from flatdino_cli.errors import UserError

__all__ = ["FlowConfig", "FlowConfigError", "RAE_T_MAX", "default_shift", "evaluation_times", "flow_loss",
           "adams_bashforth_weights", "guidance_weights", "guided_velocity", "interpolate", "make_velocity_fn",
           "network_evaluations", "adaptive_tally", "mean_evaluations", "ours_to_rae_time",
           "rae_shift_time", "rae_to_ours_time", "rae_to_ours_velocity", "sample", "sample_train_time", "sampler_grid",
           "sde_grid",
           "shift_time", "time_grid", "velocity_target"]

TIME_DISTS = ("uniform", "logit-normal", "rae")
MULTISTEP = {"ab2": 2, "ab3": 3}  # Adams-Bashforth order of each multistep sampler (one evaluation a step)
SAMPLERS = ("euler", "heun", "sde", *MULTISTEP, "dopri5")
GRIDS = ("ours", "rae")
RAE_T_MAX = 1.0 - 1.0 / 1000  # RAE truncates its training t_R to [0, 0.999] (velocity model, ODE)

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> v (B, ...)


class FlowConfigError(UserError, ValueError):
    """A bad flow setting: a ValueError that the CLI also reports as a one-line UserError."""


@dataclass(frozen=True)
class FlowConfig:
    """Training-time distribution, sampler and guidance of the flow-matching generator."""

    time_dist: str = "uniform"  # uniform | logit-normal (our frame) | rae (RAE's, mirrored); then shifted
    shift: float = 1.0  # k in t' = t / (k - (k-1) t); k > 1 puts more time near noise (k < 1 allowed)
    logit_mean: float = 0.0  # logit-normal / rae: mean and std of logit(t) (rae: of logit(t_R))
    logit_std: float = 1.0
    sampler: str = "euler"  # euler | heun | sde (Euler-Maruyama, SiT's) | ab2 | ab3 | dopri5; see `sample`
    steps: int = 50  # integration steps on time_grid(steps, shift) (grid rae: time points, RAE's num_steps;
    #                  sde: network evaluations, SiT's num_sampling_steps)
    grid: str = "ours"  # ours: steps steps to t = 1 | rae: RAE's ODE grid and its rule "guide only if w > 1"
    cfg_scale: float = 1.0  # guidance weight w; 1 = no guidance (one conditional forward)
    cfg_interval: tuple[float, float] = (0.225, 1.0)  # guide where lo < t < hi; RAE's [a, b] is [1-b, 1-a]
    cfg_interval_inclusive: bool = False  # lo <= t <= hi instead (RAE's rule)
    # piecewise guidance [[lo, hi, w], ...] (lo <= t < hi; a piece ending at 1 includes t = 1), ascending and
    # disjoint, w = 1 between pieces; when set it replaces cfg_scale and cfg_interval (FAE's three-part CFG)
    cfg_schedule: tuple[tuple[float, float, float], ...] = ()
    sde_diffusion: float = 1.0  # sde: w(t) = sde_diffusion * (1 - t), SiT's diffusion_form "sigma" and its norm
    sde_last_step: float = 0.04  # sde: the final noise-free step's length in t (SiT's last_step_size, "Mean")
    ode_rtol: float = 1e-3  # dopri5: torchdiffeq's relative and absolute tolerances (steps is ignored)
    ode_atol: float = 1e-3
    # the sampler and steps the family's paper reports its numbers with (`sample --paper-sampler`), kept
    # beside sampler/steps, which follow our measurement of the fewest evaluations for the same quality
    paper_sampler: str = "euler"
    paper_steps: int = 50

    def __post_init__(self):
        object.__setattr__(self, "cfg_interval", tuple(float(v) for v in self.cfg_interval))
        lo, hi = self.cfg_interval if len(self.cfg_interval) == 2 else (math.nan, math.nan)
        for ok, key, want, got in [
            (self.time_dist in TIME_DISTS, "time_dist", " or ".join(TIME_DISTS), self.time_dist),
            (self.shift > 0 and math.isfinite(self.shift), "shift", "a finite number > 0", self.shift),
            (math.isfinite(self.logit_mean), "logit_mean", "finite", self.logit_mean),
            (self.logit_std > 0 and math.isfinite(self.logit_std), "logit_std", "finite and > 0", self.logit_std),
            (self.sampler in SAMPLERS, "sampler", " or ".join(SAMPLERS), self.sampler),
            (self.steps >= 1, "steps", "an integer >= 1", self.steps),
            (self.paper_sampler in SAMPLERS, "paper_sampler", " or ".join(SAMPLERS), self.paper_sampler),
            (self.paper_steps >= 1, "paper_steps", "an integer >= 1", self.paper_steps),
            (self.grid in GRIDS, "grid", " or ".join(GRIDS), self.grid),
            (self.grid != "rae" or self.steps >= 2, "steps", "an integer >= 2 with grid rae (time points)",
             self.steps),
            (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale), "cfg_scale", "finite and >= 0", self.cfg_scale),
            (0.0 <= lo <= hi <= 1.0, "cfg_interval", "[lo, hi] with 0 <= lo <= hi <= 1", self.cfg_interval),
            (self.sde_diffusion >= 0 and math.isfinite(self.sde_diffusion), "sde_diffusion", "finite and >= 0",
             self.sde_diffusion),
            (0.0 < self.sde_last_step < 1.0, "sde_last_step", "in (0, 1)", self.sde_last_step),
            (self.sampler != "sde" or self.grid == "ours", "grid", "ours with sampler sde", self.grid),
            (self.sampler != "sde" or self.steps >= 2, "steps", "an integer >= 2 with sampler sde", self.steps),
            (self.sampler != "dopri5" or self.grid == "ours", "grid", "ours with sampler dopri5", self.grid),
            (0 < self.ode_rtol < 1, "ode_rtol", "in (0, 1)", self.ode_rtol),
            (0 < self.ode_atol < 1, "ode_atol", "in (0, 1)", self.ode_atol),
        ]:
            if not ok:
                raise FlowConfigError(f"config: flow.{key} must be {want}, got {got!r}")
        object.__setattr__(self, "cfg_schedule", tuple(tuple(float(v) for v in p) for p in self.cfg_schedule))
        end = 0.0
        for piece in self.cfg_schedule:
            if len(piece) != 3 or not (end <= piece[0] < piece[1] <= 1.0) or not (0 <= piece[2] < math.inf):
                raise FlowConfigError(f"config: flow.cfg_schedule must be [[lo, hi, w], ...] with 0 <= lo < hi <= 1 "
                                      f"ascending and disjoint and w finite >= 0, got {self.cfg_schedule!r}")
            end = piece[1]


# ----------------------------------------------------------------------------- time and frames
def shift_time(t: Tensor | float, k: float) -> Tensor | float:
    """t' = t / (k - (k-1) t): maps [0, 1] onto itself, fixes 0 and 1; k > 1 pushes t toward noise (0)."""
    return t / (k - (k - 1) * t)


def default_shift(tokens: int, dim: int, base: float = 4096) -> float:
    """The authors' default k = sqrt(tokens * dim / base): 1 for 32 x 128, sqrt(48) for RAE's 256 x 768."""
    return math.sqrt(tokens * dim / base)


def rae_to_ours_time(t_rae: Tensor | float) -> Tensor | float:
    """t = 1 - t_R (RAE: t_R = 0 data, 1 noise)."""
    return 1 - t_rae


ours_to_rae_time = rae_to_ours_time  # the mirror is its own inverse


def rae_to_ours_velocity(v_rae: Tensor) -> Tensor:
    """v = -u: RAE regresses u = eps - z, we regress v = z - eps (the same at mirrored times)."""
    return -v_rae


def rae_shift_time(t_rae: Tensor | float, s: float) -> Tensor | float:
    """RAE's shift t_R' = s t_R / (1 + (s-1) t_R); equals 1 - shift_time(1 - t_R, s)."""
    return s * t_rae / (1 + (s - 1) * t_rae)


def time_grid(steps: int, shift: float, grid: str = "ours") -> Tensor:
    """Float64 sampling times in our frame.

    ours: (steps + 1,) shift_time(linspace(0, 1)): exactly 0.0 first, exactly 1.0 last (steps steps).
    rae:  (steps,) RAE's ODE grid (integrators.py): t_R = rae_shift_time(1 - linspace(0, 0.999, steps)),
          i.e. t = shift_time(linspace(0, 0.999, steps)): steps - 1 Euler steps, ending at
          t_R = rae_shift_time(0.001) (0.00689 for RAE's shift sqrt(48)), not on the data.
    """
    if grid == "rae":
        return shift_time(torch.linspace(0.0, RAE_T_MAX, steps, dtype=torch.float64), shift)
    t = shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)
    t[0], t[-1] = 0.0, 1.0  # exact endpoints: sampling must end on the data, not a rounding short of it
    return t


def sde_grid(steps: int, shift: float, last_step: float) -> Tensor:
    """(steps,) float64 times of the sde sampler: shift_time(linspace(0, 1 - last_step, steps)), SiT's
    grid for the linear path (t0 = 0, t1 = 1 - last_step_size; shift 1 is SiT's uniform grid)."""
    return shift_time(torch.linspace(0.0, 1.0 - last_step, steps, dtype=torch.float64), shift)


def sampler_grid(steps: int, shift: float, method: str, grid: str, sde_last_step: float) -> Tensor:
    """The float64 time points `sample` walks: sde_grid for the sde sampler, else time_grid."""
    return sde_grid(steps, shift, sde_last_step) if method == "sde" else time_grid(steps, shift, grid)


def evaluation_times(cfg: FlowConfig) -> list[float]:
    """The times at which `sample` evaluates the velocity under cfg (for FLOP counts), in order of use."""
    if cfg.sampler == "dopri5":
        raise FlowConfigError("config: flow.sampler dopri5 is adaptive: its evaluations are known only after "
                              "sampling (pass the times `sample` recorded to network_evaluations)")
    grid = sampler_grid(cfg.steps, cfg.shift, cfg.sampler, cfg.grid, cfg.sde_last_step).tolist()
    if cfg.sampler == "sde":
        return grid  # every point, the last one by the noise-free final step
    times = grid[:-1]
    if cfg.sampler == "heun":  # the corrector at t_{i+1} on every step but the last
        times += grid[1:-1]
    if MULTISTEP.get(cfg.sampler, 0) >= 3 and len(grid) > 2:  # ab3's Heun first step
        times.insert(1, grid[1])
    return times


def network_evaluations(cfg: FlowConfig, times: list[float] | None = None) -> int:
    """Network evaluations per image of one sampling run: one DiT forward per velocity evaluation, TWO
    where guidance is on (the guided call is one forward of twice the batch, [x, x] with [y, null], or a
    main plus a guide network's forward under AutoGuidance). The one count that `sample`, samples.json,
    `flops`, `info` and the benchmarks report. `times`: the evaluation times a run recorded (dopri5, whose
    count is known only after sampling); default evaluation_times(cfg)."""
    t = torch.tensor(evaluation_times(cfg) if times is None else times, dtype=torch.float32)  # as `sample` passes t
    return int(len(t) + int((guidance_weights(t, cfg) != 1.0).sum()))


def adaptive_tally(counts: Sequence[tuple[int, int]], earlier: dict | None = None) -> dict:
    """An adaptive solver's evaluations over a sample set: {images, total, min, max} (per image; one
    count per chunk of images integrated together), merged with an earlier run's tally (a resumed set)."""
    images = sum(k for k, _ in counts) + (earlier or {}).get("images", 0)
    total = sum(k * n for k, n in counts) + (earlier or {}).get("total", 0)
    per_image = [n for _, n in counts] + ([earlier["min"], earlier["max"]] if earlier else [])
    return {"images": images, "total": total, "min": min(per_image), "max": max(per_image)}


def mean_evaluations(tally: dict | None) -> float | None:
    """Network evaluations per image of an adaptive solver's tally (None before any image was made)."""
    return round(tally["total"] / tally["images"], 1) if tally else None


def sample_train_time(n: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """(n,) float32 training times in our frame.

    uniform:      t = shift_time(u, k),                                 u ~ U(0, 1)
    logit-normal: t = shift_time(sigmoid(mean + std n), k),             n ~ N(0, 1)
    rae:          t_R = sigmoid(mean + std n), n truncated so that t_R <= 0.999 (inverse CDF, as RAE
                  does), t_R <- rae_shift_time(t_R, k), t = 1 - t_R: RAE's distribution in our frame
    Random numbers come from `generator` (on its device), then move to `device`.
    """
    gen_device = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    if cfg.time_dist == "uniform":
        t = shift_time(u, cfg.shift)
    elif cfg.time_dist == "logit-normal":
        t = shift_time(torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(u)), cfg.shift)
    else:  # rae: U(Phi(-inf), Phi(beta)) -> Phi^-1 is a normal truncated above at logit(0.999)
        beta = (math.log(RAE_T_MAX / (1 - RAE_T_MAX)) - cfg.logit_mean) / cfg.logit_std
        u = u * 0.5 * math.erfc(-beta / math.sqrt(2))  # Phi(beta)
        t_rae = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(u)).clamp(0.0, RAE_T_MAX)
        t = rae_to_ours_time(rae_shift_time(t_rae, cfg.shift))
    return t.to(device=device or gen_device, dtype=torch.float32)


# ----------------------------------------------------------------------------- training
def interpolate(z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) eps + t z; z, eps (B, ...), t (B,)."""
    t = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return (1 - t) * eps + t * z


def velocity_target(z: Tensor, eps: Tensor) -> Tensor:
    """v = z - eps, the constant speed of the straight path from eps to z."""
    return z - eps


def flow_loss(model: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, y: Tensor, cfg: FlowConfig,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MSE between model(x_t, t, y) and v = z - eps at t ~ sample_train_time.

    z (B, ...) data, y (B,) long labels (label dropout is the model's job). Returns (scalar loss,
    t (B,), per-sample loss (B,), detached, for logging loss per t-bucket). The loss is in fp32 (or
    z's dtype if wider) even when the model runs under autocast.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)  # fp32, or fp64 for fp64 data
    t = sample_train_time(z.shape[0], cfg, generator, device=z.device).to(dtype)  # (B,)
    eps_device = generator.device if generator is not None else z.device
    eps = torch.randn(z.shape, generator=generator, device=eps_device, dtype=z.dtype).to(z.device)
    v = model(interpolate(z, eps, t), t, y)
    per_sample = (v.to(dtype) - velocity_target(z, eps).to(dtype)).square().flatten(1).mean(1)  # (B,)
    return per_sample.mean(), t, per_sample.detach()


# ----------------------------------------------------------------------------- guidance
def _in_interval(t: Tensor, interval: tuple[float, float], inclusive: bool) -> Tensor:
    lo, hi = interval
    return (t >= lo) & (t <= hi) if inclusive else (t > lo) & (t < hi)


def guidance_weights(t: Tensor, cfg: FlowConfig) -> Tensor:
    """(B,) float64 guidance weight per row at times t (B,); 1 = no guidance (the conditional velocity).

    cfg_schedule set: the w of the piece holding t (lo <= t < hi, t = 1 in a piece ending at 1), else 1.
    Otherwise cfg_scale inside cfg_interval, else 1; under grid rae a scale <= 1 means no guidance at
    all, as in RAE's sample.py (we extrapolate)."""
    t = t.double()
    w = torch.ones_like(t)
    if cfg.cfg_schedule:
        for lo, hi, scale in cfg.cfg_schedule:
            below_hi = t <= hi if hi == 1.0 else t < hi
            w = torch.where((t >= lo) & below_hi, scale, w)
        return w
    scale = 1.0 if cfg.grid == "rae" and cfg.cfg_scale <= 1.0 else cfg.cfg_scale
    return torch.where(_in_interval(t, cfg.cfg_interval, cfg.cfg_interval_inclusive), scale, w)


def guided_velocity(model: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, t: Tensor, y: Tensor,
                    scale: float | Tensor, null_class: int, interval: tuple[float, float] = (0.225, 1.0),
                    inclusive: bool = False, guide_model: Callable | None = None) -> Tensor:
    """Velocity at (x (B, ...), t (B,)) for labels y (B,), with guidance where t is in `interval`.

    CFG:          v = v_u + w (v_c - v_u), v_c and v_u from ONE forward on [x, x] with labels [y, null].
    AutoGuidance: v = v_weak + w (v_main - v_weak), v_weak = guide_model(x, t, y) (conditional; RAE
                  also feeds a null-label half to the guide but throws it away).
    `scale` is one w or a (B,) tensor of them (guidance_weights). Rows outside the interval (lo < t < hi,
    or lo <= t <= hi if inclusive) or with w == 1 get the plain conditional v_c; when no row is guided
    this costs one conditional forward of the batch as it is.
    """
    w = torch.where(_in_interval(t, interval, inclusive), torch.as_tensor(scale, dtype=torch.float64), 1.0)
    guide = w != 1.0  # (B,)
    if not bool(guide.any()):
        return model(x, t, y)
    if guide_model is not None:
        v_c, v_u = model(x, t, y), guide_model(x, t, y)
    else:
        null = torch.full_like(y, null_class)
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    rows = (-1, *([1] * (x.dim() - 1)))
    guided = v_u + w.to(v_c.dtype).view(rows) * (v_c - v_u)
    return torch.where(guide.view(rows), guided, v_c)


def make_velocity_fn(model: Callable, y: Tensor, cfg: FlowConfig, null_class: int,
                     guide_model: Callable | None = None) -> VelocityFn:
    """The closure (x, t) -> guided velocity that `sample` integrates, with cfg's weights (guidance_weights)."""
    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return guided_velocity(model, x, t, y, guidance_weights(t, cfg), null_class, (0.0, 1.0), True, guide_model)

    return velocity


# ----------------------------------------------------------------------------- sampling
StepNoise = Callable[[int], Tensor]  # step i -> the (B, ...) N(0, I) draw of the sde sampler's step i


def adams_bashforth_weights(times: list[float], i: int, order: int) -> list[float]:
    """Weights b_j of the variable-step Adams-Bashforth step x_{i+1} = x_i + sum_j b_j v_{i-j}: the
    integral over [t_i, t_{i+1}] of the polynomial through the last k = min(order, i + 1) velocities
    (the first steps use the history there is: order 1 is Euler). Exact for polynomials of degree k-1."""
    k = min(order, i + 1)
    nodes = [times[i - j] for j in range(k)]
    a, b = times[i], times[i + 1]
    weights = []
    for j, tj in enumerate(nodes):  # integral of the Lagrange basis polynomial of node j
        basis = torch.tensor([1.0], dtype=torch.float64)  # coefficients, lowest degree first
        for m, tm in enumerate(nodes):
            if m != j:
                basis = _poly_mul(basis, [-tm / (tj - tm), 1 / (tj - tm)])
        powers = torch.arange(1, len(basis) + 1, dtype=torch.float64)
        weights.append(float((basis / powers * (b ** powers - a ** powers)).sum()))
    return weights


def _poly_mul(p: Tensor, q: list[float]) -> Tensor:
    """(p * q) for coefficient vectors, lowest degree first; q has degree 1."""
    out = torch.zeros(len(p) + 1, dtype=torch.float64)
    out[:-1] += p * q[0]
    out[1:] += p * q[1]
    return out


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: Tensor, steps: int, shift: float, method: str = "euler",
           grid: str = "ours", sde_diffusion: float = 1.0, sde_last_step: float = 0.04,
           step_noise: StepNoise | None = None, ode_rtol: float = 1e-3, ode_atol: float = 1e-3,
           record: list[float] | None = None) -> Tensor:
    """Integrate dx/dt = v(x, t) from x_0 = noise (B, ...) at t = 0 to t = 1 on time_grid(steps, shift, grid)
    (grid rae: to RAE's last time point, steps - 1 steps), or (method sde) the reverse SDE.

    euler: x_{i+1} = x_i + h_i v(x_i, t_i)                                  (steps forwards)
    heun:  x' = x_i + h_i v_i;  x_{i+1} = x_i + h_i (v_i + v(x', t_{i+1})) / 2  (trapezoidal
           corrector), except the LAST step, which is Euler (2*steps - 1 forwards): at t = 1 the
           velocity of data on a low-dimensional set is singular (one point z: v = (z - x)/(1 - t)),
           and a trained model returns the average E[z - eps | x_1 = x] = x there, not the path's own
           velocity; the guidance interval (t < 1 by default) would also switch off on a t = 1 corrector.
    sde:   SiT's Euler-Maruyama (transport/sde.py, the linear path, diffusion_form "sigma", last_step
           "Mean") in our frame, steps forwards on sde_grid(steps, shift, sde_last_step). With the score
           s = (t v - x) / (1 - t) (= -eps / (1 - t) on the path) and w = sde_diffusion (1 - t):
             x_{i+1} = x_i + h_i (v_i + w_i s_i) + sqrt(2 w_i h_i) n_i,   n_i = step_noise(i)  (steps - 1)
             x_out   = x + (1 - t_last) (v + w s)                     (the last, noise-free step)
           step_noise defaults to torch.randn_like (the global generator).
    ab2, ab3: variable-step Adams-Bashforth of order 2 / 3 (adams_bashforth_weights) on the same grid:
           one evaluation a step, at t_0 .. t_{n-1} like Euler (never at t = 1), the velocities of the
           last 2 / 3 points extrapolated over the step; the first steps take the order their history
           allows: ab2 starts with an Euler step (steps forwards), ab3 with a Heun step (steps + 1
           forwards), as a lower-order start would cap the global order. In the log-SNR frame this is
           the family of DPM-Solver++(2M/3M).
    dopri5: torchdiffeq's adaptive Dormand-Prince 5(4) (an optional dependency) from t = 0 to 1 with
           ode_rtol / ode_atol; steps is ignored, the evaluations are whatever the error control needs.
    record: a list that receives the time of every velocity evaluation (for network_evaluations).
    t is passed as (B,) float32 (float64 if noise is float64).
    """
    if method not in SAMPLERS:
        raise FlowConfigError(f"config: flow.sampler must be {' or '.join(SAMPLERS)}, got {method!r}")
    if method == "sde" and grid != "ours":
        raise FlowConfigError(f"config: flow.grid must be ours with sampler sde, got {grid!r}")
    t_dtype = torch.promote_types(noise.dtype, torch.float32)

    def v_of(x: Tensor, t_now: float) -> Tensor:
        if record is not None:
            record.append(t_now)
        return velocity_fn(x, torch.full((x.shape[0],), t_now, dtype=t_dtype, device=x.device)).to(x.dtype)

    if method == "dopri5":
        return _dopri5(v_of, noise, ode_rtol, ode_atol)
    times = sampler_grid(steps, shift, method, grid, sde_last_step).tolist()
    n = len(times) - 1

    def v_at(x: Tensor, i: int) -> Tensor:
        return v_of(x, times[i])

    x = noise
    if method in MULTISTEP:
        history: list[Tensor] = []  # the newest velocity first
        order = MULTISTEP[method]
        for i in range(n):
            history = [v_at(x, i), *history][:order]
            if i == 0 and order >= 3 and n > 1:  # a Heun first step: an Euler start would cap the order at 2
                h = times[1] - times[0]
                x = x + 0.5 * h * (history[0] + v_at(x + h * history[0], 1))
                continue
            b = adams_bashforth_weights(times, i, order)
            x = x + sum(bj * vj for bj, vj in zip(b, history))
        return x
    if method == "sde":
        draw = step_noise or (lambda i: torch.randn_like(noise))
        for i in range(n + 1):
            t, h = times[i], (times[i + 1] if i < n else 1.0) - times[i]
            v = v_at(x, i)
            w = sde_diffusion * (1 - t)
            drift = v + w * (t * v - x) / (1 - t)
            x = x + h * drift
            if i < n:
                x = x + math.sqrt(2 * w * h) * draw(i).to(device=x.device, dtype=x.dtype)
        return x
    for i in range(n):
        h = times[i + 1] - times[i]
        v = v_at(x, i)
        if method == "heun" and i < n - 1:
            v_next = v_at(x + h * v, i + 1)
            v = 0.5 * (v + v_next)
        x = x + h * v
    return x


def _dopri5(v_of: Callable[[Tensor, float], Tensor], noise: Tensor, rtol: float, atol: float) -> Tensor:
    try:
        from torchdiffeq import odeint  # optional
    except ImportError:
        raise FlowConfigError("config: flow.sampler dopri5 needs torchdiffeq: pip install 'flatdino[ode]' "
                              "(or pip install torchdiffeq)") from None
    span = torch.tensor([0.0, 1.0], dtype=torch.float64, device=noise.device)
    return odeint(lambda t, x: v_of(x, float(t)), noise, span, rtol=rtol, atol=atol, method="dopri5")[-1]

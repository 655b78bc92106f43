"""FAE's sampling recipe (seed 004, appendix D): the three-part CFG schedule and SiT's Euler-Maruyama
SDE sampler (diffusion w_t = sigma_t, a last noise-free step), checked against formulas written here:
Gaussian data, whose exact velocity is known in closed form, and SiT's own score/drift definitions."""

import math

import pytest
import torch

from flatdino_cli.analysis.flops import dit_forwards_per_image
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.flow import (FlowConfig, FlowConfigError, evaluation_times, guidance_weights, make_velocity_fn,
                               sample, sde_grid, shift_time)
from flatdino_cli.pipeline.options import parse_schedule, sampling_flow

FAE = ((0.0, 0.1, 0.9), (0.1, 0.3, 1.5), (0.3, 1.0, 2.5))  # appendix D's three parts, in our time


# ----------------------------------------------------------------------------- the guidance schedule
def test_schedule_gives_each_time_its_pieces_weight():
    cfg = FlowConfig(cfg_schedule=FAE, cfg_scale=7.0)  # the schedule replaces cfg_scale and cfg_interval
    t = torch.tensor([0.0, 0.05, 0.1, 0.2999, 0.3, 0.7, 1.0])
    assert guidance_weights(t, cfg).tolist() == [0.9, 0.9, 1.5, 1.5, 2.5, 2.5, 2.5]
    gaps = FlowConfig(cfg_schedule=((0.2, 0.4, 3.0), (0.6, 0.8, 0.5)))
    t = torch.tensor([0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
    assert guidance_weights(t, gaps).tolist() == [1.0, 3.0, 1.0, 1.0, 0.5, 1.0, 1.0]  # none between pieces


def test_scheduled_velocity_follows_the_formula_below_and_above_one():
    """w = 0.9 < 1 still mixes (FAE guides weaker than conditional near noise); a gap costs one forward."""
    e = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return 0.5 * x + t[:, None] * e[y]

    x, y = torch.randn(2, 3), torch.tensor([0, 2])
    v = make_velocity_fn(model, y, FlowConfig(cfg_schedule=((0.0, 0.1, 0.9), (0.5, 1.0, 2.5))), 3)
    for t0, w in ((0.05, 0.9), (0.7, 2.5)):
        t = torch.full((2,), t0)
        v_c, v_u = 0.5 * x + t0 * e[y], 0.5 * x + t0 * e[3]
        torch.testing.assert_close(v(x, t), v_u + w * (v_c - v_u))
    calls.clear()
    torch.testing.assert_close(v(x, torch.full((2,), 0.3)), 0.5 * x + 0.3 * e[y])
    assert calls == [2]


@pytest.mark.parametrize("bad", [((0.0, 0.5, 2.0), (0.4, 1.0, 2.0)),  # overlapping
                                 ((0.5, 1.0, 2.0), (0.0, 0.5, 2.0)),  # descending
                                 ((0.0, 1.5, 2.0),), ((0.3, 0.3, 2.0),), ((0.0, 1.0, -1.0),), ((0.0, 1.0),)])
def test_bad_schedules_are_config_errors(bad):
    with pytest.raises(FlowConfigError, match="cfg_schedule"):
        FlowConfig(cfg_schedule=bad)


def test_command_line_schedule_and_overrides():
    assert parse_schedule("0-0.1:0.9,0.1-0.3:1.5,0.3-1:2.5") == FAE
    fae = sampling_flow(load_preset("fae-g-xl-16x16x32").flow, paper=True)  # FAE's 250 Euler steps
    assert fae.cfg_schedule == FAE and (fae.sampler, fae.steps, fae.shift) == ("euler", 250, 0.4)
    assert sampling_flow(fae).cfg_schedule == FAE
    single = sampling_flow(fae, cfg_scale=1.0)  # --cfg replaces the schedule
    assert single.cfg_schedule == () and single.cfg_scale == 1.0
    assert sampling_flow(FlowConfig(), schedule=FAE).cfg_schedule == FAE
    # FLOPs: 250 Euler steps, each guided (the pieces cover [0, 1)) -> 500 forwards; unguided SDE: 250
    assert dit_forwards_per_image(fae) == 500
    assert dit_forwards_per_image(sampling_flow(fae, cfg_scale=1.0, sampler="sde")) == 250


# ----------------------------------------------------------------------------- the SDE sampler
def gaussian_velocity(mean: float, std: float):
    """The exact v(x, t) = E[z - eps | x_t = x] for data z ~ N(mean, std^2) per coordinate."""
    def v(x, t):
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        var = t ** 2 * std ** 2 + (1 - t) ** 2
        return mean + (t * std ** 2 - (1 - t)) * (x - t * mean) / var
    return v


def test_sde_sampler_draws_from_the_data_distribution():
    """Euler-Maruyama with the exact velocity of Gaussian data lands on that Gaussian; so does the ODE."""
    mean, std = 0.7, 0.5
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    v = gaussian_velocity(mean, std)
    x_sde = sample(v, noise, 250, 1.0, "sde", step_noise=lambda i: torch.randn(noise.shape, generator=g,
                                                                               dtype=torch.float64))
    x_ode = sample(v, noise, 250, 1.0, "euler")
    for x in (x_sde, x_ode):
        assert abs(float(x.mean()) - mean) < 0.01
        assert abs(float(x.std()) / std - 1) < 0.02
    # the SDE is stochastic: the same start reaches other points than the ODE, the same distribution
    assert float((x_sde - x_ode).abs().mean()) > 0.05


def test_sde_steps_equal_sits_euler_maruyama_by_hand():
    """SiT's transport for the linear path (alpha_t = t, sigma_t = 1 - t, t = 1 data, as ours): score from
    the velocity, drift v + w s, diffusion w = norm * sigma_t, steps over linspace(0, 1 - last, n), then
    one 'Mean' step of last_step_size with the drift alone."""
    steps, last, norm = 6, 0.04, 0.8
    e = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def velocity(x, t):  # any smooth field of x and t
        return torch.tanh(x) * (1 + t[:, None]) - e * t[:, None]

    draws = [torch.randn(3, 5, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64)
             for i in range(steps)]
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def sit_drift(x, t):
        tt = torch.full((3,), t, dtype=torch.float64)
        v = velocity(x, tt)
        alpha, d_alpha, sigma, d_sigma = t, 1.0, 1 - t, -1.0
        var = sigma ** 2 - (alpha / d_alpha) * d_sigma * sigma  # SiT's get_score_from_velocity
        score = ((alpha / d_alpha) * v - x) / var
        return v + norm * sigma * score, norm * sigma

    ts = torch.linspace(0, 1 - last, steps, dtype=torch.float64).tolist()
    dt = ts[1] - ts[0]
    x = x0
    for i, t in enumerate(ts[:-1]):
        drift, diffusion = sit_drift(x, t)
        x = x + drift * dt + math.sqrt(2 * diffusion) * draws[i] * math.sqrt(dt)
    x = x + sit_drift(x, ts[-1])[0] * last
    ours = sample(velocity, x0, steps, 1.0, "sde", sde_diffusion=norm, sde_last_step=last,
                  step_noise=lambda i: draws[i])
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)
    assert len(evaluation_times(FlowConfig(sampler="sde", steps=steps))) == steps  # SiT: num_steps forwards


def test_sde_grid_is_sits_and_shifted_like_every_grid():
    torch.testing.assert_close(sde_grid(250, 1.0, 0.04), torch.linspace(0, 0.96, 250, dtype=torch.float64))
    torch.testing.assert_close(sde_grid(5, 0.4, 0.04), shift_time(torch.linspace(0, 0.96, 5, dtype=torch.float64), 0.4))
    with pytest.raises(FlowConfigError, match="grid"):
        FlowConfig(sampler="sde", grid="rae")
    with pytest.raises(FlowConfigError, match="sde_last_step"):
        FlowConfig(sampler="sde", sde_last_step=0.0)

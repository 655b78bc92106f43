"""The multistep (ab2, ab3) and adaptive (dopri5) samplers of flatdino_cli.flow: their order on a
Gaussian field whose flow is known in closed form, their guidance against Euler's when forced to take
Euler steps, torchdiffeq as the reference, and the one count of network evaluations."""

from __future__ import annotations

import math

import pytest
import torch

from flatdino_cli import flow as F
from flatdino_cli.flow import FlowConfig, make_velocity_fn, network_evaluations, sample, time_grid

NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- a Gaussian with a known flow
MU, S = 0.7, 0.4  # data z ~ N(MU, S^2) per coordinate: x_t = t MU + sigma_t x_0, sigma_t^2 = (1-t)^2 + t^2 S^2


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var = (1 - t) ** 2 + t ** 2 * S ** 2
    return MU + (t * S ** 2 - (1 - t)) / var * (x - t * MU)  # d/dt of t MU + sigma_t x_0, in terms of x_t


def _error(method: str, steps: int, x0: torch.Tensor) -> float:
    x1 = sample(gaussian_velocity, x0, steps, 2.0, method)
    return float((x1 - (MU + S * x0)).abs().max())


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2), ("ab2", 2), ("ab3", 3)])
def test_solver_order_on_a_gaussian_flow(method, order):
    x0 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)[:, None]
    errors = [_error(method, steps, x0) for steps in (32, 64, 128)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.35 for r in rates), (method, errors, rates)


def test_multistep_beats_euler_at_equal_evaluations():
    x0 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)[:, None]
    assert _error("ab2", 10, x0) < _error("euler", 10, x0) / 4
    assert _error("ab3", 9, x0) < _error("ab2", 10, x0)  # ab3's Heun start: 9 steps = 10 evaluations


def test_adams_bashforth_weights_reduce_to_the_uniform_step_tables():
    torchdiffeq = pytest.importorskip("torchdiffeq")  # the test extra installs it
    from torchdiffeq._impl.fixed_adams import _BASHFORTH_COEFFICIENTS, _DIVISOR

    h, times = 0.125, [0.125 * i for i in range(6)]
    for order in (2, 3):
        ours = F.adams_bashforth_weights(times, 4, order)
        ref = [h * c / _DIVISOR[order] for c in _BASHFORTH_COEFFICIENTS[order]]
        assert ours == pytest.approx(ref, abs=1e-12), (order, torchdiffeq.__version__)
    assert F.adams_bashforth_weights([0.0, 0.3], 0, 3) == pytest.approx([0.3])  # no history: Euler


# ----------------------------------------------------------------------------- guidance, as with Euler
class TinyNet(torch.nn.Module):
    """A random nonlinear class-conditional velocity network (B, 3, 4) -> (B, 3, 4)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(4, 16, generator=g) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(16, 4, generator=g) / 4)
        self.emb = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, 16, generator=g))
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        return torch.tanh(x @ self.w1 + self.emb[y][:, None] + t[:, None, None]) @ self.w2


@pytest.mark.parametrize("method", ["ab2", "ab3"])
@pytest.mark.parametrize("guidance", ["interval", "schedule", "autoguidance"])
def test_forced_euler_steps_give_eulers_guided_path(method, guidance, monkeypatch):
    cfg = {"interval": FlowConfig(shift=2.0, steps=12, cfg_scale=3.0, cfg_interval=(0.3, 0.8)),
           "schedule": FlowConfig(shift=2.0, steps=12, cfg_schedule=((0.0, 0.2, 1.5), (0.5, 1.0, 4.0))),
           "autoguidance": FlowConfig(shift=2.0, steps=12, cfg_scale=2.0)}[guidance]
    net, weak = TinyNet(0), TinyNet(1)
    guide = weak if guidance == "autoguidance" else None
    y, noise = torch.tensor([0, 3]), torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    v = make_velocity_fn(net, y, cfg, NUM_CLASSES, guide)
    euler = sample(v, noise, cfg.steps, cfg.shift, "euler")
    euler_calls, net.calls = net.calls, []
    unguided = make_velocity_fn(net, y, FlowConfig(), NUM_CLASSES)
    assert not torch.allclose(euler, sample(unguided, noise, 12, 2.0, "euler"), atol=1e-4)  # guidance matters
    net.calls = []
    assert not torch.allclose(sample(v, noise, cfg.steps, cfg.shift, method), euler, atol=1e-4)  # a real change
    net.calls = []
    monkeypatch.setitem(F.MULTISTEP, method, 1)
    forced = sample(v, noise, cfg.steps, cfg.shift, method)
    assert torch.allclose(forced, euler, atol=1e-6)
    assert net.calls == euler_calls  # the same forwards, guided (doubled) at the same steps


# ----------------------------------------------------------------------------- dopri5 and the count
def test_dopri5_matches_torchdiffeq_and_reports_its_evaluations():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    x0 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)[:, None]
    record: list[float] = []
    x1 = sample(gaussian_velocity, x0, 1, 1.0, "dopri5", ode_rtol=1e-7, ode_atol=1e-7, record=record)
    assert float((x1 - (MU + S * x0)).abs().max()) < 1e-5
    calls = []

    def f(t, x):
        calls.append(float(t))
        return gaussian_velocity(x, t.expand(x.shape[0]))

    ref = torchdiffeq.odeint(f, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-7, atol=1e-7)[-1]
    assert torch.allclose(x1, ref, atol=1e-12) and len(record) == len(calls) > 10
    cfg = FlowConfig(sampler="dopri5", cfg_scale=2.0)
    guided = sum(1 for t in record if 0.225 < t < 1.0)
    assert 0 < guided < len(record) and network_evaluations(cfg, record) == len(record) + guided
    with pytest.raises(F.FlowConfigError, match="adaptive"):
        network_evaluations(cfg)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ab2", "ab3", "sde"])
def test_network_evaluations_counts_the_forwards_sample_runs(sampler):
    cfg = FlowConfig(shift=2.0, steps=10, sampler=sampler, cfg_scale=2.5)
    net = TinyNet(0)
    record: list[float] = []
    sample(make_velocity_fn(net, torch.tensor([1]), cfg, NUM_CLASSES), torch.randn(1, 3, 4), cfg.steps, cfg.shift,
           sampler, record=record)
    assert network_evaluations(cfg) == sum(net.calls) == network_evaluations(cfg, record)  # batch 1: forwards
    assert network_evaluations(FlowConfig(steps=10, sampler=sampler)) == len(record)  # unguided: one each
    assert time_grid(10, 2.0).numel() == 11

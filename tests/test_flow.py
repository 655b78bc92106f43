"""Tests for flatdino_cli.flow: the time/sign convention against exact marginal velocity fields,
the time grid and shift, RAE's sampling grid (guided only above scale 1), RAE's training-time
distribution mirrored into our frame, guidance (CFG, interval, AutoGuidance) and the flow-matching
loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from flatdino_cli.errors import UserError
from flatdino_cli.flow import (RAE_T_MAX, FlowConfig, default_shift, flow_loss, guided_velocity, interpolate,
                               make_velocity_fn, ours_to_rae_time, rae_shift_time, rae_to_ours_time,
                               rae_to_ours_velocity, sample, sample_train_time, shift_time, time_grid,
                               velocity_target)

N_SAMPLES = 20_000  # 2-D closed-form fields: many samples are cheap and keep the sampling error small


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # every tensor here is tiny: intra-op threads only add synchronisation, which on a shared,
    # oversubscribed 2-core machine made each elementwise op ~20x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- exact marginal velocity fields
def _matvec(M: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(K, 2, 2) @ (B, K, 2) written out: einsum/bmm on 2x2 blocks is ~10x slower on CPU."""
    d0, d1 = d[..., 0], d[..., 1]
    return torch.stack([M[:, 0, 0] * d0 + M[:, 0, 1] * d1, M[:, 1, 0] * d0 + M[:, 1, 1] * d1], -1)


class GaussianMixture:
    """z ~ sum_k pi_k N(mu_k, S_k) in 2-D, and the exact v(x, t) = E[z - eps | x_t = x] for our path.

    Per component x_t ~ N(t mu, C_t) with C_t = (1-t)^2 I + t^2 S and Cov(z - eps, x_t) = t S - (1-t) I,
    so E_k[v | x] = mu + (t S - (1-t) I) C_t^{-1} (x - t mu); the mixture weights these by the
    component posteriors r_k(x) ~ pi_k N(x; t mu_k, C_t,k).
    """

    def __init__(self, pis, mus, covs):
        self.pi = torch.tensor(pis, dtype=torch.float64)
        self.mu = torch.tensor(mus, dtype=torch.float64)  # (K, 2)
        self.cov = torch.tensor(covs, dtype=torch.float64)  # (K, 2, 2)

    def mean(self) -> torch.Tensor:
        return (self.pi[:, None] * self.mu).sum(0)

    def covariance(self) -> torch.Tensor:
        m = self.mean()
        d = self.mu - m
        return (self.pi[:, None, None] * (self.cov + d[:, :, None] * d[:, None, :])).sum(0)

    def _components(self, x: torch.Tensor, t: float):
        eye = torch.eye(2, dtype=torch.float64)
        C = (1 - t) ** 2 * eye + t**2 * self.cov  # (K, 2, 2)
        Cinv = torch.linalg.inv(C)
        A = (t * self.cov - (1 - t) * eye) @ Cinv  # (K, 2, 2): E_k[v | x] = mu_k + A_k (x - t mu_k)
        d = x[:, None, :] - t * self.mu  # (B, K, 2)
        logp = self.pi.log() - 0.5 * (d * _matvec(Cinv, d)).sum(-1) - 0.5 * torch.logdet(C)  # (B, K)
        return logp.softmax(-1), self.mu + _matvec(A, d)  # (B, K), (B, K, 2)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert torch.all(t == t[0])  # the sampler passes one time for the whole batch
        r, v_k = self._components(x, t[0].item())
        return (r[..., None] * v_k).sum(1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        return self._components(x, 1.0)[0]


GAUSSIAN = GaussianMixture([1.0], [[1.0, -2.0]], [[[2.0, 0.6], [0.6, 0.5]]])
MIXTURE = GaussianMixture([0.3, 0.7], [[-2.5, 0.5], [2.0, -0.5]],
                          [[[0.3, 0.1], [0.1, 0.4]], [[0.5, -0.2], [-0.2, 0.3]]])


def _noise(n: int = N_SAMPLES, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_moments_match(x: torch.Tensor, target: GaussianMixture):
    """Sample mean / covariance within 4 standard errors of the target's.

    The standard error of each statistic is estimated from the samples themselves (std of the
    per-sample terms x_i, resp. (x_i - m)(x_j - m), over sqrt(n)); 4 SE puts a false failure at
    ~6e-5 per entry. With n = 20000, 4 SE is 0.02-0.06 for the means and 0.02-0.13 for the
    covariance entries. The integrator's own bias (against a 200-step Heun run from the same noise)
    is measured at <= 0.07 SE for the means and <= 1.0 SE for the covariances with 400 Euler steps
    (<= 0.75 SE with 50 Heun steps), which leaves >= 3 SE for sampling noise: the bound tests the
    convention, not the integrator.
    """
    n = x.shape[0]
    m = x.mean(0)
    se_m = x.std(0) / math.sqrt(n)
    assert torch.all((m - target.mean()).abs() < 4 * se_m), (m, target.mean(), se_m)
    d = x - m
    prods = d[:, :, None] * d[:, None, :]  # (n, 2, 2)
    se_c = prods.std(0) / math.sqrt(n)
    cov = prods.mean(0)
    assert torch.all((cov - target.covariance()).abs() < 4 * se_c), (cov, target.covariance(), se_c)


@pytest.mark.parametrize("target", [GAUSSIAN, MIXTURE], ids=["gaussian", "mixture"])
@pytest.mark.parametrize("method,steps", [("euler", 400), ("heun", 50)])
def test_exact_velocity_field_transports_noise_to_target(target, method, steps):
    x = sample(target.velocity, _noise(), steps=steps, shift=3.0, method=method)
    _assert_moments_match(x, target)
    # the mixture's mode weights: E_{x ~ target}[r_k(x)] = pi_k exactly; the SE is from the samples
    r = target.responsibilities(x)
    se = r.std(0) / math.sqrt(x.shape[0])
    assert torch.all((r.mean(0) - target.pi).abs() < 4 * se + 1e-12), (r.mean(0), target.pi)


def test_wrong_sign_convention_fails_the_moment_check():
    # the check above must be able to fail: integrating -v (RAE's target in our frame) goes elsewhere
    x = sample(lambda x, t: -GAUSSIAN.velocity(x, t), _noise(), steps=100, shift=3.0)
    with pytest.raises(AssertionError):
        _assert_moments_match(x, GAUSSIAN)


def test_heun_beats_euler_at_few_steps():
    noise = _noise(4000, seed=1)
    for target in (GAUSSIAN, MIXTURE):
        ref = sample(target.velocity, noise, steps=100, shift=3.0, method="heun")  # ~0.001 from exact
        x = {(m, n): sample(target.velocity, noise, steps=n, shift=3.0, method=m)
             for m in ("euler", "heun") for n in (8, 16)}
        err = {k: (v - ref).norm(dim=1).mean().item() for k, v in x.items()}  # mean pathwise error
        cov_err = {k: (v.T.cov() - ref.T.cov()).abs().max().item() for k, v in x.items()}
        # measured: Heun/Euler ~0.45-0.5 on paths and ~0.25-0.35 on covariances at 8 steps
        assert err["heun", 8] < 0.6 * err["euler", 8], err
        assert cov_err["heun", 8] < 0.5 * cov_err["euler", 8], cov_err
        # second order: doubling the steps divides Heun's error by ~4 (measured 0.28), Euler's by ~2
        assert err["heun", 16] < 0.35 * err["heun", 8], err
        assert err["euler", 16] > 0.4 * err["euler", 8], err


def test_heun_last_step_is_euler_so_point_targets_are_hit_exactly():
    # a single data point z0: v(x, t) = (z0 - x) / (1 - t) is singular at t = 1, where a final
    # corrector would evaluate it (and, for a trained model, would average in v(x, 1) = E[z - eps]
    # = z0, not this path's z0 - eps). An Euler last step lands exactly on z0.
    z0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    v = lambda x, t: (z0 - x) / (1 - t)[:, None]  # noqa: E731
    for method in ("euler", "heun"):
        x = sample(v, _noise(100), steps=8, shift=3.0, method=method)
        assert torch.allclose(x, z0.expand_as(x), atol=1e-12), method


def test_sampler_forward_counts_and_time_argument():
    seen = []

    def vf(x, t):
        seen.append(t.clone())
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        return torch.zeros_like(x)

    sample(vf, torch.zeros(3, 4, 5), steps=6, shift=2.0, method="euler")
    assert len(seen) == 6 and seen[0][0] == 0.0 and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    assert all(s[0] < 1.0 for s in seen)  # Euler never evaluates at t = 1
    seen.clear()
    sample(vf, torch.zeros(3, 4, 5), steps=6, shift=2.0, method="heun")
    assert len(seen) == 2 * 6 - 1  # the last step is Euler
    with pytest.raises(ValueError, match="sampler"):
        sample(vf, torch.zeros(2, 2), steps=2, shift=1.0, method="rk4")


# ----------------------------------------------------------------------------- grid and shift
@pytest.mark.parametrize("steps", [1, 7, 50, 250])
@pytest.mark.parametrize("shift", [1.0, 3.0, math.sqrt(48), 0.25])
def test_time_grid_endpoints_exact_and_monotone(steps, shift):
    g = time_grid(steps, shift)
    assert g.shape == (steps + 1,)
    assert g[0].item() == 0.0 and g[-1].item() == 1.0
    assert torch.all(g[1:] > g[:-1])
    assert torch.allclose(g, shift_time(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift))


def test_shift_values():
    assert shift_time(0.5, 3.0) == pytest.approx(0.25)  # 0.5 / (3 - 2 * 0.5)
    assert shift_time(0.5, 1.0) == 0.5 and shift_time(0.0, 3.0) == 0.0 and shift_time(1.0, 3.0) == 1.0
    assert time_grid(2, 3.0)[1].item() == pytest.approx(0.25)
    assert default_shift(32, 128) == 1.0
    assert default_shift(16 * 16, 768) == pytest.approx(math.sqrt(48)) == pytest.approx(6.9282032)


# ----------------------------------------------------------------------------- RAE's sampling grid
def test_rae_grid_reproduces_raes_49_steps():
    """RAE's integrators.ode: t = 1 - linspace(0, 0.999, 50), then s t / (1 + (s - 1) t), s = sqrt(48)."""
    s = math.sqrt(16 * 16 * 768 / 4096)
    t = 1 - torch.linspace(0, 1 - 1 / 1000, 50)
    rae = s * t / (1 + (s - 1) * t)
    ours = 1 - time_grid(50, s, "rae")
    assert ours.shape == (50,)  # 49 Euler steps
    torch.testing.assert_close(ours.float(), rae, rtol=0, atol=1e-6)
    assert abs(float(ours[-1]) - 0.00689) < 1e-5 and float(ours[0]) == 1.0


def test_rae_grid_guides_only_above_scale_one():
    """Under grid rae a scale <= 1 is plain conditional sampling (RAE's sample.py); ours extrapolates."""
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * (y[:, None, None].float() + 1)

    x, t, y = torch.ones(2, 3, 4), torch.full((2,), 0.5), torch.tensor([1, 2])
    for grid, scale, guided in (("rae", 0.5, False), ("rae", 1.0, False), ("rae", 1.5, True), ("ours", 0.5, True)):
        calls.clear()
        v = make_velocity_fn(model, y, FlowConfig(cfg_scale=scale, cfg_interval=(0.0, 1.0), grid=grid), 9)(x, t)
        cond = model(x, t, y)
        assert (calls[0] == 4) == guided and torch.equal(v, cond) != guided


# ----------------------------------------------------------------------------- RAE in our frame
def _rae_reference_times(n: int, s: float, seed: int = 0) -> np.ndarray:
    """RAE's training times, transcribed independently with scipy: logit(t_R) ~ N(0, 1) truncated to
    t_R in [0, 0.999], t_R <- s t_R / (1 + (s-1) t_R); returned in our frame, t = 1 - t_R."""
    b = special.logit(0.999)
    zeta = stats.truncnorm.rvs(-np.inf, b, loc=0.0, scale=1.0, size=n, random_state=np.random.default_rng(seed))
    t_rae = special.expit(zeta)
    t_rae = s * t_rae / (1 + (s - 1) * t_rae)
    return 1.0 - t_rae


def test_rae_training_time_distribution_matches_transcription():
    n, s = 200_000, default_shift(256, 768)
    ours = sample_train_time(n, FlowConfig(time_dist="rae", shift=s), torch.Generator().manual_seed(3)).numpy()
    ref = _rae_reference_times(n, s)
    # two-sample KS at the 0.1 % level: critical value 1.95 * sqrt(2 / n) ~ 0.0087
    crit = 1.95 * math.sqrt(2 / n)
    assert stats.ks_2samp(ours, ref).statistic < crit
    q = np.linspace(0.01, 0.99, 99)
    assert np.abs(np.quantile(ours, q) - np.quantile(ref, q)).max() < 0.01
    assert ours.min() >= 1 - rae_shift_time(RAE_T_MAX, s) - 1e-7 and ours.max() <= 1.0
    assert np.median(ours) == pytest.approx(1 - s / (1 + s), abs=0.005)  # median of t_R is shift(0.5)
    # the comparison has power: the uniform-then-shifted distribution (our default) is far from it
    uni = sample_train_time(n, FlowConfig(time_dist="uniform", shift=s), torch.Generator().manual_seed(3)).numpy()
    assert stats.ks_2samp(uni, ref).statistic > 10 * crit
    # and mirroring matters: without t = 1 - t_R the distributions differ
    assert stats.ks_2samp(1 - ours, ref).statistic > 10 * crit


def test_other_time_distributions():
    g = torch.Generator().manual_seed(0)
    t = sample_train_time(100_000, FlowConfig(time_dist="uniform", shift=3.0), g)
    assert t.dtype == torch.float32 and t.shape == (100_000,)
    # P(t' <= 0.25) = P(u <= 0.5) for k = 3: half the mass goes below 0.25, toward noise
    assert (t <= 0.25).double().mean().item() == pytest.approx(0.5, abs=0.01)
    ln = sample_train_time(100_000, FlowConfig(time_dist="logit-normal", logit_mean=0.5, logit_std=0.8), g)
    logit = torch.logit(ln.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02) and logit.std().item() == pytest.approx(0.8, abs=0.02)
    a = sample_train_time(10, FlowConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_train_time(10, FlowConfig(), torch.Generator().manual_seed(5)))


def test_rae_mapping_same_point_and_velocity_sign():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(6, 4, 3, generator=g), torch.randn(6, 4, 3, generator=g)
    t = torch.rand(6, generator=g)
    t_rae = ours_to_rae_time(t)
    # RAE: x = (1 - t_R) z + t_R eps, u = eps - z
    x_rae = (1 - t_rae)[:, None, None] * z + t_rae[:, None, None] * eps
    assert torch.allclose(interpolate(z, eps, t), x_rae, atol=1e-6)
    assert torch.equal(velocity_target(z, eps), rae_to_ours_velocity(eps - z))
    assert torch.allclose(rae_to_ours_time(t_rae), t)
    # RAE's shift on t_R is our shift on t = 1 - t_R, with the same number
    s = default_shift(256, 768)
    assert torch.allclose(1 - rae_shift_time(t_rae, s), shift_time(t, s), atol=1e-6)


# ----------------------------------------------------------------------------- guidance
NUM_CLASSES = 5


class FakeModel(torch.nn.Module):
    """v = a * x + t * e[y]: depends on x, t and the label; counts forwards and their batch sizes."""

    def __init__(self, a: float = 0.5, seed: int = 0):
        super().__init__()
        self.a = a
        self.e = torch.randn(NUM_CLASSES + 1, 3, 4, generator=torch.Generator().manual_seed(seed))
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return self.a * x + t[:, None, None] * self.e[y]


def _guided_by_hand(m: FakeModel, x, t, y, w, null=NUM_CLASSES):
    v_c = m.a * x + t[:, None, None] * m.e[y]
    v_u = m.a * x + t[:, None, None] * m.e[torch.full_like(y, null)]
    return v_c, v_u + w * (v_c - v_u)


def test_cfg_inside_outside_and_one_doubled_forward():
    m = FakeModel()
    x, y, w = torch.randn(4, 3, 4), torch.tensor([0, 1, 2, 3]), 4.5
    t_in = torch.full((4,), 0.5)
    v = guided_velocity(m, x, t_in, y, w, NUM_CLASSES)
    v_c, guided = _guided_by_hand(m, x, t_in, y, w)
    assert torch.allclose(v, guided, atol=1e-6) and not torch.allclose(v, v_c)
    assert len(m.calls) == 1 and m.calls[0][0] == 8
    assert torch.equal(m.calls[0][1], torch.tensor([0, 1, 2, 3, 5, 5, 5, 5]))  # [y, null]
    m.calls.clear()
    t_out = torch.full((4,), 0.1)
    assert torch.allclose(guided_velocity(m, x, t_out, y, w, NUM_CLASSES), _guided_by_hand(m, x, t_out, y, w)[0])
    assert [c[0] for c in m.calls] == [4]  # outside the interval: one plain conditional forward
    m.calls.clear()
    assert torch.allclose(guided_velocity(m, x, t_in, y, 1.0, NUM_CLASSES), v_c)
    assert [c[0] for c in m.calls] == [4]  # scale 1: no doubling
    # a batch straddling the interval: per-element choice
    t_mix = torch.tensor([0.1, 0.5, 0.9, 1.0])
    v_c, guided = _guided_by_hand(m, x, t_mix, y, w)
    want = torch.stack([v_c[0], guided[1], guided[2], v_c[3]])
    assert torch.allclose(guided_velocity(m, x, t_mix, y, w, NUM_CLASSES), want, atol=1e-6)


@pytest.mark.parametrize("inclusive", [False, True])
def test_cfg_interval_boundaries(inclusive):
    m = FakeModel()
    x, y, w = torch.randn(2, 3, 4), torch.tensor([1, 4]), 3.0
    for edge in (0.225, 1.0):
        t = torch.full((2,), edge)  # float32, exactly the boundary value as the sampler passes it
        v_c, guided = _guided_by_hand(m, x, t, y, w)
        v = guided_velocity(m, x, t, y, w, NUM_CLASSES, interval=(0.225, 1.0), inclusive=inclusive)
        assert torch.allclose(v, guided if inclusive else v_c, atol=1e-6), (edge, inclusive)
        assert not torch.allclose(guided, v_c)
    t = torch.full((2,), time_grid(50, 3.0)[40].item())  # any point strictly inside: guided either way
    assert torch.allclose(guided_velocity(m, x, t, y, w, NUM_CLASSES, inclusive=inclusive),
                          _guided_by_hand(m, x, t, y, w)[1], atol=1e-6)


def test_autoguidance_uses_the_weak_model_conditionally():
    main, weak = FakeModel(a=0.5, seed=0), FakeModel(a=0.2, seed=1)
    x, y, w = torch.randn(3, 3, 4), torch.tensor([0, 2, 4]), 1.42
    t = torch.full((3,), 0.6)
    v_main = main.a * x + t[:, None, None] * main.e[y]
    v_weak = weak.a * x + t[:, None, None] * weak.e[y]
    v = guided_velocity(main, x, t, y, w, NUM_CLASSES, guide_model=weak)
    assert torch.allclose(v, v_weak + w * (v_main - v_weak), atol=1e-6)
    assert [c[0] for c in main.calls] == [3] and [c[0] for c in weak.calls] == [3]
    assert torch.equal(weak.calls[0][1], y)  # no null labels: AutoGuidance is conditional on both sides
    main.calls.clear(), weak.calls.clear()
    t_out = torch.full((3,), 0.1)
    assert torch.allclose(guided_velocity(main, x, t_out, y, w, NUM_CLASSES, guide_model=weak),
                          main.a * x + t_out[:, None, None] * main.e[y])
    assert len(main.calls) == 1 and weak.calls == []


def test_make_velocity_fn_in_the_sampler():
    m = FakeModel()
    cfg = FlowConfig(shift=3.0, steps=10, cfg_scale=4.0)
    y = torch.tensor([0, 1])
    sample(make_velocity_fn(m, y, cfg, NUM_CLASSES), torch.randn(2, 3, 4), cfg.steps, cfg.shift, cfg.sampler)
    grid = time_grid(cfg.steps, cfg.shift)[:-1]
    n_in = int(((grid > 0.225) & (grid < 1.0)).sum())
    assert 0 < n_in < cfg.steps
    assert [c[0] for c in m.calls] == [2] * (cfg.steps - n_in) + [4] * n_in  # one forward per step


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("time_dist", ["uniform", "logit-normal", "rae"])
def test_flow_loss_zero_for_oracle_on_a_point_target(time_dist):
    cfg = FlowConfig(time_dist=time_dist, shift=3.0)
    z0 = torch.randn(1, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = {}

    def oracle(x, t, y):  # a single data point: v = z - eps = (z0 - x_t) / (1 - t)
        seen["x"], seen["t"], seen["y"] = x, t, y
        return (z0 - x) / (1 - t)[:, None, None]

    z = z0.expand(256, -1, -1)
    y = torch.arange(256) % 7
    loss, t, per = flow_loss(oracle, z, y, cfg, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-12 and per.shape == (256,) and t.shape == (256,)
    assert seen["x"].shape == z.shape and seen["t"].shape == (256,) and torch.equal(seen["y"], y)
    # a different point: the oracle is now off by (z0 - z1) / (1 - t) exactly, at the returned t
    z1 = z0 + 0.5
    loss, t, per = flow_loss(oracle, z1.expand(256, -1, -1), y, cfg, torch.Generator().manual_seed(0))
    assert loss.item() > 0.1
    assert torch.allclose(per, 0.25 / (1 - t) ** 2, rtol=1e-6)
    assert torch.allclose(loss, per.mean())


def test_flow_loss_gradients_and_reproducibility():
    net = torch.nn.Linear(6, 6)
    model = lambda x, t, y: net(x) + t[:, None, None]  # noqa: E731
    z, y = torch.randn(8, 4, 6), torch.zeros(8, dtype=torch.long)
    l1, t1, _ = flow_loss(model, z, y, FlowConfig(), torch.Generator().manual_seed(0))
    l2, t2, _ = flow_loss(model, z, y, FlowConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(l1, l2) and torch.equal(t1, t2)
    l1.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_flow_config_validation():
    for bad in (dict(time_dist="normal"), dict(shift=0.0), dict(logit_std=0.0), dict(sampler="rk4"),
                dict(steps=0), dict(cfg_scale=-1.0), dict(cfg_interval=(0.6, 0.2)), dict(cfg_interval=(0.0, 1.5))):
        with pytest.raises(ValueError, match="flow." + next(iter(bad))):
            FlowConfig(**bad)
    with pytest.raises(UserError):  # the CLI prints it as a one-line error
        FlowConfig(sampler="rk4")
    assert FlowConfig(cfg_interval=[0.1, 0.9]).cfg_interval == (0.1, 0.9)

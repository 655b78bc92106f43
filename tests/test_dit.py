"""Acceptance tests of the generator (LightningDiT + flow matching, `flatdino train-dit`).

- a tiny DiT trained through the real CLI on a class-conditional Gaussian mixture of 4 x 2 "latents"
  reproduces every class's mean and covariance, and CFG (w > 1) concentrates samples on their class;
- the real xl-32x128 preset builds and takes 2 real optimizer steps through train_dit -> fit (in a
  subprocess; the 11 GB checkpoint write is replaced by a recorder, see that test), and the full
  CLI, with its checkpoint, runs on s-32x128 in one process and under torchrun with 2 gloo processes;
- RAE mode (normalize: true) writes RUN/stats.pt in RAE's (C, H, W) format and reading it back
  standardises the store;
- a resume on other latents is refused unless --new-data, and a store written before the view axis
  trains on its one view and says so.
The presets' parameter counts, init and time distribution: test_presets.py.

Wall time on 2 shared cores with other jobs running: ~2.5 min for the file. XL ~75 s (and ~14 GB of
RAM: weights, grads, AdamW and EMA of 675M parameters), the Gaussian mixture ~40 s, torchrun ~20 s,
the s-32x128 CLI ~17 s, the rest ~4 s. Subprocesses use one torch thread: on a busy 2-core machine
two threads contend and small elementwise ops become ~100x slower.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flatdino_cli.config_yaml import load_config, load_preset
from flatdino_cli.data import Store
from flatdino_cli.errors import UserError
from flatdino_cli.flow import FlowConfig, make_velocity_fn, sample
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import CPU
from flatdino_cli.stages.dit import train_dit

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
def write_latents(path: Path, x: np.ndarray, labels, kind: str = "latents") -> Path:
    """A finished store of rows x (n, T, d) float32 with integer labels."""
    n = len(x)
    st = Store.create(path, kind, x.shape[1:], n, "float32", identity={"test": "dit"}, preprocessing={},
                      paths=[f"row{i}" for i in range(n)], labels=list(labels))
    st.write_rows(np.arange(n), x.astype(np.float32))
    st.mark_done(np.arange(n))
    st.finalize()
    st.close()
    return path


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny models run fastest on one thread of a shared machine (two threads contend and spin)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- 1. the Gaussian-mixture run
# K classes of T tokens x D dims. Token j of class k has mean r s_j (cos th_k, sin th_k) and covariance
# s_j^2 A_k (tokens independent), so the model must use the label (means and covariance shapes differ
# per class) and the position (scales s_j differ per token). r sets the class overlap: the Bayes
# classifier under the true mixture is right ~85% of the time, which leaves room for CFG to show.
K, T_TOK, D_TOK = 3, 4, 2
R = 0.35
SCALES = np.array([0.6, 0.8, 1.0, 1.2])
A = np.array([[[0.30, 0.12], [0.12, 0.20]], [[0.20, -0.10], [-0.10, 0.30]], [[0.25, 0.0], [0.0, 0.15]]])
ROWS_PER_CLASS = 2000
TRAIN_STEPS = 600
M_SAMPLES = 400  # per class
SAMPLER, SAMPLE_STEPS = "heun", 20  # 39 forwards; Euler would need ~100 for the same discretisation bias
CFG_W = 4.0

TINY_DIT_YAML = f"""\
stage: dit
model: {{tokens: {T_TOK}, in_dim: {D_TOK}, width: 64, depth: 2, heads: 2, mlp_hidden: 171, num_classes: {K},
         class_dropout: 0.1, pos_embed: sincos, rope: true}}
flow: {{time_dist: uniform, shift: 1.0, sampler: {SAMPLER}, steps: {SAMPLE_STEPS}, cfg_scale: 1.0,
        cfg_interval: [0.225, 1.0]}}
train: {{epochs: 1000, max_steps: {TRAIN_STEPS}, batch_size: 128, lr: 2.0e-3, betas: [0.9, 0.95],
         weight_decay: 0.0, grad_clip: 1.0, ema: 0.99, ckpt_every_steps: 100000, log_every: 100}}
"""


def gmm_moments() -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, T*D) and covariances (K, T*D, T*D), tokens flattened row-major."""
    th = 2 * np.pi * np.arange(K) / K
    mu = np.stack([np.concatenate([R * s * np.array([np.cos(a), np.sin(a)]) for s in SCALES]) for a in th])
    cov = np.zeros((K, T_TOK * D_TOK, T_TOK * D_TOK))
    for k in range(K):
        for j, s in enumerate(SCALES):
            cov[k, 2 * j: 2 * j + 2, 2 * j: 2 * j + 2] = s**2 * A[k]
    return mu, cov


def gmm_log_lik(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """(n, K) log N(x; mu_k, cov_k) (equal class priors, so argmax = Bayes classifier)."""
    from scipy.stats import multivariate_normal

    return np.stack([multivariate_normal(mu[k], cov[k]).logpdf(x) for k in range(K)], 1)


def exact_class_velocity(mu: np.ndarray, cov: np.ndarray, k: int):
    """The exact flow-matching velocity of class k alone (a Gaussian), our convention:
    x_t ~ N(t mu, C_t), C_t = (1-t)^2 I + t^2 S, v = mu + (t S - (1-t) I) C_t^-1 (x - t mu)."""
    m, S = torch.from_numpy(mu[k]), torch.from_numpy(cov[k])
    eye = torch.eye(len(m), dtype=torch.float64)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xf, tt = x.reshape(len(x), -1), float(t[0])
        C = (1 - tt) ** 2 * eye + tt**2 * S
        out = m + torch.linalg.solve(C, (xf - tt * m).T).T @ (tt * S - (1 - tt) * eye).T
        return out.reshape(x.shape)

    return v


def moment_errors(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> tuple[float, np.ndarray]:
    """Whitened errors of samples x (M, d) against N(mu, cov): (|L^-1 (mean - mu)|, eigenvalues of
    L^-1 C L^-T) with cov = L L^T; a perfect sampler gives ~0 and eigenvalues ~1."""
    L = np.linalg.cholesky(cov)
    e = np.linalg.solve(L, x.mean(0) - mu)
    Wc = np.linalg.solve(L, np.linalg.solve(L, np.cov(x.T, bias=True)).T)
    return float(np.linalg.norm(e)), np.linalg.eigvalsh(0.5 * (Wc + Wc.T))


def tolerances(M: int, d: int) -> tuple[float, float, float]:
    """(max whitened mean error, min and max whitened covariance eigenvalue) for M samples in d dims.

    Sampling: M |e|^2 ~ chi2_d, and chi2_8 exceeds 31.8 with probability 1e-4; the eigenvalues of a
    sample covariance of M draws fill the Marchenko-Pastur range (1 -+ sqrt(d/M))^2 (0.74..1.30 for
    M = 400, d = 8). On top, an allowance for the model (a tiny DiT after 600 steps) and the 20-step
    Heun sampler: 0.2 data standard deviations on the mean, +-20% on the variances (the exact
    velocity under the same sampler and noise lands at ~0.1 and 0.75..1.26, the trained model at
    ~0.18 and 0.72..1.34). Result for M = 400: mean error < 0.48, eigenvalues in (0.59, 1.56). For
    scale: every other class mean is >= 1.98 whitened units away, and flipping the sign of class 0's
    or 1's token correlation gives whitened eigenvalues of ~0.35-0.4 and ~2.4-2.9, so label mix-ups and
    wrong covariance shapes fail.
    """
    from scipy.stats import chi2

    mean_tol = math.sqrt(chi2.ppf(1 - 1e-4, d) / M) + 0.2
    q = math.sqrt(d / M)
    return mean_tol, (1 - q) ** 2 * 0.8, (1 + q) ** 2 * 1.2


@torch_threads(1)
def test_gmm_train_dit_cli_learns_class_moments_and_cfg_concentrates(tmp_path, cli):
    mu, cov = gmm_moments()
    d = T_TOK * D_TOK
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.multivariate_normal(mu[k], cov[k], ROWS_PER_CLASS) for k in range(K)])
    labels = np.repeat(np.arange(K), ROWS_PER_CLASS)
    write_latents(tmp_path / "latents", x.reshape(-1, T_TOK, D_TOK), labels)
    (tmp_path / "tiny-dit-gmm.yaml").write_text(TINY_DIT_YAML)
    mean_tol, eig_lo, eig_hi = tolerances(M_SAMPLES, d)

    # the criterion itself: the exact class velocity under the same sampler and noise passes it,
    # and the same samples checked against the wrong class fail it
    noise = torch.randn(K * M_SAMPLES, T_TOK, D_TOK, generator=torch.Generator().manual_seed(1))
    per_class = noise.view(K, M_SAMPLES, T_TOK, D_TOK)
    for k in range(K):
        xs = sample(exact_class_velocity(mu, cov, k), per_class[k].double(), SAMPLE_STEPS, 1.0, SAMPLER)
        xs = xs.reshape(M_SAMPLES, d).numpy()
        err, eig = moment_errors(xs, mu[k], cov[k])
        print(f"exact velocity, class {k}: mean error {err:.3f}, eigenvalues {eig.min():.2f}..{eig.max():.2f}")
        assert err < mean_tol - 0.15 and eig_lo + 0.1 < eig.min() and eig.max() < eig_hi - 0.1, (k, err, eig)
        err_wrong, _ = moment_errors(xs, mu[(k + 1) % K], cov[(k + 1) % K])
        assert err_wrong > 3 * mean_tol, (k, err_wrong)

    p = cli("train-dit", "--preset", tmp_path / "tiny-dit-gmm.yaml", "--latents", tmp_path / "latents",
            "--out", tmp_path / "run", "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert f"train-dit: {TRAIN_STEPS} steps" in p.stdout
    log = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == TRAIN_STEPS and log[-1]["loss"] < log[0]["loss"]

    cfg, ema, _ = load_run(tmp_path / "run", "dit")  # EMA weights, eval mode
    assert not ema.training and cfg.model.num_classes == K
    y = torch.arange(K).repeat_interleave(M_SAMPLES)
    own = {}
    for w in (1.0, CFG_W):
        flow = FlowConfig(cfg_scale=w, cfg_interval=cfg.flow.cfg_interval)
        xs = sample(make_velocity_fn(ema, y, flow, cfg.model.num_classes), noise, SAMPLE_STEPS,
                    cfg.flow.shift, SAMPLER).reshape(K * M_SAMPLES, d).double().numpy()
        own[w] = (gmm_log_lik(xs, mu, cov).argmax(1) == y.numpy()).mean()
        if w == 1.0:
            for k in range(K):
                err, eig = moment_errors(xs[k * M_SAMPLES:(k + 1) * M_SAMPLES], mu[k], cov[k])
                print(f"class {k}: whitened mean error {err:.3f} (tol {mean_tol:.3f}), covariance "
                      f"eigenvalues {eig.min():.2f}..{eig.max():.2f} (tol {eig_lo:.2f}..{eig_hi:.2f})")
                assert err < mean_tol, f"class {k}: whitened mean error {err:.3f} >= {mean_tol:.3f}"
                assert eig_lo < eig.min() and eig.max() < eig_hi, \
                    f"class {k}: whitened covariance eigenvalues {eig.round(2)} outside ({eig_lo:.2f}, {eig_hi:.2f})"
    # true data: the Bayes classifier is right on ~85% of each class; unguided samples must look the
    # same (+-6 points: 3 binomial SEs of 1200 samples plus model error), guided ones clearly more
    bayes = (gmm_log_lik(x, mu, cov).argmax(1) == labels).mean()
    print(f"Bayes-correct fraction: data {bayes:.3f}, samples w=1 {own[1.0]:.3f}, w={CFG_W} {own[CFG_W]:.3f}")
    assert abs(own[1.0] - bayes) < 0.06, (own, bayes)
    assert own[CFG_W] > max(own[1.0] + 0.05, 0.95), (own, bayes)


# ----------------------------------------------------------------------------- 2. the real presets run
XL_SCRIPT = """
import json, sys, time, resource
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, {tests!r})
from test_dit import write_latents
from flatdino_cli import train as train_mod
from flatdino_cli.config_yaml import load_preset
from flatdino_cli.runtime import setup_runtime
from flatdino_cli.stages.dit import train_dit

out = Path({out!r})
cfg = load_preset("xl-32x128", ["train.max_steps=2", "train.batch_size=2"])
n, (T, d) = 4, (cfg.model.tokens, cfg.model.in_dim)
write_latents(out / "latents", np.random.default_rng(0).standard_normal((n, T, d)), [0, 1, 2, 999])  # 1000 classes
saved, steps, t0 = [], [], [time.perf_counter()]

def record_checkpoint(run_dir, which, model, ema, state):  # stands in for the 11 GB write
    saved.append(dict(which=which, step=state["step"], ema=ema is not None,
                      same_keys=list(model.state_dict()) == list(ema.state_dict()),
                      n_opt_states=len(state["optimizer"]["state"])))

def on_step(step, model, ema):
    b0 = model.blocks[0].adaLN_modulation[1].weight
    steps.append(dict(step=step, s=time.perf_counter() - t0[0], final=model.final_layer.linear.weight.abs().max().item(),
                      ada0=b0.abs().max().item(), ema_final=ema.final_layer.linear.weight.abs().max().item(),
                      trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      trainable_tensors=sum(p.requires_grad for p in model.parameters())))
    t0[0] = time.perf_counter()

train_mod.save_checkpoint = record_checkpoint
train_dit(cfg, out / "run", setup_runtime("cpu", "fp32", False), out / "latents", on_step=on_step)
log = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
print("RESULT " + json.dumps(dict(steps=steps, saved=saved, log=log,
                                  maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


def test_xl_preset_builds_and_takes_two_real_steps(tmp_path):
    """The real xl-32x128 (675M parameters) through train_dit -> fit: 2 AdamW steps of batch 2 with
    EMA, clipping and the preset's everything. ~75-110 s and ~14 GB RSS on this CPU, so it runs in a
    subprocess (the memory goes back to the OS at exit), and `fit`'s checkpoint write, which would
    put 11 GB on disk (model + EMA 2.7 GB each, AdamW state 5.4 GB), is replaced by a recorder; the
    write itself is covered by the s-32x128 CLI tests below, through the same code.
    """
    code = XL_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="2")  # big GEMMs: both cores (the suite runs one test at a time)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    s1, s2 = res["steps"]
    assert s1["trainable"] == 675_478_016
    # zero-initialised output layer: step 1 moves it (weight decay alone cannot move a zero) but no
    # gradient reaches block 0's zero adaLN yet; step 2 has a gradient through all 28 blocks
    assert s1["final"] > 0 and s1["ada0"] == 0 and s2["ada0"] > 0
    assert 0 < s1["ema_final"] < s1["final"] * 1e-3  # EMA 0.9995: one step moves it by 5e-4 of the model
    (ck,) = res["saved"]  # one checkpoint, at the end, with the EMA copy and the AdamW state
    assert (ck["which"], ck["step"], ck["ema"], ck["same_keys"]) == ("latest", 2, True, True)
    assert ck["n_opt_states"] == s1["trainable_tensors"]
    assert res["log"][-1]["step"] == 2 and math.isfinite(res["log"][-1]["loss"])


def _s_preset_latents(path: Path) -> Path:
    x = np.random.default_rng(0).standard_normal((8, 32, 128)).astype(np.float32)
    return write_latents(path, x, [0, 1, 2, 3, 4, 5, 6, 999])  # the preset's 1000 classes (train-dit reads the store's)


S_SETS = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.log_every=1"]


def test_train_dit_cli_s_preset_writes_a_loadable_checkpoint(tmp_path, cli):
    latents = _s_preset_latents(tmp_path / "latents")
    p = cli("train-dit", "--preset", "s-32x128", "--latents", latents, "--out", tmp_path / "run", *S_SETS,
            "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert "train-dit: 2 steps" in p.stdout
    ck = tmp_path / "run" / "checkpoints" / "latest"
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 1
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg == load_preset("s-32x128", ["train.max_steps=2", "train.batch_size=2", "train.log_every=1"])
    raw, ema = load_file(str(ck / "model.safetensors")), load_file(str(ck / "ema.safetensors"))
    assert raw.keys() == ema.keys() and "t_embedder.W" in raw and "pos_embed" in raw  # frozen tensors travel
    assert torch.equal(raw["t_embedder.W"], ema["t_embedder.W"])
    w = "final_layer.linear.weight"
    assert raw[w].abs().max() > 0 and not torch.equal(raw[w], ema[w])  # EMA lags the trained weights
    _, model, sha = load_run(tmp_path / "run", "dit")  # the EMA weights, by default
    assert torch.equal(model.state_dict()[w], ema[w]) and len(sha) == 64
    with torch.no_grad():
        v = model(torch.randn(2, 32, 128), torch.rand(2), torch.tensor([0, 1000]))
    assert v.shape == (2, 32, 128) and torch.isfinite(v).all()


def test_train_dit_torchrun_two_gloo_processes(tmp_path):
    """torchrun with 2 CPU (gloo) processes, on s-32x128: xl-32x128 needs ~14 GB per process and
    this machine has 24 GB, so two XL processes cannot fit; the DDP code path is the same."""
    latents = _s_preset_latents(tmp_path / "latents")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "flatdino_cli.cli", "train-dit", "--preset", "s-32x128", "--latents", str(latents),
           "--out", str(tmp_path / "run"), *S_SETS, "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("train-dit: 2 steps") == 1  # rank 0 reports
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2
    log = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)


# ----------------------------------------------------------------------------- 3. RAE mode
RAE_TINY_YAML = """\
base: rae-xl-256x768
model: {tokens: 6, grid: [2, 3], in_dim: 4, width: 32, depth: 1, heads: 2, mlp_hidden: 64, num_classes: 3}
train: {max_steps: 1, batch_size: 4, log_every: 1}
"""


def test_normalize_writes_rae_stats_chw_and_reading_them_back_standardises(tmp_path):
    from flatdino_cli.runtime import setup_runtime
    from flatdino_cli.models.stats import STATS_FILE, load_stats
    from flatdino_cli.stages.dit import train_dit

    h, w, C, n = 2, 3, 4, 64
    rng = np.random.default_rng(0)
    loc = rng.normal(0, 3, (h * w, C))  # a different mean and scale at every (position, channel)
    scale = rng.uniform(0.2, 4, (h * w, C))
    x = (loc + scale * rng.standard_normal((n, h * w, C))).astype(np.float32)
    write_latents(tmp_path / "feats", x, rng.integers(0, 3, n), kind="features")
    (tmp_path / "rae-tiny.yaml").write_text(RAE_TINY_YAML)
    cfg = load_preset(str(tmp_path / "rae-tiny.yaml"))
    with torch_threads(1):
        train_dit(cfg, tmp_path / "run", setup_runtime("cpu", "fp32", False), tmp_path / "feats")

    stats = torch.load(tmp_path / "run" / STATS_FILE, weights_only=True)
    assert set(stats) == {"mean", "var"} and stats["mean"].shape == stats["var"].shape == (C, h, w)
    xd = x.astype(np.float64)
    # RAE's layout: stats[c, i, j] belongs to token i * w + j
    for i, j, c in [(0, 0, 0), (1, 2, 3), (0, 2, 1), (1, 0, 2)]:
        tok = i * w + j
        assert stats["mean"][c, i, j].item() == pytest.approx(xd[:, tok, c].mean(), rel=1e-5, abs=1e-5)
        assert stats["var"][c, i, j].item() == pytest.approx(xd[:, tok, c].var(), rel=1e-4)
    z = load_stats(tmp_path / "run" / STATS_FILE, (h, w)).normalize(torch.from_numpy(x)).double()  # (n, h*w, C)
    assert z.mean(0).abs().max() < 1e-4
    assert (z.var(0, unbiased=False) - 1).abs().max() < 1e-4  # var / (var + 1e-5), var >= 0.04


def test_normalize_on_flat_tokens_round_trips(tmp_path):
    """A 1-D token sequence (no grid) with normalize: true is stored as (C, T, 1), RAE's 3-D format."""
    from flatdino_cli.runtime import setup_runtime
    from flatdino_cli.models.stats import STATS_FILE, load_stats
    from flatdino_cli.stages.dit import train_dit

    rng = np.random.default_rng(1)
    x = (rng.normal(0, 2, (1, 4, 2)) + rng.uniform(0.5, 2, (1, 4, 2)) * rng.standard_normal((32, 4, 2))).astype(np.float32)
    write_latents(tmp_path / "latents", x, rng.integers(0, K, 32))
    (tmp_path / "tiny.yaml").write_text(TINY_DIT_YAML)
    cfg = load_preset(str(tmp_path / "tiny.yaml"), ["normalize=true", "train.max_steps=1", "train.batch_size=8"])
    with torch_threads(1):
        train_dit(cfg, tmp_path / "run", setup_runtime("cpu", "fp32", False), tmp_path / "latents")
    assert torch.load(tmp_path / "run" / STATS_FILE, weights_only=True)["mean"].shape == (2, 4, 1)
    z = load_stats(tmp_path / "run" / STATS_FILE, None).normalize(torch.from_numpy(x)).double()
    assert z.mean(0).abs().max() < 1e-4 and (z.var(0, unbiased=False) - 1).abs().max() < 1e-4


# ----------------------------------------------------------------------------- 4. the data it trains on
def test_train_dit_refuses_to_resume_on_other_latents(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4, 2)).astype(np.float32)
    a = write_latents(tmp_path / "a", x, [i % K for i in range(32)])
    b = write_latents(tmp_path / "b", x, [(i + 1) % K for i in range(32)])  # other images' labels: another source
    (tmp_path / "tiny.yaml").write_text(TINY_DIT_YAML)
    cfg = load_preset(str(tmp_path / "tiny.yaml"), ["train.max_steps=2", "train.batch_size=8"])
    train_dit(cfg, tmp_path / "run", CPU, a)
    more = load_preset(str(tmp_path / "tiny.yaml"), ["train.max_steps=4", "train.batch_size=8"])
    with pytest.raises(UserError, match=r"other data.*differs in source_hash.*--new-data"):
        train_dit(more, tmp_path / "run", CPU, b)
    assert train_dit(more, tmp_path / "run", CPU, b, new_data=True)["step"] == 4
    rec = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert rec["data_path"] == str(b.resolve()) and rec["previous_inputs"][0]["data_path"] == str(a.resolve())


def tiny_dit(epochs: int, **over):
    """A tiny-dit config for (4, 8) latents of 2 classes, batch 4 (test_extract.py uses it too)."""
    sets = ["model.tokens=4", "model.in_dim=8", "model.width=32", "model.depth=1", "model.heads=2",
            "model.mlp_hidden=64", "model.num_classes=2", f"train.epochs={epochs}", "train.batch_size=4",
            "train.warmup_epochs=0", "train.decay_epochs=1", "train.ckpt_every_steps=1000"]
    return load_preset("tiny-dit", sets + [f"{k}={v}" for k, v in over.items()])


@pytest.mark.usefixtures("one_thread")
def test_one_view_store_still_trains_without_flips_and_says_so(tmp_path, capsys):
    n = 8
    s = Store.create(tmp_path / "lat", "latents", (4, 8), n, "float32", {"vae": "x"}, {},
                     [f"i{i}" for i in range(n)], [i % 2 for i in range(n)])
    s.write_rows(np.arange(n), np.random.default_rng(0).standard_normal((n, 4, 8)).astype(np.float32))
    s.mark_done(np.arange(n))
    s.finalize().close()
    m = json.loads((tmp_path / "lat/manifest.json").read_text())
    del m["views"]  # as written before the view axis existed
    (tmp_path / "lat/manifest.json").write_text(json.dumps(m))
    assert Store.open(tmp_path / "lat").views == 1
    train_dit(tiny_dit(1), tmp_path / "dit", CPU, tmp_path / "lat")
    out = capsys.readouterr().out
    assert "one view per image" in out and out.count("--mirror") == 1

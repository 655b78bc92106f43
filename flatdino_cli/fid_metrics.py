"""The numbers `flatdino fid` reports, from features: Frechet distance, Inception Score, precision/recall.

Definitions follow the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py):
- FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with S = np.cov(features) (N - 1 denominator).
- IS: softmax over the logits, split into consecutive groups of 5000 (10 splits for 50k samples),
  exp(mean KL(p(y|x) || p(y))) per split, averaged; we also report the std over splits.
- Precision/recall (Kynkaanniemi et al. 2019, k = 3): each point's radius is the squared distance
  to its k-th nearest neighbour in its own set (self excluded); precision = fraction of samples
  inside some reference ball, recall = fraction of references inside some sample ball (<=).

Where we differ from ADM's code (not its definitions):
- tr sqrt(S1 S2) is computed from eigen/singular values of a symmetric factorisation instead of
  scipy.linalg.sqrtm: the same number (4e-13 relative on full-rank 2048-d covariances) but exact for
  rank-deficient covariances (fewer images than dimensions), where sqrtm turns round-off into
  sqrt(1e-16) per zero eigenvalue (FID(X, X) = -3e-4 for 32 images) and sometimes aborts on an
  "imaginary component"; and 2-3x faster at 2048-d.
- pairwise distances are float32 (ADM tries float16 first and falls back to float32 on overflow).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Gaussian", "frechet_distance", "inception_score", "precision_recall", "knn_radii"]


@dataclass
class Gaussian:
    """Mean (D,) and covariance of a feature set; `root` (R, D) with sigma = root.T @ root when R <= D.

    Keeping the centred features as the root (when there are fewer images than dimensions) is both
    smaller than sigma and what makes FD exact in that regime.
    """

    mu: np.ndarray
    sigma: np.ndarray | None = None
    root: np.ndarray | None = None

    @classmethod
    def from_features(cls, x: np.ndarray) -> "Gaussian":
        n, d = x.shape  # (N, D)
        if n < 2:
            raise ValueError("need at least 2 feature vectors for a covariance")
        mu = x.mean(0, dtype=np.float64)
        if n <= d:
            return cls(mu, root=(x.astype(np.float64) - mu) / np.sqrt(n - 1))
        return cls(mu, sigma=np.cov(x, rowvar=False))  # float64, as ADM's np.cov of float32 features

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def cov(self) -> np.ndarray:
        return self.sigma if self.sigma is not None else self.root.T @ self.root

    def trace(self) -> float:
        return float(np.trace(self.sigma)) if self.sigma is not None else float(np.sum(self.root**2))


def _psd_root(sigma: np.ndarray) -> np.ndarray:
    """R (D, D) with R.T @ R = sigma for symmetric PSD sigma (round-off negatives clipped)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))).T


def _trace_sqrt_product(a: Gaussian, b: Gaussian) -> float:
    """tr sqrt(Sa Sb) = sum of sqrt of the eigenvalues of Sa Sb, all real and >= 0 for PSD Sa, Sb.

    With Sa = Ra^T Ra: the non-zero eigenvalues of Sa Sb are those of Ra Sb Ra^T, and when Sb = Rb^T Rb
    too, they are the squared singular values of Ra Rb^T (so no square root of round-off is taken).
    """
    if a.root is None and b.root is not None:
        a, b = b, a
    ra = a.root if a.root is not None else _psd_root(a.sigma)
    if b.root is not None:
        return float(np.linalg.svd(ra @ b.root.T, compute_uv=False).sum())
    m = ra @ b.sigma @ ra.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """|mu_a - mu_b|^2 + tr(Sa) + tr(Sb) - 2 tr sqrt(Sa Sb)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    diff = a.mu.astype(np.float64) - b.mu.astype(np.float64)
    return float(diff @ diff + a.trace() + b.trace() - 2 * _trace_sqrt_product(a, b))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """ADM's IS over consecutive splits of `split_size` rows -> (mean, std over splits).

    Computed in float64 from log-softmax, so classes with underflowing probability give 0, not NaN.
    """
    x = np.asarray(logits, dtype=np.float64)  # (N, C)
    x = x - x.max(1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i:i + split_size]
        p = np.exp(part)
        kl = (p * (part - np.log(p.mean(0)))).sum(1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 as ADM does."""
    d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0, out=d)


def knn_radii(x: np.ndarray, k: int = 3, block: int = 5000) -> np.ndarray:
    """(N, D) -> (N,) squared distance to the k-th nearest neighbour, self excluded (ADM's radii:
    entry k of the sorted distance row, whose entry 0 is the point itself). Peak memory block x (block + k + 1)."""
    n = len(x)
    if n <= k:
        raise ValueError(f"need more than k={k} feature vectors, got {n}")
    radii = np.empty(n, dtype=x.dtype)
    for i in range(0, n, block):
        best = None  # (b, <= k + 1) smallest distances so far, unordered
        for j in range(0, n, block):
            d = _sqdist(x[i:i + block], x[j:j + block])
            cand = d if best is None else np.concatenate([best, d], 1)
            m = min(k + 1, cand.shape[1])
            best = np.partition(cand, m - 1, axis=1)[:, :m]
        radii[i:i + block] = np.partition(best, k, axis=1)[:, k]
    return radii


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, block: int = 5000) -> tuple[float, float]:
    """ADM's improved precision and recall of `samples` (N_s, D) against `ref` (N_r, D), k-NN balls.

    Distances are computed block by block (block x block floats at a time), never N_s x N_r at once.
    """
    r, s = np.asarray(ref, dtype=np.float32), np.asarray(samples, dtype=np.float32)
    rad_r, rad_s = knn_radii(r, k, block), knn_radii(s, k, block)
    sample_in = np.zeros(len(s), dtype=bool)  # inside some reference ball -> precision
    ref_in = np.zeros(len(r), dtype=bool)  # inside some sample ball -> recall
    for i in range(0, len(r), block):
        for j in range(0, len(s), block):
            d = _sqdist(r[i:i + block], s[j:j + block])  # (b_r, b_s)
            sample_in[j:j + block] |= (d <= rad_r[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= rad_s[None, j:j + block]).any(1)
    return float(sample_in.mean()), float(ref_in.mean())

"""Distances between two sets of samples in a low-dimensional space (exact, no learned feature extractor).

* `sliced_wasserstein(x, y)`: the sliced 2-Wasserstein distance, sqrt(E_theta W_2^2(theta.x, theta.y)) over
  fixed random unit directions theta; the 1-D W_2 is computed exactly from sorted projections (quantile
  functions, linearly interpolated when the two sets have different sizes).
* `frechet_distance(x, y)`: ||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), the Frechet
  (2-Wasserstein) distance between Gaussians fitted to the two sets (what FID computes on Inception features).
* `RandomFeatureMap`: a fixed, seeded random tanh layer [x, tanh(W x + b)], the "fixed feature map" for the
  Frechet distance of low-dimensional data.
All functions take torch tensors or numpy arrays [N, D] and return Python floats; they compute in float64.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def random_directions(dim: int, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors in R^dim, uniform on the sphere, from a fixed seed: [n, dim]."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, dim))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _quantiles(sorted_proj: np.ndarray, n: int) -> np.ndarray:
    """Quantile function of each column of sorted samples [m, P] at the n mid-point levels (i + 0.5) / n."""
    m = sorted_proj.shape[0]
    if m == n:
        return sorted_proj
    levels = (np.arange(n) + 0.5) / n * m - 0.5
    levels = np.clip(levels, 0, m - 1)
    lo = np.floor(levels).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    frac = (levels - lo)[:, None]
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between sample sets x [N, D] and y [M, D] (fixed projection seed)."""
    x, y = _np(x), _np(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch {x.shape} vs {y.shape}")
    theta = random_directions(x.shape[1], num_projections, seed)
    px, py = np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0)
    n = max(len(px), len(py))
    qx, qy = _quantiles(px, n), _quantiles(py, n)
    return float(np.sqrt(np.mean((qx - qy) ** 2)))


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    x = _np(x)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2) (symmetric PSD square roots, no complex parts)."""
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))
    return max(d, 0.0)


def frechet_distance(x, y) -> float:
    """Frechet distance between Gaussian fits of sample sets x [N, D] and y [M, D]."""
    return frechet_from_stats(*gaussian_stats(x), *gaussian_stats(y))


class RandomFeatureMap:
    """phi(x) = [x, tanh(W x + b)] with W ~ N(0, scale^2 / D), b ~ U(-pi, pi), fixed by `seed`."""

    def __init__(self, in_dim: int, num_features: int = 32, scale: float = 1.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((in_dim, num_features)) * scale / np.sqrt(in_dim)
        self.b = rng.uniform(-np.pi, np.pi, num_features)

    def __call__(self, x) -> np.ndarray:
        x = _np(x)
        return np.concatenate([x, np.tanh(x @ self.w + self.b)], axis=1)

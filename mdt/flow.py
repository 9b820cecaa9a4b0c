"""Rectified-flow conventions of TRELLIS and the Euler sampler, independent of any network.

x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε, t ∈ [0, 1] (t = 1 is noise); velocity target (1 − σ_min)·ε − x0;
networks receive 1000·t. Everything here works on dense tensors [B, ...] and on SparseTensor alike.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mdt.sparse import SparseTensor

SIGMA_MIN = 1e-5
TIME_SCALE = 1000.0
log = logging.getLogger(__name__)


def batch_size_of(x) -> int:
    return x.batch_size if isinstance(x, SparseTensor) else x.shape[0]


def per_sample(t: Tensor, like):
    """Broadcast a per-sample value t [B] against x: [B, 1, ...] for dense, [N, 1] rows for sparse."""
    if isinstance(like, SparseTensor):
        return t.to(like.feats.dtype)[like.batch_idx].unsqueeze(1)
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noise_sample(x0, eps, t: Tensor, sigma_min: float = SIGMA_MIN):
    """x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε, t [B]."""
    tt = per_sample(t, x0)
    return x0 * (1 - tt) + eps * (sigma_min + (1 - sigma_min) * tt)


def velocity_target(x0, eps, sigma_min: float = SIGMA_MIN):
    return eps * (1 - sigma_min) - x0


def x0_from_velocity(x_t, v, t: Tensor, sigma_min: float = SIGMA_MIN):
    tt = per_sample(t, x_t)
    return x_t * (1 - sigma_min) - v * (sigma_min + (1 - sigma_min) * tt)


def eps_from_velocity(x_t, v, t: Tensor):
    tt = per_sample(t, x_t)
    return v * (1 - tt) + x_t


def randn_like(x, generator: torch.Generator | None = None):
    if isinstance(x, SparseTensor):
        return x.replace(torch.randn(x.feats.shape, generator=generator, device=x.device, dtype=x.dtype))
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@dataclass
class UniformSchedule:
    """t ~ U(0, 1)."""

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return torch.rand(n, generator=generator, device=device)


@dataclass
class LogitNormalSchedule:
    """t = sigmoid(N(mean, std)); TRELLIS image-large uses mean 1, std 1 (skewed towards noise)."""

    mean: float = 1.0
    std: float = 1.0

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=device))


def time_schedule(name: str, mean: float = 1.0, std: float = 1.0):
    if name == "uniform":
        return UniformSchedule()
    if name in ("logit_normal", "logitNormal"):
        return LogitNormalSchedule(mean, std)
    raise ValueError(f"unknown time schedule {name!r} (uniform, logit_normal)")


def time_grid(steps: int, rescale_t: float = 1.0) -> list[float]:
    """linspace(1, 0, steps + 1) mapped through t' = s·t / (1 + (s − 1)·t)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    s = rescale_t
    return [s * t / (1 + (s - 1) * t) for t in torch.linspace(1, 0, steps + 1).tolist()]


def uses_guidance(t: float, cfg_strength: float, cfg_interval: tuple[float, float]) -> bool:
    return cfg_strength > 0 and cfg_interval[0] <= t <= cfg_interval[1]


def count_nfe(steps: int, cfg_strength: float = 0.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
              rescale_t: float = 1.0) -> int:
    """Network evaluations of one sampling run (a guided step costs two)."""
    grid = time_grid(steps, rescale_t)
    return sum(2 if uses_guidance(t, cfg_strength, cfg_interval) else 1 for t in grid[:-1])


def guided_velocity(model: Callable, x, t: float, cond, neg_cond, cfg_strength: float,
                    cfg_interval: tuple[float, float]):
    """(1 + w)·v(cond) − w·v(neg_cond) inside the guidance interval, v(cond) outside it."""
    n = batch_size_of(x)
    t_in = torch.full((n,), TIME_SCALE * t, dtype=torch.float32, device=x.device)
    v = model(x, t_in, cond)
    if uses_guidance(t, cfg_strength, cfg_interval):
        v_neg = model(x, t_in, neg_cond)
        v = v * (1 + cfg_strength) - v_neg * cfg_strength
    return v


class FlowEulerSampler:
    """Euler integration of the learned velocity from t = 1 (noise) to t = 0, with optional classifier-free
    guidance restricted to an interval of t (TRELLIS's guidance-interval sampler when cfg_interval is given)."""

    def __init__(self, sigma_min: float = SIGMA_MIN):
        self.sigma_min = sigma_min

    @torch.no_grad()
    def sample(self, model: Callable, noise, cond: Tensor, neg_cond: Tensor | None = None, steps: int = 25,
               rescale_t: float = 1.0, cfg_strength: float = 0.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
               return_trajectory: bool = False, progress: bool = False):
        n = batch_size_of(noise)
        if cond.shape[0] == 1 and n > 1:
            cond = cond.expand(n, *cond.shape[1:])
        if neg_cond is None:
            neg_cond = torch.zeros_like(cond)
        elif neg_cond.shape[0] == 1 and n > 1:
            neg_cond = neg_cond.expand(n, *neg_cond.shape[1:])
        grid = time_grid(steps, rescale_t)
        x, trajectory = noise, [noise]
        for i, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:])):
            v = guided_velocity(model, x, t, cond, neg_cond, cfg_strength, tuple(cfg_interval))
            x = x - v * (t - t_prev)
            if return_trajectory:
                trajectory.append(x)
            if progress:
                log.info("sampling step %d/%d (t=%.4f)", i + 1, steps, t)
        return (x, trajectory) if return_trajectory else x

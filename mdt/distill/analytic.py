"""A flow whose transport map is known in closed form: a test oracle and toy problem for the objectives.

Data x0 ~ N(mu, s^2) independently per element (mu may differ per sample/element, e.g. mu = condition), noise
eps ~ N(0, 1), TRELLIS path x_t = a(t) x0 + b(t) eps with a = 1 - t, b = sigma_min + (1 - sigma_min) t. Then
x_t ~ N(a mu, std_t^2), std_t^2 = a^2 s^2 + b^2, and (per element, derived by Gaussian conditioning):

* marginal velocity  v(x, t) = E[(1 - sigma_min) eps - x0 | x_t = x] = -mu + (std_t' / std_t) (x - a mu),
  std_t' = ((1 - sigma_min) b - a s^2) / std_t;
* the probability-flow ODE keeps z = (x - a mu) / std_t constant, so the flow map is
  Phi_{t->r}(x) = a(r) mu + (std_r / std_t) (x - a(t) mu);
* the mean velocity over [r, t]  u(x, t, r) = (x - Phi_{t->r}(x)) / (t - r)  (what a one-step student learns
  for r = 0), with partial derivatives du/dx = (1 - std_r/std_t) / (t - r) and du/dt in closed form below;
* along the exact trajectory u = -mu + (std_t - std_r) z / (t - r), so du/dt = z (std_t' (t - r) - (std_t -
  std_r)) / (t - r)^2, and the MeanFlow identity u = v - (t - r) du/dt holds;
* irreducible flow-matching loss per element: Var(target | x_t) = s^2 (b + (1 - sigma_min) a)^2 / std_t^2.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from mdt.flow import SIGMA_MIN, TIME_SCALE


def _bt(t: Tensor, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


class GaussianFlow:
    """Closed-form quantities of the Gaussian-data flow (t, r are [B] or scalars; mu broadcastable to x)."""

    def __init__(self, s: float = 0.5, sigma_min: float = SIGMA_MIN):
        self.s, self.sigma = float(s), float(sigma_min)

    def a(self, t: Tensor) -> Tensor:
        return 1 - t

    def b(self, t: Tensor) -> Tensor:
        return self.sigma + (1 - self.sigma) * t

    def std(self, t: Tensor) -> Tensor:
        return (self.a(t) ** 2 * self.s ** 2 + self.b(t) ** 2).sqrt()

    def dstd(self, t: Tensor) -> Tensor:
        return ((1 - self.sigma) * self.b(t) - self.a(t) * self.s ** 2) / self.std(t)

    def sample_x0(self, mu: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return mu + self.s * torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)

    def velocity(self, x: Tensor, t: Tensor, mu: Tensor) -> Tensor:
        tb = _bt(t, x)
        return -mu + (self.dstd(tb) / self.std(tb)) * (x - self.a(tb) * mu)

    def flow_map(self, x: Tensor, t: Tensor, r: Tensor, mu: Tensor) -> Tensor:
        tb, rb = _bt(t, x), _bt(r, x)
        return self.a(rb) * mu + (self.std(rb) / self.std(tb)) * (x - self.a(tb) * mu)

    def mean_velocity(self, x: Tensor, t: Tensor, r: Tensor, mu: Tensor) -> Tensor:
        tb, rb = _bt(t, x), _bt(r, x)
        return (x - self.flow_map(x, t, r, mu)) / (tb - rb)

    def mean_velocity_partials(self, x: Tensor, t: Tensor, r: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
        """(du/dx, du/dt) of u(x, t, r) at fixed r (du/dx is a scalar per sample, broadcast shape)."""
        tb, rb = _bt(t, x), _bt(r, x)
        g = self.std(rb) / self.std(tb)
        dg = -self.std(rb) * self.dstd(tb) / self.std(tb) ** 2
        h = tb - rb
        n = x - self.a(rb) * mu - g * (x - self.a(tb) * mu)
        dn = -dg * (x - self.a(tb) * mu) - g * mu
        return (1 - g) / h, dn / h - n / h ** 2

    def mean_velocity_total_dt(self, x: Tensor, t: Tensor, r: Tensor, mu: Tensor, vel: Tensor) -> Tensor:
        """d/dt u(x(t), t, r) along dx/dt = vel (any velocity field, e.g. a CFG'd one)."""
        du_dx, du_dt = self.mean_velocity_partials(x, t, r, mu)
        return du_dx * vel + du_dt

    def mean_velocity_dt_on_trajectory(self, x: Tensor, t: Tensor, r: Tensor, mu: Tensor) -> Tensor:
        """d/dt u(x(t), t, r) along the exact PF-ODE (z-form, independent of the partials above)."""
        tb, rb = _bt(t, x), _bt(r, x)
        z = (x - self.a(tb) * mu) / self.std(tb)
        h = tb - rb
        return z * (self.dstd(tb) * h - (self.std(tb) - self.std(rb))) / h ** 2

    def irreducible_fm_loss(self, t: Tensor) -> Tensor:
        """Per-element E[(target - v(x_t, t))^2] at time t."""
        return self.s ** 2 * (self.b(t) + (1 - self.sigma) * self.a(t)) ** 2 / self.std(t) ** 2


class AnalyticVelocity(nn.Module):
    """'Teacher' returning the exact marginal velocity, mu = cond (so the zero condition means mu = 0).

    `scale` is a parameter (exactly 1.0, requires_grad) so that tests can prove no gradient reaches a teacher.
    """

    def __init__(self, flow: GaussianFlow):
        super().__init__()
        self.flow = flow
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x: Tensor, tau: Tensor, cond: Tensor) -> Tensor:
        return self.scale.to(x.dtype) * self.flow.velocity(x, tau / TIME_SCALE, cond)


class AnalyticMeanVelocity(nn.Module):
    """'Student' returning the exact mean velocity over [r(t), t] (r(t) = 0 by default), mu = cond.

    `offset_at_one`: an optional parameter added to the output only at t = 1 (the one-step generation call),
    which shifts the fake samples of velocity distillation by -offset.
    """

    def __init__(self, flow: GaussianFlow, r_fn: Callable[[Tensor], Tensor] | None = None,
                 offset_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.flow = flow
        self.r_fn = r_fn
        self.offset_at_one = (nn.Parameter(torch.zeros(offset_shape, dtype=torch.float64))
                              if offset_shape is not None else None)

    def forward(self, x: Tensor, tau: Tensor, cond: Tensor) -> Tensor:
        t = tau / TIME_SCALE
        r = torch.zeros_like(t) if self.r_fn is None else self.r_fn(t)
        out = self.flow.mean_velocity(x, t, r, cond)
        if self.offset_at_one is not None:
            at_one = _bt((t >= 1 - 1e-9).to(x.dtype), x)
            out = out + at_one * self.offset_at_one.to(x.dtype)
        return out


def _is_sparse(x) -> bool:
    return hasattr(x, "feats") and hasattr(x, "coords")


class ToyVelocityNet(nn.Module):
    """Small nonlinear velocity net for tests and toys: model(x, TIME_SCALE·t, cond) on dense [B, C, ...] or a
    SparseTensor with feats [N, C]; the condition [B, ...] is flattened to cond_dim. Each voxel sees its own
    features, the mean over its sample's voxels, t and the condition, so samples stay independent."""

    def __init__(self, channels: int, cond_dim: int, hidden: int = 16, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c = channels
        self.inp = nn.Linear(2 * channels + 2, hidden, dtype=dtype)
        self.cnd = nn.Linear(cond_dim, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, channels, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))

    def forward(self, x, tau, cond):
        t = tau / TIME_SCALE
        if _is_sparse(x):
            f, bidx, b = x.feats, x.batch_idx, x.batch_size
        else:
            b = x.shape[0]
            f = x.movedim(1, -1).reshape(-1, self.c)
            bidx = torch.arange(b, device=f.device).repeat_interleave(f.shape[0] // b)
        counts = torch.bincount(bidx, minlength=b).to(f.dtype)
        pooled = f.new_zeros(b, self.c).index_add(0, bidx, f) / counts[:, None]
        tf = torch.stack([torch.sin(3 * t), torch.cos(2 * t)], -1).to(f.dtype)
        h = torch.tanh(self.inp(torch.cat([f, pooled[bidx], tf[bidx]], -1)) + self.cnd(cond.flatten(1))[bidx])
        out = self.out(h) + f * t[bidx, None]
        if _is_sparse(x):
            return x.replace(out)
        return out.reshape(b, *x.shape[2:], self.c).movedim(-1, 1)


class GaussianMixtureFlow:
    """Closed-form flow of isotropic Gaussian-mixture data on the TRELLIS path (per sample its own mode set).

    Data x0 ~ sum_j pi_j N(m_j, s^2 I). Given mode j, x_t ~ N(a m_j, std_t^2 I) with the `GaussianFlow` std_t (the
    same for every mode), so the posterior over modes is r_j(x, t) ∝ pi_j exp(-||x - a m_j||^2 / (2 std_t^2)) and
    the marginal velocity is the posterior mean of the per-mode velocities, which are affine in m_j:
        v(x, t) = sum_j r_j v_j(x, t) = -m_bar + (std_t' / std_t) (x - a m_bar),   m_bar = sum_j r_j m_j.
    means [M, D] (shared by all samples), log_w [N, M] or [M] (a sample's own mode set: -inf outside it); x [N, D];
    t [N] or a scalar.
    """

    def __init__(self, s: float, sigma_min: float = SIGMA_MIN):
        self.gauss = GaussianFlow(s=s, sigma_min=sigma_min)
        self.s = float(s)

    def posterior_mean(self, x: Tensor, t: Tensor, means: Tensor, log_w: Tensor) -> Tensor:
        """m_bar(x, t) = E[m_J | x_t = x]  [N, D]; ||x - a m||^2 expanded so that only [N, M] is formed."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        a, std = self.gauss.a(t)[:, None], self.gauss.std(t)[:, None]      # [N, 1]
        sq = (x.pow(2).sum(1, keepdim=True) - 2 * a * (x @ means.T)
              + a ** 2 * means.pow(2).sum(1)[None])                         # [N, M]
        r = torch.softmax(log_w - sq / (2 * std ** 2), dim=-1)
        return r @ means

    def velocity(self, x: Tensor, t: Tensor, means: Tensor, log_w: Tensor) -> Tensor:
        tb = _bt(t, x)
        m_bar = self.posterior_mean(x, t, means, log_w)
        g = self.gauss
        return -m_bar + (g.dstd(tb) / g.std(tb)) * (x - g.a(tb) * m_bar)

    def log_prob(self, x: Tensor, means: Tensor, log_w: Tensor) -> Tensor:
        """log p(x0 = x) under the data mixture [N]."""
        d = x.shape[-1]
        sq = (x[:, None, :] - means).pow(2).sum(-1)                       # means [M, D] or [N, M, D]
        comp = -sq / (2 * self.s ** 2) - 0.5 * d * math.log(2 * math.pi * self.s ** 2)
        return torch.logsumexp(torch.log_softmax(log_w, -1) + comp, dim=-1)

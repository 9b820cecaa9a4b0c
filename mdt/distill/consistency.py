"""Consistency-model baselines with the MDT objective interface: CM, PCM (multi-phase CM) and sCM (continuous).

All three parameterise the consistency function through the flow output of the student:

    f(x_t, t) = x_t - (t - s) F(x_t, t),     s = phase boundary of t (0 for a single phase),

so the boundary condition f(x_s, s) = x_s holds by construction and the exact solution is F = the mean velocity
of the teacher's probability-flow ODE over [s, t]: F(x_t, t) = (x_t - Phi_{t->s}(x_t)) / (t - s). A 1-phase
student is therefore sampled exactly like an MDT student: x0 = eps - F(eps, 1000, c) (see `student_sample`).
Flow convention as TRELLIS: x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps, model time 1000 t, teacher
CFG (1 + w) v(c) - w v(0).

CM / PCM (discrete consistency distillation, `cm_loss`, `pcm_loss`):
    t from the schedule (or an N-step grid t = n / N), s = phase_floor(t) (largest boundary k / K strictly below
    t), t_p = max(t - delta, s) (grid: t_p = (n - 1) / N; phases never straddled), one teacher Euler step
    x_p = x_t - (t - t_p) v_T(x_t, t), and
        L = mean (f_theta(x_t, t) - sg f_theta-(x_p, t_p))^2,
    with theta- the student itself under stop-gradient or an EMA copy (`target_model`). CM is PCM with K = 1.
    With an exact ODE step the exact student has zero loss; with the Euler step the residual is O(delta^2).

sCM (continuous-time consistency, `scm_loss`), TrigFlow-free, for the flow parameterisation above. Derivation:
    The discrete loss between neighbouring times t and t - delta along the PF-ODE dx/dt = v(x, t) is
        E || f_theta(x_t, t) - f_theta-(x_{t-delta}, t - delta) ||^2,
    and f_theta-(x_{t-delta}, t - delta) = f_theta-(x_t, t) - delta df_theta-/dt + O(delta^2), where
    df/dt = (d f / d x) v + d f / d t is the total derivative along the ODE. At theta- = theta the gradient of
    (1 / (2 delta)) times the loss tends, as delta -> 0, to
        grad_theta E < f_theta(x_t, t), sg(df_theta-/dt) > .
    With f = x_t - (t - s) F:   df/dt = v - F - (t - s) dF/dt   and   grad_theta f = -(t - s) grad_theta F.
    Weighting the time by w(t) = 1 / (t - s) the gradient is  -E < grad_theta F_theta, g >  with the tangent
        g = v_T - F_theta- - (t - s) dF_theta-/dt,
    which is the gradient of the surrogate  E || F_theta - sg(F_theta- + g) ||^2  (up to the factor 2).
    dF/dt is one forward-mode JVP of the (stop-gradient / EMA) student along (v_T, 1) with t unscaled. As in sCM,
    the tangent is normalised per sample, g <- g / (||g|| + c) (c = 0.1), and optionally warmed up by scaling
    the JVP term with r in [0, 1]. g = 0 exactly when d/dt[(t - s) F] = v along every trajectory with
    (t - s) F = 0 at t = s, i.e. when F is the exact mean velocity over [s, t] -- so the exact student has zero
    loss, not only up to a discretisation error. Note that F_theta- + g with r = 1, s = 0 and no tangent
    normalisation is exactly the MDT "continuous" VM target v_T - t dF/dt without d_norm: MDT-dist normalises
    only dF/dt, sCM the whole tangent.

    sCM's two stabilisers (Lu & Song 2024, section 4):
    * tangent warm-up: r multiplies the self-referencing JVP term and is ramped linearly from 0 to 1 over the
      first `warmup_steps` updates (`tangent_warmup_factor`, applied by the trainer; sCM ramps over 10k updates);
      SCMConfig.tangent_warmup is the r of one call (default 1, no warm-up).
    * adaptive weighting (SCMConfig.adaptive_weighting, default off): a small network w_phi(t) (`AdaptiveWeight`)
      learns a log-weight per time and the loss becomes
          mean_i [ exp(w_phi(t_i)) / D_i ||F_theta - sg(F_theta- + g)||_i^2 - w_phi(t_i) ],
      D_i the sample's element count. For a per-sample mean squared error m(t) the optimum over w is
      exp(w) = 1 / m(t), so the weighted error is ~1 at every t: the time-dependence of the loss's variance is
      learned away instead of hand-designed. phi is trained with the student (same optimiser).
    Not implemented: sCM's TrigFlow time distribution (we use MDT's logit-normal schedule for every method).
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Sequence

import torch
from torch import Tensor

from mdt import flow
from mdt.flow import SIGMA_MIN, data, per_sample

from .losses import (NUM_BINS, call, compute_dtype, draw_choice, guided_call, mean_loss, per_instance, sample_norm,
                     sample_numel, sample_sum, time_bins, time_derivative)
from .mdt_dist import phase_floor


@dataclass
class CMConfig:
    """Discrete consistency distillation; `phases` > 1 makes it PCM."""

    delta: float = 0.01                  # teacher Euler step (ignored when num_steps is set)
    num_steps: int | None = None         # N-step grid t_n = n / N instead of continuous t (multiple of phases)
    phases: int = 1
    w: float | Sequence[float] = 0.0     # teacher CFG strength (TRELLIS convention); list: one drawn per step
    t_schedule: str = "logit_normal"
    t_mean: float = 1.0
    t_std: float = 1.0
    sigma_min: float = SIGMA_MIN
    cfg_batched: bool = True             # teacher CFG as one forward of the doubled batch
    num_bins: int = NUM_BINS

    def __post_init__(self) -> None:
        if self.phases < 1:
            raise ValueError("phases must be >= 1")
        if self.num_steps is not None and (self.num_steps < 1 or self.num_steps % self.phases):
            raise ValueError("num_steps must be a positive multiple of phases")
        if self.num_steps is None and not self.delta > 0:
            raise ValueError("delta must be > 0")


@dataclass
class PCMConfig(CMConfig):
    """Phased consistency distillation: K phases, each phase's lower boundary is the target time."""

    phases: int = 4


@dataclass
class SCMConfig:
    """Continuous-time consistency distillation (flow parameterisation, see module docstring)."""

    phases: int = 1
    w: float | Sequence[float] = 0.0
    tangent_norm_c: float = 0.1          # g / (||g|| + c); <= 0 disables the normalisation
    tangent_warmup: float = 1.0          # r: scale of the JVP term (sCM warm-up ramps it 0 -> 1)
    t_schedule: str = "logit_normal"
    t_mean: float = 1.0
    t_std: float = 1.0
    sigma_min: float = SIGMA_MIN
    jvp: str = "func"                    # "func" (exact forward-mode JVP) or "fd"
    fd_step: float = 1e-3
    cfg_batched: bool = True
    num_bins: int = NUM_BINS
    adaptive_weighting: bool = False     # learned per-time log-weight w_phi(t) (scm_loss's `weight_net`; the
                                         # benchmark trainer supplies it, the distillation job refuses the option)


def tangent_warmup_factor(step: int, warmup_steps: int) -> float:
    """sCM's tangent warm-up r for update `step` (0-based): linear 0 -> 1 over `warmup_steps`, 1 when <= 0."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


class AdaptiveWeight(torch.nn.Module):
    """sCM's adaptive log-weight w_phi(t): fixed sinusoidal features of t in [0, 1], one linear layer.

    The layer starts at zero, so training starts from the unweighted loss (w = 0, weight 1)."""

    def __init__(self, num_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32))
        self.linear = torch.nn.Linear(2 * num_freqs, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs
        return self.linear(torch.cat([arg.sin(), arg.cos()], dim=1)).squeeze(1)


def _noise(batch: dict, generator: torch.Generator | None) -> Tensor:
    eps = batch.get("noise")
    return data(eps) if eps is not None else data(flow.randn_like(batch["x0"], generator))


def consistency_times(t_prime: Tensor, cfg: CMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(t, t_p, s) from schedule samples t' in [0, 1]."""
    if cfg.num_steps is not None:
        n = torch.ceil(t_prime * cfg.num_steps).clamp(1, cfg.num_steps)
        t = n / cfg.num_steps
        return t, (n - 1) / cfg.num_steps, phase_floor(t, cfg.phases)
    t = flow.map_time(t_prime, cfg.sigma_min + cfg.delta)
    s = phase_floor(t, cfg.phases)
    return t, torch.maximum(t - cfg.delta, s), s


def cm_loss(student: Any, teacher: Any, batch: dict, cfg: CMConfig, generator: torch.Generator | None = None,
            target_model: Any = None) -> dict[str, Tensor]:
    """Discrete consistency distillation (CM; PCM when cfg.phases > 1), see module docstring.

    batch: x0, cond, optional neg_cond, optional fixed `t` [B] (then t_p and s follow from cfg) and `noise`;
    `target_model` (e.g. an EMA copy; default: the student under stop-gradient) gives the target at t_p.
    Draw order with `generator`: t', eps, w. Returns {"loss", "loss_cm", "loss_bins"}.
    """
    x0, cond = batch["x0"], batch["cond"]
    neg_cond = flow.negative_condition(cond, batch.get("neg_cond"))
    f0 = data(x0)
    b = flow.batch_size(x0)
    t = batch.get("t")
    if t is None:
        tp = flow.sample_time(b, cfg.t_schedule, cfg.t_mean, cfg.t_std, generator, f0.device, torch.float64)
        t, t_p, s = consistency_times(tp, cfg)
    else:
        t = t.to(device=f0.device, dtype=torch.float64)
        s = phase_floor(t, cfg.phases)
        if cfg.num_steps is not None:
            t_p = torch.maximum(t - 1.0 / cfg.num_steps, s)
        else:
            t_p = torch.maximum(t - cfg.delta, s)
    t, t_p, s = (v.to(f0.dtype) for v in (t, t_p, s))
    eps = _noise(batch, generator)
    w = draw_choice(cfg.w, generator)

    xt = data(flow.noise_sample(x0, eps, t, cfg.sigma_min))
    with torch.no_grad():
        v_t = guided_call(teacher, x0, xt, t, cond, neg_cond, w, cfg.cfg_batched)
        x_p = xt - per_sample(t - t_p, x0) * v_t
        tm = student if target_model is None else target_model
        f_p = call(tm, x0, x_p, t_p, cond)
    v_s = call(student, x0, xt, t, cond)
    dt = compute_dtype(v_s.dtype)
    pred = xt.to(dt) - per_sample(t - s, x0).to(dt) * v_s.to(dt)
    gap = per_sample(t_p - s, x0).to(dt)
    # At a phase boundary (t_p = s) the consistency function is the identity; `where` keeps a non-finite
    # student output at t_p = s (e.g. t = 0) out of the target.
    target = torch.where(gap > 0, x_p.to(dt) - gap * f_p.to(dt), x_p.to(dt)).detach()
    sq = (pred - target).pow(2)
    loss = mean_loss(sq)
    return {"loss": loss, "loss_cm": loss.detach(),
            "loss_bins": time_bins(t, per_instance(sq, x0), cfg.num_bins)}


def pcm_loss(student: Any, teacher: Any, batch: dict, cfg: PCMConfig, generator: torch.Generator | None = None,
             target_model: Any = None) -> dict[str, Tensor]:
    """Multi-phase consistency distillation: `cm_loss` with cfg.phases phases (default 4)."""
    return cm_loss(student, teacher, batch, cfg, generator, target_model)


def scm_loss(student: Any, teacher: Any, batch: dict, cfg: SCMConfig, generator: torch.Generator | None = None,
             target_model: Any = None, weight_net: Any = None) -> dict[str, Tensor]:
    """Continuous-time consistency distillation (sCM, flow parameterisation; derivation in the module docstring).

    loss = mean (F_theta - sg(F_theta- + g))^2 with g = v_T - F_theta- - r (t - s) dF_theta-/dt, normalised per
    sample; with cfg.adaptive_weighting, mean_i exp(w_i) m_i - w_i with m_i the sample's mean squared error and
    w_i = weight_net(t_i) (required then). batch: x0, cond, optional neg_cond, t [B], noise. Draw order: t', eps, w.
    Returns {"loss", "loss_scm" (the unweighted mean squared error), "tangent_norm" (mean ||g|| before
    normalisation), "loss_bins"} (+ "adaptive_w", the mean log-weight, with adaptive weighting).
    """
    if cfg.adaptive_weighting and weight_net is None:
        raise ValueError("SCMConfig.adaptive_weighting needs weight_net (e.g. consistency.AdaptiveWeight())")
    x0, cond = batch["x0"], batch["cond"]
    neg_cond = flow.negative_condition(cond, batch.get("neg_cond"))
    f0 = data(x0)
    t = batch.get("t")
    if t is None:
        tp = flow.sample_time(flow.batch_size(x0), cfg.t_schedule, cfg.t_mean, cfg.t_std, generator, f0.device,
                              f0.dtype)
        t = flow.map_time(tp, cfg.sigma_min)
    t = t.to(device=f0.device, dtype=f0.dtype)
    s = phase_floor(t, cfg.phases)
    eps = _noise(batch, generator)
    w = draw_choice(cfg.w, generator)

    xt = data(flow.noise_sample(x0, eps, t, cfg.sigma_min))
    with torch.no_grad():
        v_t = guided_call(teacher, x0, xt, t, cond, neg_cond, w, cfg.cfg_batched)
    v_s = call(student, x0, xt, t, cond)
    dt = compute_dtype(v_s.dtype)
    tm = student if target_model is None else target_model
    if target_model is None:
        f_minus = v_s.detach()
    else:
        with torch.no_grad():
            f_minus = call(tm, x0, xt, t, cond)
    dfdt = time_derivative(tm, x0, xt, t, cond, v_t, cfg.jvp, cfg.fd_step).to(dt)
    g = v_t.to(dt) - f_minus.to(dt) - cfg.tangent_warmup * per_sample(t - s, x0).to(dt) * dfdt
    g_norm = sample_norm(g, x0)
    if cfg.tangent_norm_c > 0:
        g = g / (per_sample(g_norm, x0) + cfg.tangent_norm_c)
    target = (f_minus.to(dt) + g).detach()
    sq = (v_s.to(dt) - target).pow(2)
    plain = mean_loss(sq)
    out = {"loss_scm": plain.detach(), "tangent_norm": g_norm.mean().detach(),
           "loss_bins": time_bins(t, per_instance(sq, x0), cfg.num_bins)}
    if not cfg.adaptive_weighting:
        return {"loss": plain, **out}
    logw = weight_net(t).to(dt)
    per_sample_mse = sample_sum(sq, x0) / sample_numel(x0).to(device=sq.device, dtype=dt)
    loss = (logw.exp() * per_sample_mse - logw).mean()
    return {"loss": loss, **out, "adaptive_w": logw.mean().detach()}

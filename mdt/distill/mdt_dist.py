"""MDT-dist: Velocity Matching (VM) and Velocity Distillation (VD), as the released trainer computes them, with the
paper-exact variants as options (docs/method.md compares the two term by term).

Notation: S = student, T = frozen teacher, both called as model(x, TIME_SCALE t, cond). x_t = (1 - t) x0 +
(sigma_min + (1 - sigma_min) t) eps. Without d_norm the VM target is the MeanFlow identity with r = 0
(u = v - t du/dt along the teacher trajectory), whose fixed point is the mean velocity over [0, t] of the (guided)
teacher flow, so that one step x0 = eps - S(eps, 1, c) generates a sample. With d_norm on (the released default) the
derivative term is scaled to norm < 1 per sample, the target stays within distance t of v_T and the fixed point is
no longer the mean velocity (nor is the exact mean-velocity student stationary under VD).

VM target, `vm_target` (the trainer's get_v_pred_tgt):
    v_T  = (1 + w) T(x_t, c) - w T(x_t, 0)                           (no grad; w = w_vm, TRELLIS CFG convention)
    v_S  = S(x_t, t, c)                                              (with grad)
    discrete:    dv/dt = (sg(v_S) - S(x_t - delta v_T, t - delta, c)) / delta
    continuous:  dv/dt = d/ds S(x_t + s v_T, t + s, c) at s = 0      (forward-mode JVP, t unscaled)
    d_norm:      dv/dt <- dv/dt / (||dv/dt||_2 + 0.1)                 (norm per sample over all its elements)
    target       v_tgt = v_T - t dv/dt;  L_vm = lambda_vm (v_S - v_tgt)^2
  "cm" variant (reference 5.4 item 7): t_tgt = largest phase boundary (linspace(0, 1, multiphase, endpoint=False))
  strictly below t - delta; prediction x_t - (t - t_tgt) v_S, target x_p - (t_p - t_tgt) S(x_p, t_p) (no grad).

VD, inside `mdt_loss`:
    v_f = S(eps_f, 1000, c) (with grad), x_f = eps_f - v_f; then under no grad the whole VM machinery on x_f with the
    SAME eps and t and teacher CFG w_vd gives (v_S', v_tgt'); L_vd = lambda_vd (v_S' - v_tgt' + v_f - sg(v_f))^2,
    whose value is (v_S' - v_tgt')^2 and whose gradient flows only through v_f:
    dL_vd/dtheta = 2 lambda_vd (v_S' - v_tgt') dv_f/dtheta, i.e. dL_vd/dx_f = -2 lambda_vd (v_S' - v_tgt')
    for every t (vd_weighting "released"). vd_weighting "paper" keeps the chain rule through the re-noised fake
    sample x_f,t = (1 - t) x_f + (sigma_min + (1 - sigma_min) t) eps: the gradient gets the factor (1 - t),
    L_vd = lambda_vd (v_S' - v_tgt' + (1 - t) (v_f - sg(v_f)))^2 (same value).
    vd_noise "fresh" re-noises the fake sample with an independent z'' instead of VM's eps (the paper's Eq. for
    x_f,t; same expectation, different pairing).
    Total loss = mean(L_vm + L_vd) over all elements (sparse: all voxels x channels of the batch).

Sparse batches: eps and eps_f live on the coordinates of the real x0; t is broadcast per sample; d_norm norms and
the binned per-instance losses reduce over each sample's own voxels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from mdt import flow
from mdt.flow import SIGMA_MIN, data, like, per_sample

from .losses import (NUM_BINS, call, compute_dtype, draw_choice, guided_call, mean_loss, per_instance, sample_norm,
                     time_bins, time_derivative)

MODES = ("discrete", "continuous", "cm")
VD_WEIGHTINGS = ("released", "paper")
VD_NOISES = ("shared", "fresh")


@dataclass
class MDTConfig:
    """MDT-dist hyper-parameters; defaults are the released configs' (reference section 5.2)."""

    mode: str = "discrete"                              # "discrete" | "continuous" | "cm"
    delta: float = 0.01                                 # distill_interval: finite-difference / Euler step
    w_vm: float | Sequence[float] = 40.0                # teacher CFG in the VM target (list: one drawn per step)
    w_vd: float | Sequence[float] = 100.0               # teacher CFG in the VD target
    lambda_vm: float = 1.0                              # term skipped when <= 0
    lambda_vd: float = 1.0                              # term skipped when <= 0
    d_norm: bool = True
    d_norm_c: float = 0.1                               # dv/dt / (||dv/dt|| + c)
    t_schedule: str = "logit_normal"                    # or "uniform"
    t_mean: float = 1.0
    t_std: float = 1.0
    sigma_min: float = SIGMA_MIN
    multiphase: int = 1                                 # phases of the "cm" variant
    jvp: str = "func"                                   # continuous mode: "func" (exact JVP) or "fd"
    fd_step: float = 1e-3                               # step of jvp="fd"
    vd_weighting: str = "released"                      # "released": same VD weight at every t; "paper": (1 - t)
    vd_noise: str = "shared"                            # VD re-noising: "shared" = VM's eps (released), "fresh" z''
    cfg_batched: bool = True                            # teacher CFG as one forward of the doubled batch
    num_bins: int = NUM_BINS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "continuous" and not self.delta > 0:
            raise ValueError("delta must be > 0")
        if self.vd_weighting not in VD_WEIGHTINGS:
            raise ValueError(f"vd_weighting must be one of {VD_WEIGHTINGS}, got {self.vd_weighting!r}")
        if self.vd_noise not in VD_NOISES:
            raise ValueError(f"vd_noise must be one of {VD_NOISES}, got {self.vd_noise!r}")


class VMOut(NamedTuple):
    pred: Tensor        # v_S (discrete/continuous) or x_hat ("cm"); data layout of x0; has grad if enabled
    target: Tensor      # v_tgt or the cm target; detached
    v_teacher: Tensor   # CFG'd teacher velocity at x_t (detached)
    dvdt: Tensor | None  # derivative estimate after d_norm (None in "cm" mode)
    xt: Tensor          # x_t data


def mdt_time(t_prime: Tensor, cfg: MDTConfig) -> Tensor:
    """Map schedule samples t' in [0, 1] to training times (reference 5.3)."""
    if cfg.mode == "continuous":
        return flow.map_time(t_prime, cfg.sigma_min)
    return flow.map_time(t_prime, cfg.sigma_min + cfg.delta)


def phase_floor(t: Tensor, phases: int) -> Tensor:
    """Largest boundary of linspace(0, 1, phases, endpoint=False) strictly below t (0 for t <= 0)."""
    k = (torch.ceil(t * phases) - 1).clamp(min=0, max=phases - 1)
    return k / phases


def d_normalise(d: Tensor, x: Any, c: float) -> Tensor:
    """d / (||d|| + c) with the Euclidean norm over each sample's elements."""
    return d / (per_sample(sample_norm(d, x), x) + c)


def teacher_velocity(teacher: Any, x0: Any, eps: Any, xt: Tensor, t: Tensor, cond: Any, neg_cond: Any, w: float,
                     cfg: MDTConfig) -> Tensor:
    """CFG'd teacher velocity at x_t (data, no grad); without a teacher the conditional flow target."""
    if teacher is None:
        return data(flow.velocity_target(x0, eps, cfg.sigma_min)).detach()
    with torch.no_grad():
        return guided_call(teacher, x0, xt, t, cond, neg_cond, w, cfg.cfg_batched).detach()


def vm_target(student: Any, teacher: Any, x0: Any, eps: Any, t: Tensor, cond: Any, neg_cond: Any,
              w: float, cfg: MDTConfig) -> VMOut:
    """The VM prediction/target pair at (x0, eps, t) (the trainer's get_v_pred_tgt), see module docstring.

    x0 / eps: dense tensors or SparseTensors on the same coordinates; t [B] in training time units (already
    mapped with `mdt_time`). The prediction keeps the autograd graph when grad is enabled; everything else is
    computed without grad (stop-gradient on the derivative term).
    """
    f0 = data(x0)
    t = t.to(device=f0.device, dtype=f0.dtype)
    neg_cond = flow.negative_condition(cond, neg_cond)
    xt = data(flow.noise_sample(x0, eps, t, cfg.sigma_min))
    v_t = teacher_velocity(teacher, x0, eps, xt, t, cond, neg_cond, w, cfg)
    v_s = call(student, x0, xt, t, cond)
    dt = compute_dtype(v_s.dtype)
    tb = per_sample(t, x0).to(dt)

    if cfg.mode == "cm":
        t_p = t - cfg.delta
        t_tgt = phase_floor(t_p, cfg.multiphase)
        x_p = xt - cfg.delta * v_t
        with torch.no_grad():
            v_p = call(student, x0, x_p, t_p, cond)
        pred = xt.to(dt) - (tb - per_sample(t_tgt, x0).to(dt)) * v_s.to(dt)
        target = x_p.to(dt) - per_sample(t_p - t_tgt, x0).to(dt) * v_p.to(dt)
        return VMOut(pred, target.detach(), v_t, None, xt)

    if cfg.mode == "discrete":
        t_p = t - cfg.delta
        x_p = xt - cfg.delta * v_t
        with torch.no_grad():
            v_p = call(student, x0, x_p, t_p, cond)
        dvdt = (v_s.detach().to(dt) - v_p.to(dt)) / cfg.delta
    else:  # continuous
        dvdt = time_derivative(student, x0, xt, t, cond, v_t, cfg.jvp, cfg.fd_step).to(dt)
    if cfg.d_norm:
        dvdt = d_normalise(dvdt, x0, cfg.d_norm_c)
    target = v_t.to(dt) - tb * dvdt
    return VMOut(v_s.to(dt), target.detach(), v_t, dvdt.detach(), xt)


def _draw(batch: dict, cfg: MDTConfig, generator: torch.Generator | None) -> tuple[Tensor, Any]:
    """t (training units) and eps for one step: batch['t'] / batch['noise'] when given, else drawn (t first)."""
    x0 = batch["x0"]
    f0 = data(x0)
    t = batch.get("t")
    if t is None:
        tp = flow.sample_time(flow.batch_size(x0), cfg.t_schedule, cfg.t_mean, cfg.t_std, generator, f0.device,
                              f0.dtype)
        t = mdt_time(tp, cfg)
    t = t.to(device=f0.device, dtype=f0.dtype)
    eps = batch.get("noise")
    if eps is None:
        eps = flow.randn_like(x0, generator)
    elif not flow.is_sparse(eps) and flow.is_sparse(x0):
        eps = like(x0, eps)
    return t, eps


def vm_loss(student: Any, teacher: Any, batch: dict, cfg: MDTConfig,
            generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Velocity Matching only: loss = mean(lambda_vm (v_S - v_tgt)^2); lambda_vm must be > 0.

    batch: x0, cond, optional neg_cond (default zeros), optional fixed t [B] (training units) / noise.
    Draw order with `generator`: t', eps, then w_vm (if a list).
    """
    x0, cond = batch["x0"], batch["cond"]
    t, eps = _draw(batch, cfg, generator)
    w = draw_choice(cfg.w_vm, generator)
    lam = cfg.lambda_vm
    if lam <= 0:
        raise ValueError("vm_loss needs lambda_vm > 0")
    out = vm_target(student, teacher, x0, eps, t, cond, batch.get("neg_cond"), w, cfg)
    sq = lam * (out.pred - out.target).pow(2)
    loss = mean_loss(sq)
    return {"loss": loss, "loss_vm": loss.detach(),
            "loss_bins": time_bins(t, per_instance(sq, x0), cfg.num_bins)}


def mdt_loss(student: Any, teacher: Any, batch: dict, cfg: MDTConfig,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """VM + VD (reference 5.4-5.5). Returns {"loss", "loss_vm"?, "loss_vd"?, "loss_bins"}.

    batch: x0 (dense [B, ...] or SparseTensor), cond, optional neg_cond (zeros), and optionally fixed
    t [B] (training units, i.e. after `mdt_time`), noise (like x0), noise_fake (eps_f, like x0) and noise_vd (z'',
    used only with vd_noise "fresh").
    Draw order with `generator`: t', eps, w_vm, eps_f, w_vd, then z'' (vd_noise "fresh"). VM and VD share t; they
    share eps too unless vd_noise is "fresh".
    The teacher is only called under no_grad; gradients reach the student through v_S (VM) and v_f (VD) only.
    """
    x0, cond = batch["x0"], batch["cond"]
    neg_cond = batch.get("neg_cond")
    t, eps = _draw(batch, cfg, generator)
    w_vm = draw_choice(cfg.w_vm, generator)
    terms: dict[str, Tensor] = {}
    total = None
    if cfg.lambda_vm > 0:
        out = vm_target(student, teacher, x0, eps, t, cond, neg_cond, w_vm, cfg)
        sq_vm = cfg.lambda_vm * (out.pred - out.target).pow(2)
        terms["loss_vm"] = mean_loss(sq_vm).detach()
        total = sq_vm
    if cfg.lambda_vd > 0:
        eps_f = batch.get("noise_fake")
        eps_f = data(eps_f) if eps_f is not None else data(flow.randn_like(x0, generator))
        w_vd = draw_choice(cfg.w_vd, generator)
        ones = torch.ones_like(t)
        v_f = call(student, x0, eps_f, ones, cond)                   # one-step generation, with grad
        x_f = like(x0, (eps_f - v_f).detach())
        eps_vd = eps
        if cfg.vd_noise == "fresh":                                  # the paper's independent z'' for x_f,t
            eps_vd = batch.get("noise_vd")
            eps_vd = like(x0, data(eps_vd)) if eps_vd is not None else flow.randn_like(x0, generator)
        with torch.no_grad():
            out_f = vm_target(student, teacher, x_f, eps_vd, t, cond, neg_cond, w_vd, cfg)
        dt = out_f.pred.dtype
        v_f = v_f.to(dt)
        zero_with_grad = v_f - v_f.detach()                          # value 0, gradient d v_f
        if cfg.vd_weighting == "paper":                              # d x_f,t / d x_f = 1 - t
            zero_with_grad = per_sample(1 - t, x0).to(dt) * zero_with_grad
        sq_vd = cfg.lambda_vd * (out_f.pred - out_f.target + zero_with_grad).pow(2)
        terms["loss_vd"] = mean_loss(sq_vd).detach()
        total = sq_vd if total is None else total + sq_vd
    if total is None:
        raise ValueError("both lambda_vm and lambda_vd are <= 0: nothing to optimise")
    loss = mean_loss(total)
    terms["loss"] = loss
    terms["loss_bins"] = time_bins(t, per_instance(total, x0), cfg.num_bins)
    return terms

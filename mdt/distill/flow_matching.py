"""Flow-matching loss for training / fine-tuning a teacher (TRELLIS's rule, reference section 3.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mdt import flow
from mdt.flow import SIGMA_MIN, data

from .losses import NUM_BINS, call, compute_dtype, mean_loss, per_instance, time_bins


@dataclass
class FlowMatchingConfig:
    """TRELLIS flow matching. Defaults are TRELLIS image-large's: logit-normal(1, 1) t, p_uncond 0.1."""

    sigma_min: float = SIGMA_MIN
    t_schedule: str = "logit_normal"   # or "uniform"
    t_mean: float = 1.0
    t_std: float = 1.0
    p_uncond: float = 0.1              # per-sample probability of replacing cond by neg_cond (zeros)
    num_bins: int = NUM_BINS


def drop_condition(cond: Tensor, neg_cond: Tensor | None, p_uncond: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace the condition of each sample by neg_cond (default zeros) with probability p_uncond.

    Returns (new_cond, mask) with mask [B] bool = True where the sample was dropped.
    """
    b = cond.shape[0]
    if p_uncond <= 0:
        return cond, torch.zeros(b, dtype=torch.bool, device=cond.device)
    u = flow.rand((b,), generator, cond.device, torch.float64)
    mask = u < p_uncond
    m = mask.view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(m, flow.negative_condition(cond, neg_cond), cond), mask


def flow_matching_loss(student: Any, teacher: Any, batch: dict, cfg: FlowMatchingConfig,
                       generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """MSE between model(x_t, 1000 t, c) and (1 - sigma_min) eps - x0 over all elements.

    `student` is the model being trained; `teacher` is ignored (kept for the common objective interface).
    batch: `x0` (dense [B, ...] or SparseTensor), `cond` [B, ...], optional `neg_cond`, and optionally fixed
    `t` [B] and `noise` (like x0) instead of drawing them. Draw order with `generator`: t, then noise, then the
    condition-dropout uniforms.
    Returns {"loss", "loss_bins"} (bins: per-instance loss in 10 t-bins, NaN where empty).
    """
    del teacher
    x0 = batch["x0"]
    f0 = data(x0)
    t = batch.get("t")
    if t is None:
        t = flow.sample_time(flow.batch_size(x0), cfg.t_schedule, cfg.t_mean, cfg.t_std, generator, f0.device,
                             f0.dtype)
    t = t.to(device=f0.device, dtype=f0.dtype)
    eps = batch.get("noise")
    eps = data(eps) if eps is not None else data(flow.randn_like(x0, generator))
    cond, _ = drop_condition(batch["cond"], batch.get("neg_cond"), cfg.p_uncond, generator)

    xt = data(flow.noise_sample(x0, eps, t, cfg.sigma_min))
    target = data(flow.velocity_target(x0, eps, cfg.sigma_min))
    pred = call(student, x0, xt, t, cond)
    dt = compute_dtype(pred.dtype)
    sq = (pred.to(dt) - target.to(dt)).pow(2)
    loss = mean_loss(sq)
    return {"loss": loss, "loss_fm": loss.detach(),
            "loss_bins": time_bins(t, per_instance(sq, x0), cfg.num_bins)}

"""Flow-matching loss for training / fine-tuning a teacher (TRELLIS's rule, reference section 3.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _ops as O


@dataclass
class FlowMatchingConfig:
    """TRELLIS flow matching. Defaults are TRELLIS image-large's: logit-normal(1, 1) t, p_uncond 0.1."""

    sigma_min: float = 1e-5
    t_schedule: str = "logit_normal"   # or "uniform"
    t_mean: float = 1.0
    t_std: float = 1.0
    p_uncond: float = 0.1              # per-sample probability of replacing cond by neg_cond (zeros)
    num_bins: int = O.NUM_BINS


def drop_condition(cond: Tensor, neg_cond: Tensor | None, p_uncond: float,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace the condition of each sample by neg_cond (default zeros) with probability p_uncond.

    Returns (new_cond, mask) with mask [B] bool = True where the sample was dropped.
    """
    b = cond.shape[0]
    if neg_cond is None:
        neg_cond = torch.zeros_like(cond)
    if p_uncond <= 0:
        return cond, torch.zeros(b, dtype=torch.bool, device=cond.device)
    u = O.rand((b,), generator, cond.device, torch.float64)
    mask = u < p_uncond
    neg = neg_cond.expand_as(cond) if neg_cond.shape[0] == 1 else neg_cond
    m = mask.view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(m, neg.to(cond.dtype), cond), mask


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
    f0 = O.data(x0)
    b = O.batch_size(x0)
    t = batch.get("t")
    if t is None:
        t = O.sample_time(b, cfg.t_schedule, cfg.t_mean, cfg.t_std, generator, f0.device, f0.dtype)
    t = t.to(device=f0.device, dtype=f0.dtype)
    eps = batch.get("noise")
    eps = O.data(eps) if eps is not None else O.data(O.randn_like(x0, generator))
    cond, _ = drop_condition(batch["cond"], batch.get("neg_cond"), cfg.p_uncond, generator)

    xt = O.noise_data(f0, eps, t, x0, cfg.sigma_min)
    target = (1 - cfg.sigma_min) * eps - f0
    pred = O.call(student, x0, xt, t, cond)
    dt = O.compute_dtype(pred.dtype)
    sq = (pred.to(dt) - target.to(dt)).pow(2)
    loss = O.mean_loss(sq)
    return {"loss": loss, "loss_fm": loss.detach(),
            "loss_bins": O.time_bins(t, O.per_instance(sq, x0), cfg.num_bins)}

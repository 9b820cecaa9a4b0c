"""Few-step sampling of a distilled student."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mdt import flow
from mdt.flow import SIGMA_MIN, data, like


def student_sample(student: Any, noise: Any, cond: Any, steps: int = 1, neg_cond: Any = None,
                   cfg_strength: float | torch.Tensor = 0.0, mode: str = "euler", sigma_min: float = SIGMA_MIN,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   cfg_batched: bool = True) -> Any:
    """Sample a distilled student in `steps` steps on the uniform grid t_i = 1 - i / steps.

    mode "euler" (what the MDT-dist snapshots use): `mdt.flow.euler_sample` with rescale_t = 1, i.e.
    x <- x - (t - t_next) S(x, t, c); one step is x0 = eps - S(eps, 1, c). mode "consistency" (multi-step CM
    sampling): x0_hat = x - t S(x, t), re-noised with fresh noise to t_next (`generator`: one, or one per sample
    so that a sample's noise does not depend on its batch) until t_next = 0.
    cfg_strength (a float or per-sample [B]) uses the TRELLIS convention (1 + w) S(c) - w S(neg_cond) (neg_cond
    defaults to zeros), at every step; `cfg_batched` as in `mdt.flow.guided_velocity`. Works on dense tensors and
    SparseTensors (the result is on the noise's coordinates); a batch-1 condition is repeated. No grad.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if mode == "euler":
        return flow.euler_sample(student, noise, cond, neg_cond, steps=steps, rescale_t=1.0,
                                 cfg_strength=cfg_strength, cfg_batched=cfg_batched)
    if mode != "consistency":
        raise ValueError(f"unknown mode {mode!r}")
    b = flow.batch_size(noise)
    cond = flow.expand_condition(cond, b)
    neg_cond = flow.negative_condition(cond, neg_cond)
    x = noise
    f = data(noise)
    t_dtype = torch.promote_types(f.dtype, torch.float32)
    grid = flow.time_grid(steps)
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            tv = torch.full((b,), t, device=f.device, dtype=t_dtype)
            v = data(flow.guided_velocity(student, x, tv, cond, neg_cond, cfg_strength, cfg_batched)).to(f.dtype)
            x0 = like(noise, f - t * v)
            if t_next > 0:
                tn = torch.full((b,), t_next, device=f.device, dtype=t_dtype)
                x = flow.noise_sample(x0, flow.randn_like(x0, generator), tn, sigma_min)
            else:
                x = x0
            f = data(x)
    return x

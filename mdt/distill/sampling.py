"""Few-step sampling of a distilled student."""
from __future__ import annotations

from typing import Any

import torch

from . import _ops as O


def student_sample(student: Any, noise: Any, cond: Any, steps: int = 1, neg_cond: Any = None,
                   cfg_strength: float = 0.0, mode: str = "euler", sigma_min: float = 1e-5,
                   generator: torch.Generator | None = None) -> Any:
    """Sample a distilled student in `steps` steps on the uniform grid t_i = 1 - i / steps.

    mode "euler" (what the MDT-dist snapshots use, rescale_t = 1): x <- x - (t - t_next) S(x, 1000 t, c); one
    step is x0 = eps - S(eps, 1000, c). mode "consistency" (multi-step CM sampling): x0_hat = x - t S(x, t),
    re-noised with fresh noise to t_next (`generator`) until t_next = 0. cfg_strength uses the TRELLIS
    convention (1 + w) S(c) - w S(neg_cond) (neg_cond defaults to zeros). Works on dense tensors and
    SparseTensors (the result is on the noise's coordinates); a batch-1 condition is repeated. No grad.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if mode not in ("euler", "consistency"):
        raise ValueError(f"unknown mode {mode!r}")
    b = O.batch_size(noise)
    if cond.shape[0] == 1 and b > 1:
        cond = cond.expand(b, *cond.shape[1:])
    if neg_cond is None:
        neg_cond = torch.zeros_like(cond)
    elif neg_cond.shape[0] == 1 and b > 1:
        neg_cond = neg_cond.expand(b, *neg_cond.shape[1:])
    x = O.data(noise)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            tv = torch.full((b,), t, device=x.device, dtype=x.dtype)
            v = O.guided_velocity(student, noise, x, tv, cond, neg_cond, cfg_strength).to(x.dtype)
            if mode == "euler":
                x = x - (t - t_next) * v
            else:
                x0 = x - t * v
                if t_next > 0:
                    e = O.randn(x.shape, generator, x.device, x.dtype)
                    x = (1 - t_next) * x0 + (sigma_min + (1 - sigma_min) * t_next) * e
                else:
                    x = x0
    return O.like(noise, x)

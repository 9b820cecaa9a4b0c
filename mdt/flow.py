"""Rectified-flow maths of TRELLIS, independent of any network: the one copy used by the training objectives
(`mdt.distill`), the samplers and evaluation.

Path x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε, t ∈ [0, 1] (t = 1 is noise); velocity target (1 − σ_min)·ε − x0;
networks are called as model(x, TIME_SCALE·t, cond). Classifier-free guidance (TRELLIS convention):
(1 + w)·v(cond) − w·v(neg_cond), neg_cond defaulting to zeros.

Everything works on dense tensors [B, ...] and on SparseTensors alike. `data(x)` is the tensor holding the values
(the dense tensor itself, or a SparseTensor's feats [N, C] with the rows of a sample contiguous), `like(x, f)` wraps
values f the way x is wrapped (on x's coordinates), and `per_sample(v, x)` broadcasts a per-sample vector v [B]
(a time, a guidance strength) onto data(x).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mdt.sparse import SparseTensor, sparse_cat

SIGMA_MIN = 1e-5           # noise level left at t = 0
TIME_SCALE = 1000.0        # networks receive TIME_SCALE·t
log = logging.getLogger(__name__)


# ---- dense / sparse views -------------------------------------------------------------------------------------
def is_sparse(x: Any) -> bool:
    return isinstance(x, SparseTensor)


def data(x: Any) -> Tensor:
    """The tensor holding the values: the dense tensor itself, or a SparseTensor's feats."""
    return x.feats if is_sparse(x) else x


def like(x: Any, f: Tensor) -> Any:
    """Wrap values `f` the way `x` is wrapped (a SparseTensor on x's coordinates, or the dense tensor)."""
    return x.replace(f) if is_sparse(x) else f


def batch_size(x: Any) -> int:
    return int(x.batch_size) if is_sparse(x) else int(x.shape[0])


def per_sample(v: Tensor, x: Any) -> Tensor:
    """Broadcast a per-sample vector v [B] onto data(x): [B, 1, ..., 1] for dense, [N, 1, ...] rows for sparse."""
    f = data(x)
    v = v.to(device=f.device, dtype=f.dtype)
    if is_sparse(x):
        v = v[x.batch_idx]
    return v.view(-1, *([1] * (f.dim() - 1)))


def batch_twice(x: Any) -> Any:
    """[x; x] along the batch (samples B..2B−1 repeat samples 0..B−1). For a SparseTensor the doubled layout is
    kept in x's coordinate cache, so every tensor on x's coordinates (each sampler step) reuses it and its
    neighbour maps."""
    if not is_sparse(x):
        return torch.cat([x, x])
    pair = x._cache.get("batch_twice")
    if pair is None:
        pair = sparse_cat([x, x])
        x._cache["batch_twice"] = pair
    return pair.replace(torch.cat([x.feats, x.feats]))


def split_twice(out: Any, x: Any) -> tuple[Tensor, Tensor]:
    """Data of the two halves of a model output on `batch_twice(x)`."""
    f = data(out)
    n = data(x).shape[0]
    return f[:n], f[n:]


# ---- noise ------------------------------------------------------------------------------------------------------
def randn(shape: Sequence[int], generator: torch.Generator | None, device: Any = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Normal draws from `generator` (made on the generator's device, then moved, so a CPU generator also seeds
    CUDA runs reproducibly)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def rand(shape: Sequence[int], generator: torch.Generator | None, device: Any = None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    if generator is None:
        return torch.rand(tuple(shape), device=device, dtype=dtype)
    return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def randn_like(x: Any, generator: torch.Generator | None = None) -> Any:
    """Standard normal noise with x's layout (for a SparseTensor: on x's coordinates)."""
    f = data(x)
    return like(x, randn(f.shape, generator, f.device, f.dtype))


# ---- the path -----------------------------------------------------------------------------------------------------
def noise_sample(x0: Any, eps: Any, t: Tensor, sigma_min: float = SIGMA_MIN) -> Any:
    """x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε with t [B], laid out like x0 (eps: like x0, or its data)."""
    tt = per_sample(t, x0)
    return like(x0, (1 - tt) * data(x0) + (sigma_min + (1 - sigma_min) * tt) * data(eps))


def velocity_target(x0: Any, eps: Any, sigma_min: float = SIGMA_MIN) -> Any:
    """d x_t / dt = (1 − σ_min)·ε − x0, laid out like x0."""
    return like(x0, (1 - sigma_min) * data(eps) - data(x0))


def x0_from_velocity(x_t: Any, v: Any, t: Tensor, sigma_min: float = SIGMA_MIN) -> Any:
    tt = per_sample(t, x_t)
    return like(x_t, (1 - sigma_min) * data(x_t) - (sigma_min + (1 - sigma_min) * tt) * data(v))


def eps_from_velocity(x_t: Any, v: Any, t: Tensor) -> Any:
    tt = per_sample(t, x_t)
    return like(x_t, (1 - tt) * data(v) + data(x_t))


# ---- time ---------------------------------------------------------------------------------------------------------
def sample_time(n: int, schedule: str = "logit_normal", mean: float = 1.0, std: float = 1.0,
                generator: torch.Generator | None = None, device: Any = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """t' ∈ (0, 1), [n]: "logit_normal" = sigmoid(N(mean, std)) (TRELLIS "logitNormal"; image-large uses mean 1,
    std 1, skewed towards noise), or "uniform". Drawn in float64, then cast."""
    s = schedule.lower().replace("-", "_").replace(" ", "_")
    if s in ("logit_normal", "logitnormal"):
        z = randn((n,), generator, device, torch.float64)
        return torch.sigmoid(mean + std * z).to(dtype)
    if s == "uniform":
        return rand((n,), generator, device, torch.float64).to(dtype)
    raise ValueError(f"unknown t schedule {schedule!r} (use 'logit_normal' or 'uniform')")


def map_time(t_prime: Tensor, t_min: float) -> Tensor:
    """Schedule samples t' ∈ [0, 1] onto [t_min, 1]: t = t_min + (1 − t_min)·t' (t_min = σ_min, plus the step δ of
    a target taken at t − δ)."""
    return t_min + (1 - t_min) * t_prime


def time_grid(steps: int, rescale_t: float = 1.0) -> list[float]:
    """linspace(1, 0, steps + 1) (float64, as TRELLIS's numpy grid) mapped through t' = s·t / (1 + (s − 1)·t)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    s = rescale_t
    return [s * t / (1 + (s - 1) * t) for t in torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()]


def uses_guidance(t: float, cfg_strength: float, cfg_interval: tuple[float, float]) -> bool:
    return cfg_strength > 0 and cfg_interval[0] <= t <= cfg_interval[1]


def count_nfe(steps: int, cfg_strength: float = 0.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
              rescale_t: float = 1.0) -> int:
    """Network evaluations (per sample) of one sampling run: a guided step costs two, whether the two passes run
    as one forward of the doubled batch or as two forwards."""
    grid = time_grid(steps, rescale_t)
    return sum(2 if uses_guidance(t, cfg_strength, cfg_interval) else 1 for t in grid[:-1])


# ---- velocities -----------------------------------------------------------------------------------------------------
def expand_condition(cond: Tensor, n: int) -> Tensor:
    """A batch-1 condition repeated to n samples (other batch sizes unchanged)."""
    if cond.shape[0] == 1 and n > 1:
        return cond.expand(n, *cond.shape[1:])
    return cond


def negative_condition(cond: Tensor, neg_cond: Tensor | None) -> Tensor:
    """The unconditional input of CFG: neg_cond (a batch-1 tensor is repeated) or zeros like cond."""
    if neg_cond is None:
        return torch.zeros_like(cond)
    return expand_condition(neg_cond, cond.shape[0]).to(device=cond.device, dtype=cond.dtype)


def velocity(model: Callable, x: Any, t: Tensor, cond: Any) -> Any:
    """model(x, TIME_SCALE·t, cond) with t [B] in flow time."""
    return model(x, t * TIME_SCALE, cond)


def guided_velocity(model: Callable, x: Any, t: Tensor, cond: Tensor, neg_cond: Tensor | None,
                    cfg_strength: float | Tensor, batched: bool = True) -> Any:
    """(1 + w)·v(x, t, cond) − w·v(x, t, neg_cond), laid out like x; v(x, t, cond) alone when no w is > 0.

    cfg_strength: a float or a per-sample tensor w [B]. batched=True runs both passes as one forward of the doubled
    batch ([x; x], [t; t], [cond; neg_cond]); False runs two forwards of B (half the activation memory).
    """
    w = cfg_strength
    per_instance = torch.is_tensor(w)
    if not (bool((w > 0).any()) if per_instance else w > 0):
        return like(x, data(velocity(model, x, t, cond)))
    neg_cond = negative_condition(cond, neg_cond)
    if batched:
        both = velocity(model, batch_twice(x), torch.cat([t, t]), torch.cat([cond, neg_cond]))
        v, v_neg = split_twice(both, x)
    else:
        v = data(velocity(model, x, t, cond))
        v_neg = data(velocity(model, x, t, neg_cond))
    if per_instance:
        w = per_sample(w, like(x, v))
    return like(x, (1 + w) * v - w * v_neg)


# ---- sampling -------------------------------------------------------------------------------------------------------
def euler_sample(model: Callable, noise: Any, cond: Tensor, neg_cond: Tensor | None = None, steps: int = 25,
                 rescale_t: float = 1.0, cfg_strength: float | Tensor = 0.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_batched: bool = True,
                 return_trajectory: bool = False, progress: bool = False):
    """Euler integration of the (guided) velocity from t = 1 (noise) to t = 0 on `time_grid(steps, rescale_t)`.

    CFG is applied only for t inside `cfg_interval` (TRELLIS's guidance-interval sampler); cfg_strength may be a
    per-sample tensor [B]. Dense tensors or SparseTensors (the result is on the noise's coordinates); a batch-1
    condition is repeated. No grad. Returns the final sample (and the list of states if return_trajectory).
    """
    n = batch_size(noise)
    cond = expand_condition(cond, n)
    neg_cond = negative_condition(cond, neg_cond)
    strength = cfg_strength if torch.is_tensor(cfg_strength) else float(cfg_strength)
    guided_any = bool((strength > 0).any()) if torch.is_tensor(strength) else strength > 0
    f = data(noise)
    t_dtype = torch.promote_types(f.dtype, torch.float32)
    grid = time_grid(steps, rescale_t)
    trajectory = [noise]
    with torch.no_grad():
        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            tv = torch.full((n,), t, dtype=t_dtype, device=f.device)
            w = strength if guided_any and cfg_interval[0] <= t <= cfg_interval[1] else 0.0
            v = guided_velocity(model, like(noise, f), tv, cond, neg_cond, w, cfg_batched)
            f = f - (t - t_next) * data(v).to(f.dtype)
            if return_trajectory:
                trajectory.append(like(noise, f))
            if progress:
                log.info("sampling step %d/%d (t=%.4f)", i + 1, steps, t)
    x = like(noise, f)
    return (x, trajectory) if return_trajectory else x


class FlowEulerSampler:
    """TRELLIS's flow Euler sampler (optionally with its guidance interval) as an object: see `euler_sample`."""

    def __init__(self, sigma_min: float = SIGMA_MIN):
        self.sigma_min = sigma_min

    def sample(self, model: Callable, noise: Any, cond: Tensor, neg_cond: Tensor | None = None, steps: int = 25,
               rescale_t: float = 1.0, cfg_strength: float | Tensor = 0.0,
               cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_batched: bool = True,
               return_trajectory: bool = False, progress: bool = False):
        return euler_sample(model, noise, cond, neg_cond, steps, rescale_t, cfg_strength, tuple(cfg_interval),
                            cfg_batched, return_trajectory, progress)

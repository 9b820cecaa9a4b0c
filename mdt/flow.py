"""Rectified-flow maths of TRELLIS, independent of any network: the one copy used by the training objectives
(`mdt.distill`), the samplers and evaluation.

Path x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε, t ∈ [0, 1] (t = 1 is noise); velocity target (1 − σ_min)·ε − x0;
networks are called as model(x, TIME_SCALE·t, cond). Classifier-free guidance (TRELLIS convention):
(1 + w)·v(cond) − w·v(neg_cond), neg_cond defaulting to zeros. TRELLIS.2 keeps the path, time grid, Euler step and
model time, and writes guidance as w'·v(cond) + (1 − w')·v(neg_cond) with an optional guidance rescale
(`trellis2_guided_velocity`, `FlowEulerGuidanceIntervalSampler`): the two forms are the same velocity for
w' = 1 + w (`trellis2_strength`), so TRELLIS's CFG weight w is TRELLIS.2's w' − 1.

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


def randn_like(x: Any, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Any:
    """Standard normal noise with x's layout (for a SparseTensor: on x's coordinates). A sequence of generators,
    one per sample, draws sample i's noise from generator i alone, so it does not depend on how samples are
    batched."""
    f = data(x)
    if generator is None or isinstance(generator, torch.Generator):
        return like(x, randn(f.shape, generator, f.device, f.dtype))
    gens = list(generator)
    if len(gens) != batch_size(x):
        raise ValueError(f"{len(gens)} generators for a batch of {batch_size(x)}")
    if not is_sparse(x):
        return torch.stack([randn(f.shape[1:], g, f.device, f.dtype) for g in gens])
    idx = x.coords[:, 0].long()
    out = torch.empty_like(f)
    for b, g in enumerate(gens):
        rows = (idx == b).nonzero().squeeze(1)
        out[rows] = randn((rows.numel(), *f.shape[1:]), g, f.device, f.dtype)
    return like(x, out)


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


def velocity_from_x0(x_t: Any, x0: Any, t: Tensor, sigma_min: float = SIGMA_MIN) -> Any:
    """The inverse of x0_from_velocity: v = ((1 − σ_min)·x_t − x0) / (σ_min + (1 − σ_min)·t)."""
    tt = per_sample(t, x_t)
    return like(x_t, ((1 - sigma_min) * data(x_t) - data(x0)) / (sigma_min + (1 - sigma_min) * tt))


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


def velocity(model: Callable, x: Any, t: Tensor, cond: Any, **model_kwargs) -> Any:
    """model(x, TIME_SCALE·t, cond, **model_kwargs) with t [B] in flow time."""
    return model(x, t * TIME_SCALE, cond, **model_kwargs)


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


# ---- TRELLIS.2 guidance ---------------------------------------------------------------------------------------------
def trellis2_strength(trellis_cfg_strength: float | Tensor) -> float | Tensor:
    """TRELLIS's CFG weight w ((1 + w)·v_c − w·v_u) as TRELLIS.2's guidance strength w' (w'·v_c + (1 − w')·v_u):
    w' = 1 + w (w = 0, no guidance, is w' = 1, one conditional pass)."""
    return 1 + trellis_cfg_strength


def per_sample_std(x: Any) -> Tensor:
    """Unbiased std of each sample over all its non-batch elements [B] (sparse: over its voxels and channels)."""
    f = data(x).float()
    if not is_sparse(x):
        return f.reshape(f.shape[0], -1).std(dim=1)
    rows = f.reshape(f.shape[0], -1)
    n = x.counts.to(f.device).float() * rows.shape[1]                         # elements per sample
    total = torch.zeros(x.batch_size, device=f.device).index_add_(0, x.batch_idx, rows.sum(1))
    mean = total / n.clamp(min=1)
    sq = ((rows - mean[x.batch_idx, None]) ** 2).sum(1)
    return (torch.zeros_like(total).index_add_(0, x.batch_idx, sq) / (n - 1).clamp(min=1)).sqrt()


def twice_kwargs(x: Any, model_kwargs: dict) -> dict:
    """Model kwargs for the doubled batch [x; x]: a SparseTensor on x's coordinates (TRELLIS.2's concat_cond) is
    doubled onto batch_twice(x)'s coordinates, a dense tensor with x's batch is concatenated with itself."""
    out = {}
    for key, v in model_kwargs.items():
        if is_sparse(v):
            if v.feats.shape[0] != data(x).shape[0]:
                raise ValueError(f"{key} is not on the sampled latent's coordinates")
            out[key] = batch_twice(x).replace(torch.cat([v.feats, v.feats]))
        elif torch.is_tensor(v) and v.dim() and v.shape[0] == batch_size(x):
            out[key] = torch.cat([v, v])
        else:
            out[key] = v
    return out


def trellis2_guided_velocity(model: Callable, x: Any, t: Tensor, cond: Tensor, neg_cond: Tensor | None,
                             strength: float | Tensor = 1.0, rescale: float = 0.0, batched: bool = True,
                             sigma_min: float = SIGMA_MIN, **model_kwargs) -> Any:
    """TRELLIS.2's guided velocity w·v(cond) + (1 − w)·v(neg_cond), laid out like x.

    w = 1 is one conditional pass and w = 0 one unconditional pass (a float w; a per-sample tensor w [B] always
    runs both). rescale r > 0 (guidance rescale): x0 of the guided and of the conditional velocity, then
    x0 = r·x0_cfg·std(x0_pos)/std(x0_cfg) + (1 − r)·x0_cfg with per-sample stds, and v recomputed from x0.
    batched as in `guided_velocity` (both passes as one forward of the doubled batch; model_kwargs doubled too).
    """
    w = strength
    per_instance = torch.is_tensor(w)
    neg_cond = negative_condition(cond, neg_cond)
    if not per_instance and w == 1:
        return like(x, data(velocity(model, x, t, cond, **model_kwargs)))
    if not per_instance and w == 0:
        return like(x, data(velocity(model, x, t, neg_cond, **model_kwargs)))
    if batched:
        both = velocity(model, batch_twice(x), torch.cat([t, t]), torch.cat([cond, neg_cond]),
                        **twice_kwargs(x, model_kwargs))
        v_pos, v_neg = split_twice(both, x)
    else:
        v_pos = data(velocity(model, x, t, cond, **model_kwargs))
        v_neg = data(velocity(model, x, t, neg_cond, **model_kwargs))
    if per_instance:
        w = per_sample(w, like(x, v_pos))
    v = like(x, w * v_pos + (1 - w) * v_neg)
    if rescale > 0:
        x0_pos = x0_from_velocity(x, like(x, v_pos), t, sigma_min)
        x0_cfg = x0_from_velocity(x, v, t, sigma_min)
        ratio = per_sample(per_sample_std(x0_pos) / per_sample_std(x0_cfg), x)
        x0 = like(x, rescale * data(x0_cfg) * ratio + (1 - rescale) * data(x0_cfg))
        v = velocity_from_x0(x, x0, t, sigma_min)
    return v


def count_nfe_trellis2(steps: int, guidance_strength: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0),
                       rescale_t: float = 1.0) -> int:
    """Network evaluations per sample of a TRELLIS.2 sampling run: two per step inside the interval unless the
    strength is 1 (conditional only) or 0 (unconditional only), one elsewhere."""
    grid = time_grid(steps, rescale_t)
    guided = guidance_strength not in (0, 1)
    return sum(2 if guided and guidance_interval[0] <= t <= guidance_interval[1] else 1 for t in grid[:-1])


class FlowEulerGuidanceIntervalSampler:
    """TRELLIS.2's Euler sampler with guidance strength, rescale and interval (same path, time grid, `rescale_t`
    warp, Euler step and model time as TRELLIS's). Outside `guidance_interval` (t after the warp) the step uses
    v(cond) alone. `sample` returns the final sample, dense or a SparseTensor on the noise's coordinates;
    model_kwargs (TRELLIS.2's concat_cond) go to every model call."""

    def __init__(self, sigma_min: float = SIGMA_MIN):
        self.sigma_min = sigma_min

    def sample(self, model: Callable, noise: Any, cond: Tensor, neg_cond: Tensor | None = None, steps: int = 50,
               rescale_t: float = 1.0, guidance_strength: float | Tensor = 3.0, guidance_rescale: float = 0.0,
               guidance_interval: tuple[float, float] = (0.0, 1.0), batched: bool = True, verbose: bool = False,
               return_trajectory: bool = False, **model_kwargs):
        n = batch_size(noise)
        cond = expand_condition(cond, n)
        neg_cond = negative_condition(cond, neg_cond)
        f = data(noise)
        t_dtype = torch.promote_types(f.dtype, torch.float32)
        grid = time_grid(steps, rescale_t)
        trajectory = [noise]
        with torch.no_grad():
            for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                tv = torch.full((n,), t, dtype=t_dtype, device=f.device)
                inside = guidance_interval[0] <= t <= guidance_interval[1]
                w = guidance_strength if inside else 1.0
                v = trellis2_guided_velocity(model, like(noise, f), tv, cond, neg_cond, w,
                                             guidance_rescale if inside else 0.0, batched, self.sigma_min,
                                             **model_kwargs)
                f = f - (t - t_next) * data(v).to(f.dtype)
                if return_trajectory:
                    trajectory.append(like(noise, f))
                if verbose:
                    log.info("sampling step %d/%d (t=%.4f)", i + 1, steps, t)
        x = like(noise, f)
        return (x, trajectory) if return_trajectory else x

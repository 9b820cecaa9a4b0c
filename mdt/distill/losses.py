"""What the objectives share beyond the flow maths of `mdt.flow`: model calls on data tensors, per-sample
reductions of loss maps, the time-binned loss, hyper-parameter draws and the time derivative of a network.

Every objective works on the *data* of a latent (`mdt.flow.data`: the dense tensor [B, C, ...] or the feature
matrix [N, C] of a SparseTensor) next to the latent itself, which carries the layout; per-sample quantities ([B]
vectors such as t or a norm) are broadcast onto the data with `mdt.flow.per_sample(v, x)` and reduced from it
with `sample_sum(f, x)`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mdt import flow
from mdt.flow import batch_size, data, like
from mdt.sparse import backends as sparse_backends
from torch.nn.attention import SDPBackend, sdpa_kernel

NUM_BINS = 10


# ---- per-sample reductions -----------------------------------------------------------------------------------
def sample_sum(f: Tensor, x: Any) -> Tensor:
    """Sum over all non-batch elements of each sample of data f (laid out like x): [B]."""
    if flow.is_sparse(x):
        rows = f.reshape(f.shape[0], -1).sum(1)
        return rows.new_zeros(batch_size(x)).index_add(0, x.batch_idx, rows)
    return f.reshape(f.shape[0], -1).sum(1)


def sample_numel(x: Any) -> Tensor:
    """Number of elements (voxels x channels) of each sample: float [B]."""
    f = data(x)
    per_row = math.prod(f.shape[1:])
    if flow.is_sparse(x):
        counts = torch.bincount(x.batch_idx, minlength=batch_size(x))
        return counts.to(torch.float64) * per_row
    return torch.full((f.shape[0],), float(per_row), dtype=torch.float64, device=f.device)


def sample_norm(f: Tensor, x: Any) -> Tensor:
    """Euclidean norm over all non-batch elements of each sample: [B]."""
    return sample_sum(f.pow(2), x).sqrt()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic runs in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def mean_loss(sq: Tensor) -> Tensor:
    """Mean over all elements (TRELLIS: for sparse batches over all voxels x channels of the batch)."""
    return sq.mean()


def per_instance(sq: Tensor, x: Any) -> Tensor:
    """Per-instance mean of an element-wise loss map (used for the t-bins)."""
    return sample_sum(sq.detach(), x).double() / sample_numel(x).to(sq.device)


def time_bins(t: Tensor, per_instance: Tensor, num_bins: int = NUM_BINS) -> Tensor:
    """Mean of per-instance values in `num_bins` equal bins over t in [0, 1]; NaN for an empty bin."""
    t = t.detach().double().flatten()
    v = per_instance.detach().double().flatten()
    idx = (t * num_bins).floor().long().clamp(0, num_bins - 1)
    total = torch.zeros(num_bins, dtype=torch.float64, device=t.device).index_add(0, idx, v)
    count = torch.zeros(num_bins, dtype=torch.float64, device=t.device).index_add(0, idx, torch.ones_like(v))
    out = total / count
    out[count == 0] = float("nan")
    return out.float().cpu()


def draw_choice(value: float | Sequence[float], generator: torch.Generator | None) -> float:
    """A scalar as is; a list/tuple: one element drawn uniformly (once per call = once per step)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError("empty list of values")
        dev = generator.device if generator is not None else None
        i = int(torch.randint(len(value), (1,), generator=generator, device=dev).item())
        return float(value[i])
    return float(value)


# ---- model calls on data ----------------------------------------------------------------------------------------
def call(model: Callable, x: Any, f: Tensor, t: Tensor, cond: Any) -> Tensor:
    """Data of model(like(x, f), TIME_SCALE·t, cond) (feats for a sparse model)."""
    return data(flow.velocity(model, like(x, f), t, cond))


def guidance_form(model: Callable) -> str:
    """"trellis2" for a TRELLIS.2 network (also behind the training wrappers' `teacher` / `module`), else "trellis"."""
    for m in (model, getattr(model, "teacher", None), getattr(model, "module", None)):
        form = getattr(m, "GUIDANCE_FORM", None)
        if form:
            return form
    return "trellis"


def guided_call(model: Callable, x: Any, f: Tensor, t: Tensor, cond: Any, neg_cond: Any, w: float,
                batched: bool = True) -> Tensor:
    """Data of the guided velocity at like(x, f) for a CFG weight w in MDT-dist's (TRELLIS's) convention:
    (1 + w) v(cond) - w v(neg_cond), v(cond) for w <= 0. A TRELLIS.2 network is guided in its own form,
    w' v(cond) + (1 - w') v(neg_cond) with w' = 1 + w (`mdt.flow.trellis2_strength`), without guidance rescale."""
    if guidance_form(model) == "trellis2":
        strength = flow.trellis2_strength(w) if (torch.is_tensor(w) or w > 0) else 1.0
        return data(flow.trellis2_guided_velocity(model, like(x, f), t, cond, neg_cond, strength, 0.0, batched))
    return data(flow.guided_velocity(model, like(x, f), t, cond, neg_cond, w, batched))


@contextlib.contextmanager
def _math_sdpa():
    """Forward-mode AD has no rule for fused attention kernels (torch's flash/efficient SDPA, flash-attn): inside
    this context torch SDPA uses its math backend (plain differentiable ops) and mdt.sparse's attention backend is
    temporarily "sdpa". Not thread-safe (the mdt.sparse backend choice is a module global)."""

    old = getattr(sparse_backends, "_attn", None)
    if old != "sdpa":
        sparse_backends.set_backends(attn="sdpa")
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if old is not None and old != "sdpa":
            sparse_backends.set_backends(attn=old)


def time_derivative(model: Callable, x: Any, f: Tensor, t: Tensor, cond: Any, v: Tensor,
                    method: str = "func", fd_step: float = 1e-3) -> Tensor:
    """Total derivative of (f, t) -> model(f, TIME_SCALE·t, cond) along the tangent (v, 1) at (f, t), no grad.

    d/dt S(x(t), t) = dS/dx . v + dS/dt with t in flow time (the factor TIME_SCALE is inside the function).
    method "func": exact forward-mode JVP (torch.func.jvp; fused attention kernels are switched to the math
    backend for it); "fd": central finite difference with step `fd_step` (for networks whose ops have no
    forward-mode rule; O(fd_step^2) error).
    """
    f, t, v = f.detach(), t.detach(), v.detach()
    if method == "func":
        def fn(ff: Tensor, tt: Tensor) -> Tensor:
            return call(model, x, ff, tt, cond)

        with torch.no_grad(), _math_sdpa(), warnings.catch_warnings():
            # torch's own first-use decomposition code still calls the deprecated torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            _, dv = torch.func.jvp(fn, (f, t), (v.to(f.dtype), torch.ones_like(t)))
        return dv.detach()
    if method == "fd":
        h = fd_step
        with torch.no_grad():
            up = call(model, x, f + h * v, t + h, cond)
            down = call(model, x, f - h * v, t - h, cond)
        return ((up - down) / (2 * h)).detach()
    raise ValueError(f"unknown JVP method {method!r} (use 'func' or 'fd')")

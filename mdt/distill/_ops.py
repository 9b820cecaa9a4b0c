"""Small helpers shared by the objectives: one code path for dense tensors and sparse voxel tensors.

Internally every objective works on the *data* of a latent: the dense tensor itself ([B, C, ...]) or the feature
matrix of a SparseTensor ([N, C], rows of a sample contiguous). `data(x)` / `like(x, f)` convert between the two
views; per-sample quantities ([B] vectors such as t or a norm) are broadcast onto the data with `per_sample(v, x)`
and reduced from it with `sample_sum(f, x)`. Only the duck-typed part of the SparseTensor contract is used
(`.feats`, `.coords`, `.replace`, `.batch_idx`, `.batch_size`), so these helpers carry no import of mdt.sparse.

Flow convention (TRELLIS, reference section 3.1; identical to `mdt.flow.noise_sample` / `velocity_target`):
x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps, velocity (1 - sigma_min) eps - x0, model time 1000 t.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

NUM_BINS = 10


# ---- dense / sparse views ------------------------------------------------------------------------------------
def is_sparse(x: Any) -> bool:
    return hasattr(x, "feats") and hasattr(x, "coords") and hasattr(x, "replace")


def data(x: Any) -> Tensor:
    """The tensor holding the values: the dense tensor itself, or a SparseTensor's feats."""
    return x.feats if is_sparse(x) else x


def like(x: Any, f: Tensor) -> Any:
    """Wrap data `f` the way `x` is wrapped (a SparseTensor on x's coordinates, or the dense tensor)."""
    return x.replace(f) if is_sparse(x) else f


def batch_size(x: Any) -> int:
    return int(x.batch_size) if is_sparse(x) else int(x.shape[0])


def per_sample(v: Tensor, x: Any) -> Tensor:
    """Broadcast a per-sample vector v [B] onto the data of x (dense [B,1,...,1]; sparse [N,1,...])."""
    f = data(x)
    if is_sparse(x):
        return v.to(f.dtype)[x.batch_idx].view(-1, *([1] * (f.dim() - 1)))
    return v.to(f.dtype).view(-1, *([1] * (f.dim() - 1)))


def sample_sum(f: Tensor, x: Any) -> Tensor:
    """Sum over all non-batch elements of each sample of data f (laid out like x): [B]."""
    if is_sparse(x):
        rows = f.reshape(f.shape[0], -1).sum(1)
        return rows.new_zeros(batch_size(x)).index_add(0, x.batch_idx, rows)
    return f.reshape(f.shape[0], -1).sum(1)


def sample_numel(x: Any) -> Tensor:
    """Number of elements (voxels x channels) of each sample: float [B]."""
    f = data(x)
    per_row = math.prod(f.shape[1:])
    if is_sparse(x):
        counts = torch.bincount(x.batch_idx, minlength=batch_size(x))
        return counts.to(torch.float64) * per_row
    return torch.full((f.shape[0],), float(per_row), dtype=torch.float64, device=f.device)


def sample_norm(f: Tensor, x: Any) -> Tensor:
    """Euclidean norm over all non-batch elements of each sample: [B]."""
    return sample_sum(f.pow(2), x).sqrt()


def randn(shape: Sequence[int], generator: torch.Generator | None, device: Any = None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Normal draws from `generator` (on the generator's device, then moved), so a CPU generator also seeds
    CUDA runs reproducibly."""
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic runs in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# ---- flow maths ---------------------------------------------------------------------------------------------
def noise_data(x0: Tensor, eps: Tensor, t: Tensor, x: Any, sigma_min: float) -> Tensor:
    """x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps on data tensors (t [B] per sample)."""
    tb = per_sample(t, x)
    return (1 - tb) * x0 + (sigma_min + (1 - sigma_min) * tb) * eps


def sample_time(n: int, schedule: str, mean: float, std: float, generator: torch.Generator | None,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """t' in (0, 1): "logit_normal" = sigmoid(N(mean, std)) (TRELLIS "logitNormal"), or "uniform"."""
    s = schedule.lower().replace("-", "_").replace(" ", "_")
    if s in ("logit_normal", "logitnormal"):
        z = randn((n,), generator, device, torch.float64)
        return torch.sigmoid(mean + std * z).to(dtype)
    if s == "uniform":
        return rand((n,), generator, device, torch.float64).to(dtype)
    raise ValueError(f"unknown t schedule {schedule!r} (use 'logit_normal' or 'uniform')")


def draw_choice(value: float | Sequence[float], generator: torch.Generator | None) -> float:
    """A scalar as is; a list/tuple: one element drawn uniformly (once per call = once per step)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError("empty list of values")
        dev = generator.device if generator is not None else None
        i = int(torch.randint(len(value), (1,), generator=generator, device=dev).item())
        return float(value[i])
    return float(value)


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


# ---- model calls --------------------------------------------------------------------------------------------
def call(model: Callable, x: Any, f: Tensor, t: Tensor, cond: Any) -> Tensor:
    """model(x-like(f), 1000 t, cond) -> output data (feats for a sparse model)."""
    out = model(like(x, f), t * 1000.0, cond)
    return data(out)


def guided_velocity(model: Callable, x: Any, f: Tensor, t: Tensor, cond: Any, neg_cond: Any,
                    w: float) -> Tensor:
    """TRELLIS CFG convention (1 + w) v(cond) - w v(neg_cond); w <= 0 means the conditional velocity only."""
    v = call(model, x, f, t, cond)
    if w > 0:
        v_u = call(model, x, f, t, neg_cond)
        v = (1 + w) * v - w * v_u
    return v


def zero_cond(cond: Any) -> Any:
    return torch.zeros_like(cond)


def negative_cond(cond: Tensor, neg_cond: Tensor | None) -> Tensor:
    """The unconditional input for CFG: neg_cond (a batch-1 tensor is repeated) or zeros like cond."""
    if neg_cond is None:
        return torch.zeros_like(cond)
    if neg_cond.shape[0] == 1 and cond.shape[0] > 1:
        neg_cond = neg_cond.expand(cond.shape[0], *neg_cond.shape[1:])
    return neg_cond.to(device=cond.device, dtype=cond.dtype)


@contextlib.contextmanager
def _math_sdpa():
    """Forward-mode AD has no rule for fused attention kernels (torch's flash/efficient SDPA, flash-attn): inside
    this context torch SDPA uses its math backend (plain differentiable ops) and mdt.sparse's attention backend is
    temporarily "sdpa". Not thread-safe (the mdt.sparse backend choice is a module global)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from mdt.sparse import backends as sparse_backends
    except ImportError:  # pragma: no cover - mdt.sparse is part of the package
        sparse_backends = None
    old = getattr(sparse_backends, "_attn", None)
    if sparse_backends is not None and old != "sdpa":
        sparse_backends.set_backends(attn="sdpa")
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if sparse_backends is not None and old is not None and old != "sdpa":
            sparse_backends.set_backends(attn=old)


def time_derivative(model: Callable, x: Any, f: Tensor, t: Tensor, cond: Any, v: Tensor,
                    method: str = "func", fd_step: float = 1e-3) -> Tensor:
    """Total derivative of (f, t) -> model(f, 1000 t, cond) along the tangent (v, 1) at (f, t), no grad.

    d/dt S(x(t), t) = dS/dx . v + dS/dt with t unscaled (the factor 1000 is inside the function).
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


def mean_loss(sq: Tensor) -> Tensor:
    """Mean over all elements (TRELLIS: for sparse batches over all voxels x channels of the batch)."""
    return sq.mean()


def per_instance(sq: Tensor, x: Any) -> Tensor:
    """Per-instance mean of an element-wise loss map (used for the t-bins)."""
    return sample_sum(sq.detach(), x).double() / sample_numel(x).to(sq.device)

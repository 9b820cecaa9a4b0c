"""Training machinery shared by every objective: EMA, TRELLIS's adaptive gradient clipper, learning-rate warm-up,
precision selection and the objective registry. Plain PyTorch, no Ray."""
from __future__ import annotations

import contextlib
import math
from collections import deque
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from mdt import distill

# --------------------------------------------------------------------------------------------------- objectives


def objective_fn(name: str, ocfg) -> tuple[Callable[..., dict[str, Tensor]], Any, bool]:
    """(function, its config dataclass, whether it takes a `target_model`) for an objective name."""
    table = {
        "flow_matching": (distill.flow_matching_loss, ocfg.flow_matching, False),
        "mdt": (distill.mdt_loss, ocfg.mdt, False),
        "vm": (distill.vm_loss, ocfg.mdt, False),
        "cm": (distill.cm_loss, ocfg.cm, True),
        "pcm": (distill.pcm_loss, ocfg.pcm, True),
        "scm": (distill.scm_loss, ocfg.scm, True),
    }
    if name not in table:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(table)}")
    return table[name]


# --------------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's parameters, kept in float32: ema <- rate * ema + (1 - rate) * p.

    Works on plain tensors and on FSDP2 DTensor shards alike (the update is element-wise). Keys are the
    parameter names of the unwrapped model, so `state_dict()` has the model's own key names (buffers are
    taken from the live model when the EMA weights are exported)."""

    def __init__(self, model: nn.Module, rate: float = 0.9999):
        self.rate = float(rate)
        self.shadow: dict[str, Tensor] = {n: p.detach().clone().float() for n, p in model.named_parameters()
                                          if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, rate: float | None = None) -> None:
        r = self.rate if rate is None else rate
        for n, p in model.named_parameters():
            s = self.shadow.get(n)
            if s is not None:
                s.lerp_(p.detach().float(), 1.0 - r)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)[:5]}")
        for n, s in self.shadow.items():
            s.copy_(state[n].to(s.device) if not hasattr(s, "device_mesh") else state[n])


# --------------------------------------------------------------------------------------------------- clipping


class AdaptiveGradClipper:
    """TRELLIS's AdaptiveGradClipper: a ring buffer of the last `buffer` finite gradient norms; until it is full
    clip at `max_norm`, afterwards at min(`percentile`-th percentile of the buffer, `max_norm`). `__call__`
    returns the pre-clip total norm (logged as grad_norm); a non-finite norm is not recorded and nothing is
    clipped (the caller skips the step)."""

    def __init__(self, max_norm: float = 1.0, percentile: float = 95.0, buffer: int = 1000, adaptive: bool = True):
        self.max_norm = float(max_norm)
        self.percentile = float(percentile)
        self.adaptive = adaptive
        self.norms: deque[float] = deque(maxlen=int(buffer))

    def threshold(self) -> float:
        if self.max_norm <= 0:
            return math.inf
        if not self.adaptive or len(self.norms) < (self.norms.maxlen or 0):
            return self.max_norm
        q = float(torch.quantile(torch.tensor(list(self.norms), dtype=torch.float64), self.percentile / 100.0))
        return min(q, self.max_norm)

    def __call__(self, parameters: Iterable[Tensor]) -> float:
        params = [p for p in parameters if p.grad is not None]
        thr = self.threshold()
        # clip_grad_norm_ computes the total norm (DTensor-aware for FSDP2) and clips in one pass; with
        # max_norm = inf it only measures.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=thr if math.isfinite(thr) else float("inf"),
                                              error_if_nonfinite=False, foreach=None)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        value = float(norm)
        if math.isfinite(value):
            self.norms.append(value)
        return value

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "max_norm": self.max_norm, "percentile": self.percentile}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(float(x) for x in state.get("norms", []))


# --------------------------------------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA for "auto"/"bf16", None (plain fp32) on CPU or for "fp32"."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warmup_factor(step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)

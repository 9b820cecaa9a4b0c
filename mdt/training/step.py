"""One optimisation step of any objective: micro-batches (gradient accumulation), forward of the objective under
the chosen precision, backward, NaN/inf guard, adaptive clipping, AdamW, EMA.

The student may be wrapped for data parallelism (DDP, or FSDP2 sharding); objectives call it through
`wrappers.StudentCalls` (the wrapper for calls that build a graph, so that gradients are synchronised; the
unwrapped module in float32 for no-grad target calls and JVPs) and the frozen teacher through
`wrappers.FrozenTeacher` (eval mode, no parameter requires grad, outside the student's autocast). `Trainer`
knows nothing about Ray: the Ray Train loop (`pipelines.distill.worker`) feeds it batches; tests drive it directly.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .machinery import EMA, AdaptiveGradClipper, autocast, objective_fn, warmup_factor
from .wrappers import FrozenTeacher, StudentCalls
import copy


def is_sparse(x: Any) -> bool:
    return hasattr(x, "feats") and hasattr(x, "coords") and hasattr(x, "replace")


def batch_len(batch: dict) -> int:
    x0 = batch["x0"]
    return int(x0.batch_size) if is_sparse(x0) else int(x0.shape[0])


def split_batch(batch: dict, n: int) -> list[dict]:
    """Split a training batch into `n` micro-batches along the sample axis (dense tensors, SparseTensors, lists)."""
    b = batch_len(batch)
    n = max(1, min(n, b))
    if n == 1:
        return [batch]
    bounds = [round(i * b / n) for i in range(n + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mb = {}
        for k, v in batch.items():
            if is_sparse(v):
                mb[k] = _sparse_slice(v, lo, hi)
            elif isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b:
                mb[k] = v[lo:hi]
            elif isinstance(v, list) and len(v) == b:
                mb[k] = v[lo:hi]
            else:
                mb[k] = v
        out.append(mb)
    return out


def _sparse_slice(x, lo: int, hi: int):
    layout = x.layout
    rows = slice(layout[lo].start, layout[hi - 1].stop)
    coords = x.coords[rows].clone()
    coords[:, 0] -= lo
    return type(x)(x.feats[rows], coords, batch_size=hi - lo)


@contextlib.contextmanager
def bound_concat_cond(models, concat_cond):
    """TRELLIS.2 texture stage: every call of these networks inside the block gets the batch's concat_cond (the
    objectives call networks as model(x, t, cond)); nothing happens without one."""
    with contextlib.ExitStack() as stack:
        if concat_cond is not None:
            feats = concat_cond.feats if is_sparse(concat_cond) else concat_cond
            for m in models:
                if m is not None:
                    if not hasattr(m, "bound_concat_cond"):
                        raise ValueError(f"{type(m).__name__} takes no concat_cond")
                    stack.enter_context(m.bound_concat_cond(feats))
        yield


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) or is_sparse(v):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


@dataclass
class StepResult:
    step: int                       # optimiser steps taken so far (after this one)
    loss: float                     # mean over micro-batches (NaN when non-finite)
    terms: dict[str, float]         # per-term losses (mean over micro-batches)
    loss_bins: Tensor               # [10] per-time-bin mean losses (NaN where empty)
    grad_norm: float
    lr: float
    skipped: bool
    skipped_total: int
    samples: int                    # samples of this worker in this step
    step_time: float                # seconds


class Trainer:
    """Optimiser state + one `step(batch)`; `model` is the (possibly wrapped) student used in the forward pass,
    `student` the unwrapped module (parameters, EMA, export)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg, *, model: nn.Module | None = None,
                 device: torch.device | None = None, autocast_dtype: torch.dtype | None = None,
                 distributed: bool = False):
        self.cfg = cfg
        self.student = student
        self.model = model if model is not None else student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.student_calls = StudentCalls(self.model, student)
        self.teacher_calls = FrozenTeacher(teacher) if teacher is not None else None
        self.device = device or torch.device("cpu")
        self.autocast_dtype = autocast_dtype
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.fn, self.ocfg, self.takes_target = objective_fn(cfg.objective.name, cfg.objective)
        params = [p for p in student.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.clipper = AdaptiveGradClipper(cfg.clip.max_norm, cfg.clip.percentile, cfg.clip.buffer,
                                           cfg.clip.adaptive)
        self.ema = EMA(student, cfg.ema.rate) if cfg.ema.enabled else None
        self.step_count = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self._ema_model: nn.Module | None = None

    # ------------------------------------------------------------------------------------------- helpers
    def target_model(self) -> nn.Module | None:
        """cm/pcm/scm target network: None (the student under stop-gradient) or an EMA copy."""
        if not self.takes_target or self.cfg.objective.target != "ema" or self.ema is None:
            return None
        if self._ema_model is None:

            self._ema_model = copy.deepcopy(self.student).eval().requires_grad_(False)
        with torch.no_grad():
            for n, p in self._ema_model.named_parameters():
                if n in self.ema.shadow:
                    p.copy_(self.ema.shadow[n])
        return self._ema_model

    def _no_sync(self, last: bool):
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _set_fsdp_sync(self, sync: bool) -> None:
        fn = getattr(self.model, "set_requires_gradient_sync", None)
        if fn is not None:
            fn(sync)

    def _any_rank(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def lr(self) -> float:
        return self.cfg.optim.lr * warmup_factor(self.step_count, self.cfg.optim.warmup_steps)

    # ------------------------------------------------------------------------------------------- the step
    def step(self, batch: dict, generator: torch.Generator | None = None) -> StepResult:
        t0 = time.perf_counter()
        self.student.train()
        micro = split_batch(batch, self.cfg.data.batch_split)
        n = len(micro)
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        target = self.target_model()
        totals: dict[str, float] = {}
        bins_sum = torch.zeros(self.ocfg.num_bins, dtype=torch.float64)
        bins_cnt = torch.zeros(self.ocfg.num_bins, dtype=torch.float64)
        nonfinite = False
        for i, mb in enumerate(micro):
            last = i == n - 1
            mb = to_device(mb, self.device)
            self._set_fsdp_sync(last)
            with self._no_sync(last):
                with autocast(self.device, self.autocast_dtype), bound_concat_cond(
                        (self.student, self.teacher, target), mb.get("concat_cond")):
                    kw = {"target_model": target} if self.takes_target else {}
                    terms = self.fn(self.student_calls, self.teacher_calls, mb, self.ocfg, generator=generator,
                                    **kw)
                loss = terms["loss"].float() / n
                if not torch.isfinite(loss):
                    nonfinite = True
                # Backward even when non-finite: every rank must take part in the gradient all-reduce; the
                # (poisoned) step is dropped below on all ranks alike.
                loss.backward()
            for k, v in terms.items():
                if k == "loss_bins":
                    vb = v.detach().double().cpu()
                    ok = torch.isfinite(vb)
                    bins_sum += torch.where(ok, vb, torch.zeros_like(vb))
                    bins_cnt += ok.double()
                elif k.startswith("loss") or k in ("tangent_norm",):
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / n
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = self.clipper(params)
        bad = nonfinite or not math.isfinite(grad_norm)
        if self.cfg.train.nan_guard:
            bad = self._any_rank(bad)
        if bad and self.cfg.train.nan_guard:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_total += 1
            self.consecutive_skips += 1
            if self.consecutive_skips > self.cfg.train.max_consecutive_skips:
                raise FloatingPointError(
                    f"{self.consecutive_skips} consecutive steps with a non-finite loss or gradient; aborting")
        else:
            self.optimizer.step()
            self.consecutive_skips = 0
            if self.ema is not None:
                self.ema.update(self.student)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        bins = torch.where(bins_cnt > 0, bins_sum / bins_cnt.clamp(min=1), torch.full_like(bins_sum, math.nan))
        return StepResult(step=self.step_count, loss=totals.get("loss", math.nan), terms=totals,
                          loss_bins=bins.float(), grad_norm=grad_norm, lr=lr, skipped=bad,
                          skipped_total=self.skipped_total, samples=batch_len(batch),
                          step_time=time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------- state
    def scalar_state(self) -> dict:
        return {"step": self.step_count, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips, "clipper": self.clipper.state_dict()}

    def load_scalar_state(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.clipper.load_state_dict(state.get("clipper", {}))


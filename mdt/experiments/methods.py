"""Methods of the benchmark: the objective and its config per method, teacher training, distillation, sampling.

Methods: `teacher` (no distillation; the teacher sampled with CFG at few steps), `cm`, `pcm`, `scm` (consistency
baselines), `vm` (MDT-dist Velocity Matching only), `mdt` (VM + VD, VD weighted as the released trainer) and
`mdt_paper` (VM + VD with the paper's (1 - t) VD weighting, docs/method.md). Every distillation method starts from
the teacher's weights and gets the same budget: the same number of student updates, batch size, optimiser
(AdamW, constant lr after a short warm-up, grad-norm clip) and time schedule. Students are sampled without CFG
(the teacher's guidance is distilled into them) with the Euler rule on the uniform grid (the MDT-dist snapshot
sampler, `mdt.distill.student_sample` mode "euler"); the teacher with `FlowEulerSampler` and CFG.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mdt.distill import (AdaptiveWeight, CMConfig, FlowMatchingConfig, MDTConfig, PCMConfig, SCMConfig, cm_loss,
                         flow_matching_loss, mdt_loss, pcm_loss, scm_loss, student_sample, tangent_warmup_factor,
                         vm_loss)
from mdt.flow import FlowEulerSampler, count_nfe

METHODS = ("teacher", "cm", "pcm", "scm", "vm", "mdt", "mdt_paper")
STUDENT_METHODS = METHODS[1:]
CONSISTENCY_METHODS = ("cm", "pcm", "scm")


@dataclass
class TeacherHP:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.995
    p_uncond: float = 0.1
    t_schedule: str = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    grad_clip: float = 1.0
    cosine: bool = True


@dataclass
class DistillHP:
    """Shared budget and per-method knobs (documented per preset)."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-4
    warmup: int = 50
    grad_clip: float = 1.0
    t_schedule: str = "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    cfg: float = 1.0            # teacher CFG strength everywhere (TRELLIS convention; eval sampling of the teacher)
    delta: float = 0.02         # Euler step / finite-difference step (CM, PCM, VM, MDT)
    pcm_phases: int = 2
    scm_tangent_c: float = 0.1
    scm_warmup: int = 0         # steps over which sCM's tangent warm-up r ramps 0 -> 1 (0: no warm-up)
    scm_adaptive: bool = False  # sCM's learned adaptive time weighting w_phi(t) (mdt.distill.AdaptiveWeight)
    target_ema: float = 0.0     # CM/PCM/sCM: > 0 takes the target from an EMA copy of the student with this rate
    vm_mode: str = "discrete"
    d_norm: bool = True
    d_norm_c: float = 0.1
    w_vm: float | None = None   # None: = cfg
    w_vd: float | None = None   # None: = cfg
    lambda_vm: float = 1.0
    lambda_vd: float = 1.0
    vd_weighting: str = "released"   # "paper": the (1 - t) factor of the VD gradient (docs/method.md);
                                     # method `mdt_paper` always uses "paper"
    jvp: str = "func"


def objective(method: str, hp: DistillHP, step: int = 0) -> tuple[Callable, Any]:
    sched = dict(t_schedule=hp.t_schedule, t_mean=hp.t_mean, t_std=hp.t_std)
    if method == "cm":
        return cm_loss, CMConfig(delta=hp.delta, phases=1, w=hp.cfg, **sched)
    if method == "pcm":
        return pcm_loss, PCMConfig(delta=hp.delta, phases=hp.pcm_phases, w=hp.cfg, **sched)
    if method == "scm":
        return scm_loss, SCMConfig(w=hp.cfg, tangent_norm_c=hp.scm_tangent_c,
                                   tangent_warmup=tangent_warmup_factor(step, hp.scm_warmup),
                                   adaptive_weighting=hp.scm_adaptive, jvp=hp.jvp, **sched)
    if method in ("vm", "mdt", "mdt_paper"):
        cfg = MDTConfig(mode=hp.vm_mode, delta=hp.delta, w_vm=hp.cfg if hp.w_vm is None else hp.w_vm,
                        w_vd=hp.cfg if hp.w_vd is None else hp.w_vd, lambda_vm=hp.lambda_vm,
                        lambda_vd=0.0 if method == "vm" else hp.lambda_vd, d_norm=hp.d_norm, d_norm_c=hp.d_norm_c,
                        vd_weighting="paper" if method == "mdt_paper" else hp.vd_weighting, jvp=hp.jvp, **sched)
        return (vm_loss if method == "vm" else mdt_loss), cfg
    raise ValueError(f"no objective for method {method!r}")


def _lr_factor(step: int, total: int, warmup: int, cosine: bool) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    p = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _scalar(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def train_teacher(model: torch.nn.Module, sample_batch: Callable, hp: TeacherHP, seed: int,
                  log_every: int = 100) -> tuple[torch.nn.Module, list[dict]]:
    """TRELLIS flow matching (mdt.distill.flow_matching_loss) with AdamW and an EMA copy (returned)."""
    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=0.0, betas=(0.9, 0.99))
    cfg = FlowMatchingConfig(p_uncond=hp.p_uncond, t_schedule=hp.t_schedule, t_mean=hp.t_mean, t_std=hp.t_std)
    log, acc, t0 = [], 0.0, time.perf_counter()
    model.train()
    for step in range(hp.steps):
        for group in opt.param_groups:
            group["lr"] = hp.lr * _lr_factor(step, hp.steps, hp.warmup, hp.cosine)
        terms = flow_matching_loss(model, None, sample_batch(hp.batch_size, g), cfg, generator=g)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        decay = min(hp.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        acc += _scalar(terms["loss"])
        if (step + 1) % log_every == 0 or step + 1 == hp.steps:
            n = (step % log_every) + 1
            log.append({"step": step + 1, "loss": acc / n, "time": time.perf_counter() - t0})
            acc = 0.0
    return ema, log


def distill(method: str, teacher: torch.nn.Module, sample_batch: Callable, hp: DistillHP, seed: int,
            log_every: int = 50, callback: Callable | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Student initialised from the teacher's weights, `hp.steps` AdamW updates of the method's objective.

    `callback(step, student)` (optional) runs after every `log_every` updates; its dict return is logged."""
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    params = list(student.parameters())
    extra = {}
    if method in CONSISTENCY_METHODS and hp.target_ema > 0:
        extra["target_model"] = copy.deepcopy(student).eval().requires_grad_(False)
    if method == "scm" and hp.scm_adaptive:
        # w_phi(t) trains with the student (same optimiser); the student's grad clip does not include it
        extra["weight_net"] = AdaptiveWeight()
        params += list(extra["weight_net"].parameters())
    target = extra.get("target_model")
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(seed)
    log, acc, t0, bad = [], {}, time.perf_counter(), 0
    for step in range(hp.steps):
        for group in opt.param_groups:
            group["lr"] = hp.lr * _lr_factor(step, hp.steps, hp.warmup, cosine=False)
        fn, cfg = objective(method, hp, step)
        terms = fn(student, teacher, sample_batch(hp.batch_size, g), cfg, generator=g, **extra)
        loss = terms["loss"]
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            bad += 1
            continue
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(student.parameters(), hp.grad_clip)
        if torch.isfinite(gn):
            opt.step()
            if target is not None:
                with torch.no_grad():
                    for pt, ps in zip(target.parameters(), student.parameters()):
                        pt.lerp_(ps, 1 - hp.target_ema)
        else:
            bad += 1
        for k, v in terms.items():
            if k != "loss_bins" and torch.is_tensor(v) and v.numel() == 1:
                acc[k] = acc.get(k, 0.0) + _scalar(v)
        acc["grad_norm"] = acc.get("grad_norm", 0.0) + _scalar(gn)
        if (step + 1) % log_every == 0 or step + 1 == hp.steps:
            n = (step % log_every) + 1
            entry = {"step": step + 1, **{k: v / n for k, v in acc.items()}, "time": time.perf_counter() - t0,
                     "skipped": bad}
            if callback is not None:
                student.eval()
                entry.update(callback(step + 1, student) or {})
                student.train()
            log.append(entry)
            acc = {}
    return student.eval().requires_grad_(False), log


@torch.no_grad()
def sample(method: str, model: torch.nn.Module, noise, cond: torch.Tensor, steps: int, cfg: float,
           batch: int | None = None):
    """Generate from `noise` (dense tensor; sparse handled by the caller): teacher = Euler + CFG, students = Euler,
    no CFG. `batch` splits dense generation into chunks (memory)."""
    model.eval()
    if batch is None or noise.shape[0] <= batch:
        if method == "teacher":
            return FlowEulerSampler().sample(model, noise, cond, steps=steps, cfg_strength=cfg)
        return student_sample(model, noise, cond, steps=steps, mode="euler")
    outs = [sample(method, model, noise[i:i + batch], cond[i:i + batch], steps, cfg) for i in
            range(0, noise.shape[0], batch)]
    return torch.cat(outs)


def nfe(method: str, steps: int, cfg: float) -> int:
    """Network evaluations of one sampling run (mdt.flow.count_nfe; students sample without CFG)."""
    return count_nfe(steps, cfg if method == "teacher" else 0.0)


# TRELLIS's pipeline.json sampler, per stage (SS flow, then SLat flow): 25 steps, rescale_t 3, CFG 5 only for t in
# [0.5, 1] (19 of the 25 steps); the released MDT-dist snapshots sample students with CFG at every step.
TRELLIS_SAMPLER = {"steps": 25, "cfg_strength": 5.0, "cfg_interval": (0.5, 1.0), "rescale_t": 3.0}


def trellis_nfe(student_steps=(1, 2, 4)) -> dict:
    """Network evaluations per generated asset under TRELLIS's real sampler settings (two stages, one sample):
    the guidance-interval teacher vs students sampled without CFG (1 per step) and with CFG (2 per step)."""
    teacher = count_nfe(**TRELLIS_SAMPLER)
    rows = {"teacher_25": {"sampler": "25 steps, rescale_t 3, CFG 5 for t in [0.5, 1]", "nfe_per_stage": teacher,
                           "nfe_two_stages": 2 * teacher, "ratio_vs_teacher": 1.0}}
    for steps in student_steps:
        for guided in (False, True):
            n = count_nfe(steps, 1.0 if guided else 0.0)
            rows[f"student_{steps}" + ("_cfg" if guided else "")] = {
                "sampler": f"{steps} Euler step(s), " + ("CFG at every step" if guided else "no CFG"),
                "nfe_per_stage": n, "nfe_two_stages": 2 * n, "ratio_vs_teacher": teacher / n}
    return rows

"""Methods of the benchmark: the objective and its config per method, teacher training, distillation, sampling.

Methods: `teacher` (no distillation; the teacher sampled with CFG at few steps), `cm`, `pcm`, `scm` (consistency
baselines), `vm` (MDT-dist Velocity Matching only, released settings), `mdt_release` (VM + VD as the released
trainer computes them: d_norm, CFG'd teacher in both targets, VD re-noised with VM's eps, constant VD weight) and
`mdt_paper` (VM + VD as the paper's Eqs. 10-15 write them: no d_norm, unguided teacher, an independent z'' for VD's
re-noising, the (1 - t) VD weighting of the chain rule, paper lambda = 1, i.e. lambda_vd = 0.5 here;
docs/method.md). Teachers and students train through the distillation job's own `mdt.training.Trainer` (the
same step, AdamW, adaptive gradient clipping, EMA and NaN guard). Every distillation method starts from the
teacher's weights and gets the same budget in updates and batch size; with common random numbers: the data
stream and the objective's noise generator of a seed are the same for every method. Students are sampled with the
Euler rule on the uniform grid (`mdt.distill.student_sample` mode "euler": deterministic, so that the paired
metrics compare each noise with its own reference) and, at k > 1 steps, also with re-noising (mode "consistency":
the x0 estimate re-noised with fresh noise; the uniform Euler rule takes a mean-velocity student off the data
distribution, docs/reproduction.md); at one step both rules are x1 - S(x1, 1). The guided-target students sample
without CFG (the teacher's guidance is distilled into them), `mdt_paper` (distilled from the unguided teacher) with
the problem's CFG; the teacher with `FlowEulerSampler` and CFG.

Image-only variants (`<method>_imageonly`, e.g. `mdt_release_imageonly`): the same objective and budget, but the
x0 of every training pair is drawn from a fixed pool of the teacher's own many-step samples (its sampler settings,
K per condition) instead of data (mdt.experiments.jobs.teacher_pool): the data-free distillation of
`jobs/synthesize.py`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from mdt.distill import (CMConfig, FlowMatchingConfig, MDTConfig, PCMConfig, SCMConfig, student_sample,
                         tangent_warmup_factor)
from mdt.flow import FlowEulerSampler, count_nfe
from mdt.training import DistillConfig, Trainer

METHODS = ("teacher", "cm", "pcm", "scm", "vm", "mdt_release", "mdt_paper")
STUDENT_METHODS = METHODS[1:]
CONSISTENCY_METHODS = ("cm", "pcm", "scm")
MDT_METHODS = ("vm", "mdt_release", "mdt_paper")
IMAGE_ONLY = "_imageonly"     # suffix of a data-free variant: x0 from the teacher's own samples
IMAGE_ONLY_FIXED = ("mdt_release",)             # image-only in every run; plus the best baseline on validation
RENOISE_OFFSET = 3571         # the re-noising sampler's generator: the evaluation noise seed + this
# The paper's VD loss gradient on the fake sample is lambda (v_S' - v_tgt'); this code's is 2 lambda_vd (v_S' - v_tgt')
# (the stop-gradient square, mdt.distill.mdt_dist), so the paper's lambda = 1 is lambda_vd = 0.5.
PAPER_LAMBDA_VD = 0.5
NOISE_STREAM_OFFSET = 7919    # the objective's generator of a run: its data seed + this (common to all methods)


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
    target_ema: float = 0.0     # CM/PCM/sCM: > 0 takes the target from the Trainer's EMA of the student at this rate
    vm_mode: str = "discrete"
    d_norm: bool = True         # vm, mdt_release (mdt_paper: always off)
    d_norm_c: float = 0.1
    w_vm: float | None = None   # None: = cfg (vm, mdt_release; mdt_paper: unguided, 0)
    w_vd: float | None = None   # None: = cfg
    lambda_vm: float = 1.0
    lambda_vd: float = 1.0      # mdt_release (mdt_paper: PAPER_LAMBDA_VD)
    jvp: str = "func"


def base_method(method: str) -> str:
    """The data-driven method of an image-only variant (the method itself otherwise)."""
    return method[:-len(IMAGE_ONLY)] if method.endswith(IMAGE_ONLY) else method


def image_only(method: str) -> str:
    return method + IMAGE_ONLY


def objective(method: str, hp: DistillHP, step: int = 0) -> tuple[str, Any]:
    """(Trainer objective name, its config) of a method (an image-only variant: its base method's)."""
    method = base_method(method)
    sched = dict(t_schedule=hp.t_schedule, t_mean=hp.t_mean, t_std=hp.t_std)
    if method == "cm":
        return "cm", CMConfig(delta=hp.delta, phases=1, w=hp.cfg, **sched)
    if method == "pcm":
        return "pcm", PCMConfig(delta=hp.delta, phases=hp.pcm_phases, w=hp.cfg, **sched)
    if method == "scm":
        return "scm", SCMConfig(w=hp.cfg, tangent_norm_c=hp.scm_tangent_c,
                                tangent_warmup=tangent_warmup_factor(step, hp.scm_warmup), jvp=hp.jvp, **sched)
    if method in ("vm", "mdt_release"):
        cfg = MDTConfig(mode=hp.vm_mode, delta=hp.delta, w_vm=hp.cfg if hp.w_vm is None else hp.w_vm,
                        w_vd=hp.cfg if hp.w_vd is None else hp.w_vd, lambda_vm=hp.lambda_vm,
                        lambda_vd=0.0 if method == "vm" else hp.lambda_vd, d_norm=hp.d_norm, d_norm_c=hp.d_norm_c,
                        vd_weighting="released", vd_noise="shared", jvp=hp.jvp, **sched)
        return ("vm" if method == "vm" else "mdt"), cfg
    if method == "mdt_paper":
        return "mdt", MDTConfig(mode=hp.vm_mode, delta=hp.delta, w_vm=0.0, w_vd=0.0, lambda_vm=1.0,
                                lambda_vd=PAPER_LAMBDA_VD, d_norm=False, vd_weighting="paper", vd_noise="fresh",
                                jvp=hp.jvp, **sched)
    raise ValueError(f"no objective for method {method!r}")


def sample_cfg(method: str, cfg: float) -> float:
    """CFG strength at sampling: the teacher and `mdt_paper` (distilled from the unguided teacher) use the problem's,
    the students of guided targets none."""
    return cfg if base_method(method) in ("teacher", "mdt_paper") else 0.0


def trainer_config(name: str, ocfg: Any, lr: float, warmup: int, grad_clip: float, ema: float,
                   target: str = "student") -> DistillConfig:
    """The trainer's config with the benchmark's optimiser settings (AdamW betas 0.9/0.99, no weight decay,
    linear warm-up, TRELLIS's adaptive clipper at `grad_clip`, one micro-batch, NaN guard on)."""
    cfg = DistillConfig()
    section = {"flow_matching": "flow_matching", "mdt": "mdt", "vm": "mdt"}.get(name, name)
    objective_cfg = replace(cfg.objective, name=name, target=target, **{section: ocfg})
    return replace(cfg, objective=objective_cfg,
                   optim=replace(cfg.optim, lr=lr, betas=[0.9, 0.99], weight_decay=0.0, warmup_steps=warmup),
                   clip=replace(cfg.clip, max_norm=grad_clip), ema=replace(cfg.ema, rate=ema, enabled=True),
                   data=replace(cfg.data, batch_split=1))


def _run(trainer: Trainer, sample_batch: Callable, steps: int, batch_size: int, seed: int, log_every: int,
         before_step: Callable[[int], None] | None = None) -> tuple[list[dict], bool]:
    """`steps` Trainer steps on batches of `sample_batch(batch_size, data_g)`; the objective draws from its own
    generator (common random numbers: both generators are fixed by `seed` alone). Returns (log, diverged): a run
    whose NaN guard gives up (too many consecutive non-finite steps) is stopped and reported as diverged."""
    data_g = torch.Generator().manual_seed(seed)
    noise_g = torch.Generator().manual_seed(seed + NOISE_STREAM_OFFSET)
    log, acc, t0, n = [], {}, time.perf_counter(), 0
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        try:
            res = trainer.step(sample_batch(batch_size, data_g), noise_g)
        except FloatingPointError:
            log.append({"step": step + 1, "diverged": True, "time": time.perf_counter() - t0,
                        "skipped": trainer.skipped_total})
            return log, True
        for k, v in {**res.terms, "grad_norm": res.grad_norm}.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        n += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, **{k: v / n for k, v in acc.items()}, "time": time.perf_counter() - t0,
                        "skipped": trainer.skipped_total})
            acc, n = {}, 0
    return log, False


def ema_copy(trainer: Trainer) -> torch.nn.Module:
    model = copy.deepcopy(trainer.student)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainer.ema.shadow:
                p.copy_(trainer.ema.shadow[name])
    return model.eval().requires_grad_(False)


def train_teacher(model: torch.nn.Module, sample_batch: Callable, hp: TeacherHP, seed: int,
                  log_every: int = 100) -> tuple[torch.nn.Module, list[dict]]:
    """TRELLIS flow matching (mdt.distill.flow_matching_loss) through the Trainer; returns its EMA weights."""
    fm = FlowMatchingConfig(p_uncond=hp.p_uncond, t_schedule=hp.t_schedule, t_mean=hp.t_mean, t_std=hp.t_std)
    trainer = Trainer(model, None, trainer_config("flow_matching", fm, hp.lr, hp.warmup, hp.grad_clip, hp.ema))
    log, diverged = _run(trainer, sample_batch, hp.steps, hp.batch_size, seed, log_every)
    if diverged:
        raise FloatingPointError("teacher training diverged")
    return ema_copy(trainer), log


def distill(method: str, teacher: torch.nn.Module, sample_batch: Callable, hp: DistillHP, seed: int,
            log_every: int = 50, target_teacher: torch.nn.Module | None = None
            ) -> tuple[torch.nn.Module, list[dict]]:
    """Student initialised from the teacher's weights, `hp.steps` Trainer updates of the method's objective.

    `target_teacher` (default: `teacher`) is the network the objectives query; the exact teacher of the Gaussian-
    mixture problem plays it there while the student starts from the flow-matching network."""
    method = base_method(method)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    name, ocfg = objective(method, hp)
    use_ema_target = method in CONSISTENCY_METHODS and hp.target_ema > 0
    cfg = trainer_config(name, ocfg, hp.lr, hp.warmup, hp.grad_clip, hp.target_ema if use_ema_target else 0.999,
                         target="ema" if use_ema_target else "student")
    trainer = Trainer(student, target_teacher if target_teacher is not None else teacher, cfg)

    def before_step(step: int) -> None:
        if method == "scm":                  # sCM's tangent warm-up: r ramps 0 -> 1 over hp.scm_warmup updates
            trainer.ocfg.tangent_warmup = tangent_warmup_factor(step, hp.scm_warmup)

    log, _ = _run(trainer, sample_batch, hp.steps, hp.batch_size, seed, log_every, before_step)
    return student.eval().requires_grad_(False), log


@torch.no_grad()
def sample(method: str, model: torch.nn.Module, noise, cond: torch.Tensor, steps: int, cfg: float,
           batch: int | None = None, mode: str = "euler", generator: torch.Generator | None = None):
    """Generate from `noise` (dense tensor or SparseTensor): teacher = Euler + CFG, students = `student_sample` in
    `mode` ("euler" or re-noising "consistency" with `generator`) with `sample_cfg`. `batch` splits dense generation
    into chunks (memory)."""
    model.eval()
    if batch is None or noise.shape[0] <= batch:
        if method == "teacher":
            return FlowEulerSampler().sample(model, noise, cond, steps=steps, cfg_strength=cfg)
        return student_sample(model, noise, cond, steps=steps, mode=mode, cfg_strength=sample_cfg(method, cfg),
                              generator=generator)
    outs = [sample(method, model, noise[i:i + batch], cond[i:i + batch], steps, cfg, mode=mode, generator=generator)
            for i in range(0, noise.shape[0], batch)]
    return torch.cat(outs)


def nfe(method: str, steps: int, cfg: float) -> int:
    """Network evaluations of one sampling run (mdt.flow.count_nfe at the method's `sample_cfg`)."""
    return count_nfe(steps, sample_cfg(method, cfg))


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

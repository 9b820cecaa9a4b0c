"""Benchmark of one distillation step (plain PyTorch, one process), measured side by side in one call:

* the parts: conditioner, teacher forward, student forward, student forward+backward, optimizer update (clip,
  AdamW, EMA), with the number of teacher and student calls one step makes;
* the whole `Trainer.step` of the configured objective, as a ratio to the sum of its parts (goal <= 1.1: the
  step adds nothing the parts do not explain);
* a naive step of the same maths (the teacher unfrozen and called with autograd recording, sequential guidance,
  attention on the unfused math kernel), as a throughput ratio (goal >= 1.5).

Used by `python jobs/distill.py --preset <p> --bench` (which adds the 1 vs 2 Ray Train worker throughput)."""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from contextlib import contextmanager

import torch

from .build import build_conditioner, build_student, build_teacher
from .machinery import autocast, resolve_precision
from .step import Trainer
from mdt.sparse import SparseTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

STEP_VS_PARTS_GOAL_MAX = 1.1
SPEEDUP_VS_NAIVE_GOAL_MIN = 1.5


def _time(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@contextmanager
def count_calls(module: torch.nn.Module):
    counter = {"calls": 0, "grad": 0}

    def hook(_m, _args):
        counter["calls"] += 1
        counter["grad"] += int(torch.is_grad_enabled())

    h = module.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        h.remove()


def synthetic_batch(student: torch.nn.Module, cfg, cond_tokens: int, cond_channels: int, batch: int,
                    voxels: int = 2048, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    a = student.trellis_args
    if cfg.stage == "ss":
        r = a["resolution"]
        x0 = torch.randn(batch, a["in_channels"], r, r, r, generator=g)
    else:

        res = a["resolution"]
        coords = []
        for b in range(batch):
            idx = torch.randperm(res ** 3, generator=g)[:voxels].sort().values
            coords.append(torch.stack([torch.full_like(idx, b), idx // res ** 2, (idx // res) % res, idx % res], 1))
        c = torch.cat(coords).int()
        x0 = SparseTensor(torch.randn(len(c), a["in_channels"], generator=g), c, batch_size=batch)
    return {"x0": x0, "cond": torch.randn(batch, cond_tokens, cond_channels, generator=g)}


def bench_step(cfg, use_gpu: bool, batch: int | None = None, repeat: int = 5, threads: int | None = None) -> dict:
    """One step of trainer config `cfg`, on the GPU where `use_gpu` and one is visible, else on the CPU."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    amp = resolve_precision(cfg.train.precision, dev)
    teacher = build_teacher(cfg.model, dev)
    student = build_student(cfg.model, dev, teacher)
    cond_model = build_conditioner(cfg.condition, dev)
    b = batch or cfg.data.batch_size
    img = torch.rand(b, 3, cfg.condition.image_size, cfg.condition.image_size)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    out: dict = {"objective": cfg.objective.name, "stage": cfg.stage, "batch": b, "device": str(dev),
                 "threads": torch.get_num_threads(), "model": type(student).__name__,
                 "params_M": sum(p.numel() for p in student.parameters()) / 1e6}
    with torch.no_grad():
        cond = cond_model(img.to(dev))
    out["cond_tokens"] = list(cond.shape[1:])
    out["conditioner_ms"] = 1000 * _time(lambda: (cond_model(img.to(dev)), sync()), repeat)
    data = synthetic_batch(student, cfg, cond.shape[1], cond.shape[2], b)
    data = {k: v.to(dev) for k, v in data.items()}
    x, cnd = data["x0"], data["cond"]
    t = torch.full((b,), 700.0, device=dev)

    def fwd(m):
        with torch.no_grad(), autocast(dev, amp):
            m(x, t, cnd)
        sync()

    def fwd_bwd():
        with autocast(dev, amp):
            y = student(x, t, cnd)
        (y.feats if hasattr(y, "feats") else y).float().pow(2).mean().backward()
        student.zero_grad(set_to_none=True)
        sync()

    if teacher is not None:
        out["teacher_forward_ms"] = 1000 * _time(lambda: fwd(teacher), repeat)
    out["student_forward_ms"] = 1000 * _time(lambda: fwd(student), repeat)
    out["student_forward_backward_ms"] = 1000 * _time(fwd_bwd, repeat)
    trainer = Trainer(student, teacher, cfg, device=dev, autocast_dtype=amp)
    gen = torch.Generator().manual_seed(0)
    trainer.step(data, gen)
    with count_calls(student) as cs:
        if teacher is not None:
            with count_calls(teacher) as ct:
                trainer.step(data, gen)
        else:
            ct = {"calls": 0, "grad": 0}
            trainer.step(data, gen)
    out["teacher_calls_per_step"] = ct["calls"]
    out["student_calls_per_step"] = cs["calls"]
    out["student_calls_with_grad"] = cs["grad"]
    out["step_ms"] = 1000 * _time(lambda: (trainer.step(data, gen), sync()), repeat)
    out["samples_per_s"] = b / (out["step_ms"] / 1000)
    out["optimizer_ms"] = 1000 * _time(lambda: (_update(trainer, x, t, cnd, amp, dev), sync()), repeat) \
        - out["student_forward_backward_ms"]
    out["optimizer_ms"] = max(0.0, out["optimizer_ms"])
    est = (ct["calls"] * out.get("teacher_forward_ms", 0.0) + (cs["calls"] - cs["grad"]) * out["student_forward_ms"]
           + cs["grad"] * out["student_forward_backward_ms"] + out["optimizer_ms"])
    out["step_ms_estimated_from_parts"] = est
    out["step_vs_sum_of_parts"] = out["step_ms"] / est
    out["step_vs_sum_of_parts_goal_max"] = STEP_VS_PARTS_GOAL_MAX

    naive, knobs = naive_trainer(cfg, student, teacher, dev, amp)
    out["naive"] = knobs
    out["naive_step_ms"] = 1000 * _time(lambda: (naive.step(data, gen), sync()), repeat)
    out["naive_samples_per_s"] = b / (out["naive_step_ms"] / 1000)
    out["speedup_vs_naive"] = out["naive_step_ms"] / out["step_ms"]
    out["speedup_vs_naive_goal_min"] = SPEEDUP_VS_NAIVE_GOAL_MIN
    return out


def _update(trainer: Trainer, x, t, cnd, amp, dev) -> None:
    """Student forward + backward, then what a step does after it: clip, AdamW, EMA (timed minus fwd+bwd)."""
    with autocast(dev, amp):
        y = trainer.student(x, t, cnd)
    (y.feats if hasattr(y, "feats") else y).float().pow(2).mean().backward()
    params = [p for p in trainer.student.parameters() if p.requires_grad]
    trainer.clipper(params)
    trainer.optimizer.step()
    if trainer.ema is not None:
        trainer.ema.update(trainer.student)
    trainer.optimizer.zero_grad(set_to_none=True)


class _RecordingTeacher(torch.nn.Module):
    """A teacher a naive trainer would write: parameters left trainable and autograd recording its forward
    even where the objective asks for no_grad."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, *args, **kwargs):
        with torch.enable_grad():
            return self.teacher(*args, **kwargs)


class _Unfused(torch.nn.Module):
    """Runs a network with scaled-dot-product attention on the unfused math kernel."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]):
            return self.model(*args, **kwargs)


def naive_trainer(cfg, student, teacher, dev, amp) -> tuple[Trainer, list[str]]:
    """A Trainer of the same objective and hyper-parameters whose calls are made the naive way."""
    knobs = ["attention on the unfused math kernel"]
    ncfg = cfg
    section = {"vm": "mdt"}.get(cfg.objective.name, cfg.objective.name)
    ocfg = getattr(cfg.objective, section)
    if getattr(ocfg, "cfg_batched", False):  # objectives with guidance: one [x; x] forward -> two forwards
        ocfg = dataclasses.replace(ocfg, cfg_batched=False)
        ncfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, **{section: ocfg}))
        knobs.append("sequential guidance (conditional and unconditional forwards one after the other)")
    naive = Trainer(copy.deepcopy(student), None, ncfg, device=dev, autocast_dtype=amp)
    naive.student_calls.model = _Unfused(naive.student)
    naive.student_calls.__dict__["module"] = _Unfused(naive.student)
    if teacher is not None:
        t = copy.deepcopy(teacher).requires_grad_(True)
        naive.teacher = t
        naive.teacher_calls = _Unfused(_RecordingTeacher(t))
        knobs.append("teacher trainable, its forwards recorded by autograd (no no_grad / inference_mode)")
    return naive, knobs


def format_step(r: dict) -> str:
    lines = [f"one {r['objective']} step, {r['stage']} stage, batch {r['batch']} on {r['device']} "
             f"({r['threads']} threads), {r['model']} {r['params_M']:.2f} M params, cond {r['cond_tokens']}",
             f"  conditioner (DINOv2)            {r['conditioner_ms']:9.1f} ms"]
    if "teacher_forward_ms" in r:
        lines.append(f"  teacher forward (no grad)       {r['teacher_forward_ms']:9.1f} ms  x {r['teacher_calls_per_step']} per step")
    lines += [f"  student forward (no grad)       {r['student_forward_ms']:9.1f} ms  x "
              f"{r['student_calls_per_step'] - r['student_calls_with_grad']} per step",
              f"  student forward + backward      {r['student_forward_backward_ms']:9.1f} ms  x "
              f"{r['student_calls_with_grad']} per step",
              f"  optimizer (clip, AdamW, EMA)    {r['optimizer_ms']:9.1f} ms",
              f"  total step (Trainer.step)       {r['step_ms']:9.1f} ms  (sum of parts {r['step_ms_estimated_from_parts']:.1f} ms,"
              f" x{r['step_vs_sum_of_parts']:.2f}; goal <= {r['step_vs_sum_of_parts_goal_max']:g})"
              f"  -> {r['samples_per_s']:.1f} samples/s",
              f"  naive step, same maths          {r['naive_step_ms']:9.1f} ms  -> this step is x{r['speedup_vs_naive']:.2f} "
              f"faster (goal >= {r['speedup_vs_naive_goal_min']:g}); naive = {'; '.join(r['naive'])}"]
    return "\n".join(lines)

"""Benchmark of one distillation step (plain PyTorch, one process): conditioner, teacher forward, student forward,
student forward+backward, and the whole `Trainer.step` of the configured objective, with the number of teacher
and student calls one step makes. Used by `python jobs/distill.py --preset <p> --bench` (which adds the 1 vs 2
Ray Train worker throughput comparison)."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from .build import build_conditioner, build_student, build_teacher
from .step import Trainer


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
        from mdt.sparse import SparseTensor

        res = a["resolution"]
        coords = []
        for b in range(batch):
            idx = torch.randperm(res ** 3, generator=g)[:voxels].sort().values
            coords.append(torch.stack([torch.full_like(idx, b), idx // res ** 2, (idx // res) % res, idx % res], 1))
        c = torch.cat(coords).int()
        x0 = SparseTensor(torch.randn(len(c), a["in_channels"], generator=g), c, batch_size=batch)
    return {"x0": x0, "cond": torch.randn(batch, cond_tokens, cond_channels, generator=g)}


def bench_step(cfg, batch: int | None = None, repeat: int = 5, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    from .machinery import autocast, resolve_precision

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
    est = (ct["calls"] * out.get("teacher_forward_ms", 0.0) + (cs["calls"] - cs["grad"]) * out["student_forward_ms"]
           + cs["grad"] * out["student_forward_backward_ms"])
    out["step_ms_estimated_from_parts"] = est
    return out


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
              f"  total step (Trainer.step)       {r['step_ms']:9.1f} ms  (sum of parts {r['step_ms_estimated_from_parts']:.1f} ms)"
              f"  -> {r['samples_per_s']:.1f} samples/s"]
    return "\n".join(lines)

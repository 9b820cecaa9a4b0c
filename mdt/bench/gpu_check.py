"""What a CPU cannot settle, in one command on one CUDA GPU (`make gpu-check`), bounded to about 8 minutes:

    python -m mdt.bench.gpu_check [--out outputs/gpu-check] [--budget-s 480] [--size full|tiny]

1. backend parity: sparse submanifold convolution (spconv vs the portable torch gather-scatter) and varlen
   attention (flash-attn vs torch SDPA), each on CUDA against the float32 CPU reference, in fp32 / fp16 / bf16;
2. precision: relative error of the SS and SLat flows' velocities, and of the MDT-dist VM targets (teacher CFG,
   finite-difference derivative, d_norm), in the published fp16 torso and under bf16 autocast, vs float32;
3. latency: the image -> 3-D chain (`mdt.bench.generate`, random weights in the released layout) warm, at 25+25
   steps (TRELLIS's sampler) vs 1+1 and 2+2 (the students), fp16 (paper, A800: 6.1 s vs 0.68 s / 0.94 s);
4. training: one `trellis-ss` and one `trellis-slat` MDT-dist step at the preset's per-GPU batch (as shipped:
   bf16 autocast, gradient checkpointing, fp16 teacher), its wall time and peak GPU memory.

Writes `<out>/gpu_check.json` and `<out>/gpu_check.md`; exit 0 when every check ran and passed its tolerance,
1 otherwise. Without CUDA it says so and runs the same code on tiny models on the CPU (the self-test).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from mdt.bench import generate as bench_generate
from mdt.bench.models import shell_voxels
from mdt.distill.mdt_dist import MDTConfig, vm_target
from mdt.models import from_pretrained
from mdt.models.zoo import TRELLIS_STEMS, save_tiny_dinov2, write_trellis_repo
from mdt.sparse import SparseConv3d, SparseTensor, set_backends
from mdt.sparse.attention import varlen_attention
from mdt.sparse.backends import flash_attn_available, spconv_available
from mdt.training.bench import synthetic_batch
from mdt.training.build import build_student, build_teacher
from mdt.training.config import load_trainer_config
from mdt.training.machinery import resolve_precision
from mdt.training.step import Trainer
import resource

# Relative L2 error allowed against the float32 reference: fp16/bf16 carry 11/8 mantissa bits (2^-11 ≈ 5e-4,
# 2^-8 ≈ 4e-3 per rounding); a deep network accumulates several roundings, so the tolerances are ~10x those.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 4e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULL_SLAT_VOXELS = 21_000       # a typical TRELLIS structure (~8% of 64³): the SLat stage's cost follows it


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ 1. backends

def backend_parity(device: str, size: str) -> dict:
    voxels, channels, heads, tokens = (FULL_SLAT_VOXELS, 128, 16, 4544) if size == "full" else (800, 16, 2, 300)
    g = torch.Generator().manual_seed(0)
    coords = shell_voxels(voxels)
    x = SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords)
    conv = SparseConv3d(channels, channels, 3)
    ref_conv = conv(x).feats                                          # CPU float32 reference
    q, k, v = (torch.randn(2 * tokens, heads, 64, generator=g) for _ in range(3))
    cu = torch.tensor([0, tokens, 2 * tokens])
    ref_attn = varlen_attention(q, k, v, cu, cu)
    conv_backends = ["torch"] + (["spconv"] if device == "cuda" and spconv_available() else [])
    attn_backends = ["sdpa"] + (["flash_attn"] if device == "cuda" and flash_attn_available() else [])
    rows = []
    try:
        for backend in conv_backends:
            set_backends(conv=backend)
            for prec in ("fp32", "fp16", "bf16"):
                c = SparseConv3d(channels, channels, 3)
                c.load_state_dict(conv.state_dict())
                c = c.to(device, DTYPES[prec])
                xd = SparseTensor(x.feats.to(device, DTYPES[prec]), x.coords.to(device))
                err = rel_error(c(xd).feats, ref_conv)
                rows.append({"op": "sparse conv 3x3x3", "backend": backend, "precision": prec, "rel_error": err,
                             "tolerance": TOLERANCE[prec], "ok": err <= TOLERANCE[prec]})
        for backend in attn_backends:
            set_backends(attn=backend)
            for prec in ("fp32", "fp16", "bf16"):
                if backend == "flash_attn" and prec == "fp32":
                    continue                                           # flash-attn has no fp32 kernel
                qd, kd, vd = (t.to(device, DTYPES[prec]) for t in (q, k, v))
                err = rel_error(varlen_attention(qd, kd, vd, cu.to(device), cu.to(device)), ref_attn)
                rows.append({"op": "varlen attention", "backend": backend, "precision": prec, "rel_error": err,
                             "tolerance": TOLERANCE[prec], "ok": err <= TOLERANCE[prec]})
    finally:
        set_backends(conv="torch", attn="sdpa")
    missing = [] if device != "cuda" else (
        (["spconv"] if not spconv_available() else []) + (["flash_attn"] if not flash_attn_available() else []))
    return {"rows": rows, "missing_backends": missing,
            "ok": all(r["ok"] for r in rows) and not missing,
            "shapes": {"voxels": int(coords.shape[0]), "conv_channels": channels, "attention_tokens": tokens,
                       "heads": heads}}


# ------------------------------------------------------------------------------------------------ 2. precision

def _flow_inputs(model, size: str, device: str, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = model.trellis_args
    cond = torch.randn(batch, 1374 if size == "full" else 16, a["cond_channels"], generator=g)
    if "io_block_channels" not in a:
        r = a["resolution"]
        x = torch.randn(batch, a["in_channels"], r, r, r, generator=g)
    else:
        one = shell_voxels(FULL_SLAT_VOXELS if size == "full" else 600, a["resolution"])
        coords = torch.cat([torch.cat([torch.full_like(one[:, :1], b), one[:, 1:]], 1) for b in range(batch)])
        x = SparseTensor(torch.randn(coords.shape[0], a["in_channels"], generator=g), coords, batch_size=batch)
    return x.to(device) if not hasattr(x, "coords") else SparseTensor(x.feats.to(device), x.coords.to(device),
                                                                     batch_size=batch), cond.to(device)


def _variant(model, prec: str, device: str):
    """(model, autocast context) of a precision: fp32; fp16 = the published fp16 torso; bf16 = autocast."""
    m = copy.deepcopy(model).to(device)
    m.float()
    if hasattr(m, "convert_to_fp32"):
        m.convert_to_fp32()
    if prec == "fp16":
        m.convert_to_fp16()
        return m, contextlib.nullcontext()
    if prec == "bf16":
        return m, torch.autocast(device_type=device, dtype=torch.bfloat16)
    return m, contextlib.nullcontext()


def precision_errors(repo: Path, device: str, size: str) -> dict:
    rows = []
    for slot in ("ss_flow", "slat_flow"):
        model = from_pretrained(repo / "ckpts" / TRELLIS_STEMS[slot], device="cpu", keep_fp16=False).eval()
        x, cond = _flow_inputs(model, size, device)
        t = torch.tensor([0.3, 0.8], device=device)
        cfg = MDTConfig(mode="discrete", w_vm=40.0)
        eps = x.replace(torch.randn_like(x.feats)) if hasattr(x, "feats") else torch.randn_like(x)
        ref_model, _ = _variant(model, "fp32", device)
        with torch.no_grad():
            ref_v = ref_model(x, t * 1000, cond)
            ref_v = ref_v.feats if hasattr(ref_v, "feats") else ref_v
            ref_tgt = vm_target(ref_model, ref_model, x, eps, t, cond, None, cfg.w_vm, cfg).target
        del ref_model
        for prec in ("fp16", "bf16"):
            m, ctx = _variant(model, prec, device)
            with torch.no_grad(), ctx:
                v = m(x, t * 1000, cond)
                v = v.feats if hasattr(v, "feats") else v
                tgt = vm_target(m, m, x, eps, t, cond, None, cfg.w_vm, cfg).target
            for what, y, ref in (("velocity", v, ref_v), ("MDT-dist VM target (w 40)", tgt, ref_tgt)):
                err = rel_error(y, ref)
                tol = TOLERANCE[prec] * (10 if what.startswith("MDT") else 1)   # CFG 41x amplifies rounding
                rows.append({"model": slot, "quantity": what, "precision": prec, "rel_error": err,
                             "tolerance": tol, "ok": err <= tol})
            del m
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


# ------------------------------------------------------------------------------------------------ 3. latency

def chain_latency(repo: Path, device: str, size: str, out: Path) -> dict:
    if size == "full":
        argv = ["--repo", str(repo), "--device", device, "--steps", "1", "2", "25", "--repeats", "3", "--full-size"]
    else:   # the self-test: the same code at 1+1 and 2+2, Gaussians only (a CPU's mesh decode takes minutes)
        argv = ["--repo", str(repo), "--device", device, "--steps", "1", "2", "--repeats", "1",
                "--formats", "gaussians"]
    if device == "cuda":
        argv += ["--precision", "fp16"]
    rc = bench_generate.main(argv)
    res = json.loads((repo.parent / "results.json").read_text())
    rows = {int(k): v for k, v in res["rows"].items()}
    total = {n: rows[n]["seconds"]["total"] for n in rows}
    return {"ok": rc == 0, "device": res["device"], "precision": res["precision"],
            "seconds_total": total, "seconds_sampling": {n: rows[n]["seconds"]["sampling"] for n in rows},
            "rows": rows, "speedup_1_vs_25": total[25] / max(total[1], 1e-9) if 25 in total else None,
            "speedup_2_vs_25": total[25] / max(total[2], 1e-9) if 25 in total else None,
            "paper_a800_s": {"25+25": 6.1, "1+1": 0.68, "2+2": 0.94}}


# ------------------------------------------------------------------------------------------------ 4. training

def training_step(repo: Path, stage: str, device: str, size: str) -> dict:
    cfg = load_trainer_config(f"trellis-{stage}", [
        ("data.uri", "-"), ("model.teacher", str(repo / "ckpts" / TRELLIS_STEMS[f"{stage}_flow"])),
        ("condition.model", str(repo / "dinov2"))]).validate()
    dev = torch.device(device)
    amp = resolve_precision(cfg.train.precision, dev)
    teacher = build_teacher(cfg.model, dev)
    student = build_student(cfg.model, dev, teacher)
    a = student.trellis_args
    batch = synthetic_batch(student, cfg, 1374 if size == "full" else 16, a["cond_channels"], cfg.data.batch_size,
                            voxels=FULL_SLAT_VOXELS if size == "full" else 600)
    trainer = Trainer(student, teacher, cfg, device=dev, autocast_dtype=amp)
    gen = torch.Generator().manual_seed(0)
    trainer.step(batch, gen)                                          # warm-up (allocator, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    res = trainer.step(batch, gen)
    _sync(device)
    wall = time.perf_counter() - start
    out = {"stage": stage, "per_gpu_batch": cfg.data.batch_size, "batch_split": cfg.data.batch_split,
           "gradient_checkpointing": cfg.model.gradient_checkpointing, "autocast": str(amp),
           "teacher_dtype": str(teacher.dtype), "parameters": sum(p.numel() for p in student.parameters()),
           "step_s": wall, "loss": float(getattr(res, "loss", float("nan")))}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if stage == "slat":
        out["voxels_per_sample"] = FULL_SLAT_VOXELS if size == "full" else 600
    out["ok"] = bool(torch.isfinite(torch.tensor(out["loss"]))) and getattr(res, "skipped", False) is False
    del trainer, student, teacher
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ driver

def write_repo(repo: Path, size: str) -> Path:
    if not (repo / "pipeline.json").exists():
        write_trellis_repo(repo, full_size=size == "full")
    if not (repo / "dinov2" / "config.json").exists():
        if size == "full":
            save_tiny_dinov2(repo / "dinov2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
        else:
            save_tiny_dinov2(repo / "dinov2", hidden_size=64)
    return repo


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU check ({report['size']} models on {m['device_name']})", "",
             f"torch {m['torch']}, CUDA {m['cuda']}, {m['platform']}; wall {report['wall_s']:.0f} s; "
             f"{'all checks passed' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    c = report["checks"]
    if "backends" in c and "rows" in c["backends"]:
        lines += ["## Backend parity vs the float32 CPU reference", "", "| op | backend | precision | rel. error | "
                  "tolerance |", "|---|---|---|---:|---:|"]
        lines += [f"| {r['op']} | {r['backend']} | {r['precision']} | {r['rel_error']:.2e} | {r['tolerance']:.0e} |"
                  for r in c["backends"]["rows"]]
        if c["backends"].get("missing_backends"):
            lines.append(f"\nnot installed: {', '.join(c['backends']['missing_backends'])}")
        lines.append("")
    if "precision" in c and "rows" in c["precision"]:
        lines += ["## Reduced precision vs float32", "", "| model | quantity | precision | rel. error | tolerance |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['quantity']} | {r['precision']} | {r['rel_error']:.2e} | {r['tolerance']:.0e} |"
                  for r in c["precision"]["rows"]]
        lines.append("")
    if "latency" in c and "rows" in c["latency"]:
        lat = c["latency"]
        lines += [f"## Warm latency of the chain ({lat['device']}, {lat['precision']})", "",
                  "| steps | sampling s | total s | paper (A800) s |", "|---|---:|---:|---:|"]
        for n in sorted(lat["seconds_total"]):
            lines.append(f"| {n}+{n} | {lat['seconds_sampling'][n]:.3f} | {lat['seconds_total'][n]:.3f} | "
                         f"{lat['paper_a800_s'].get(f'{n}+{n}', '')} |")
        if lat["speedup_1_vs_25"] is not None:
            lines += ["", f"25+25 / 1+1 = {lat['speedup_1_vs_25']:.1f}x, 25+25 / 2+2 = {lat['speedup_2_vs_25']:.1f}x"]
        lines.append("")
    steps = [c[k] for k in ("train_ss", "train_slat") if k in c and "step_s" in c[k]]
    if steps:
        lines += ["## One MDT-dist training step at the preset's per-GPU batch", "",
                  "| preset | batch / split | checkpointing | autocast | step s | peak GiB |", "|---|---|---|---|---:|---:|"]
        for s in steps:
            peak = s.get("peak_gpu_gib", s.get("peak_rss_gib"))
            lines.append(f"| trellis-{s['stage']} | {s['per_gpu_batch']} / {s['batch_split']} | "
                         f"{s['gradient_checkpointing']} | {s['autocast']} | {s['step_s']:.2f} | {peak:.1f} |")
        lines.append("")
    for k, v in c.items():
        if "error" in v:
            lines.append(f"- {k}: error: {v['error']}")
    return "\n".join(lines) + "\n"


def run(out: Path, size: str, budget_s: float) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    repo = write_repo(out / f"trellis-random-{size}", size)
    checks: dict[str, dict] = {}
    plan = [("backends", lambda: backend_parity(device, size)),
            ("precision", lambda: precision_errors(repo, device, size)),
            ("train_ss", lambda: training_step(repo, "ss", device, size)),
            ("train_slat", lambda: training_step(repo, "slat", device, size)),
            ("latency", lambda: chain_latency(repo, device, size, out))]
    for name, fn in plan:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            checks[name] = {"ok": False, "error": f"not run: the {budget_s:.0f} s budget was spent ({elapsed:.0f} s)"}
            continue
        t0 = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            checks[name] = fn()
        except Exception as e:                                        # one failing check must not hide the rest
            traceback.print_exc()
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        checks[name]["wall_s"] = time.perf_counter() - t0
        print(f"[gpu-check] {name}: {'ok' if checks[name]['ok'] else 'FAILED'} "
              f"({checks[name]['wall_s']:.1f} s)", flush=True)
    failed = [k for k, v in checks.items() if not v["ok"]]
    report = {"device": device, "size": size, "ok": not failed, "failed": failed,
              "wall_s": time.perf_counter() - start, "checks": checks,
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda,
                          "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
                          "threads": torch.get_num_threads()}}
    if device == "cpu":
        report["note"] = ("No CUDA device: this is the CPU self-test (tiny models, the same code paths); "
                          "spconv / flash-attn parity, fp16 latency and GPU memory need a GPU.")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/gpu-check", help="report directory (and the random-weight models)")
    p.add_argument("--size", choices=["full", "tiny"], default=None,
                   help="model size (default: full on CUDA, tiny on CPU: the self-test)")
    p.add_argument("--budget-s", type=float, default=480.0, help="checks not started by then are reported as not run")
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        p.error("--budget-s must be > 0")
    cuda = torch.cuda.is_available()
    size = a.size or ("full" if cuda else "tiny")
    if not cuda and size == "full":
        p.error("--size full needs a CUDA device (the CPU rehearsal is `make rehearse`)")
    if not cuda:
        print("gpu-check: no CUDA device; running the CPU self-test on tiny models", flush=True)
    report = run(Path(a.out), size, a.budget_s)
    print(f"-> {Path(a.out) / 'gpu_check.json'}, {Path(a.out) / 'gpu_check.md'}")
    if not report["ok"]:
        print(f"gpu-check: failed: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    if not cuda:
        print("gpu-check: no CUDA device: CPU self-test passed; run it on a GPU machine for the real figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

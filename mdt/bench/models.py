"""Forward latency, achieved FLOP rate and peak memory of the full-size TRELLIS flow transformers (random weights,
one sample), each against a limit measured on the same machine in the same run.

    python -m mdt.bench.models [--models ss_flow slat_flow] [--size full|tiny] [--voxels 10000] [--repeats 1]
                               [--device cpu|cuda] [--json PATH]

Each measurement runs in a fresh subprocess so that peak memory is that model's alone. Per model and precision:

* FLOPs of one forward, counted with torch.utils.flop_counter on a first (untimed, warm-up) forward; matmuls,
  convolutions and attention (a multiply-add counts 2);
* latency of the following forward(s) (the best of `--repeats`) -> achieved GFLOP/s, next to the machine's
  matmul peak measured in the same process (best of several square matmuls, n = 2048 on CPU / 8192 on CUDA, in
  the same dtype and thread count) -> `fraction_of_peak`;
* peak memory of the forward (CPU: peak resident set size above the process's size after imports; CUDA: the
  allocator's peak) next to parameters + an activation estimate (the largest input + output of any leaf module
  during the forward, plus the model's inputs) -> `memory_over_estimate`.
CPU runs compute in float32; CUDA runs are reported in fp16 (the published layout) and in bf16.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time

import torch

from mdt.models import build_model
from mdt.sparse import SparseTensor
from torch.utils import flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode

FULL_SIZE = {
    "ss_flow": ("SparseStructureFlowModel", dict(
        resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, use_fp16=False)),
    "slat_flow": ("SLatFlowModel", dict(
        resolution=64, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=2, num_io_res_blocks=2, io_block_channels=[128], pe_mode="ape",
        qk_rms_norm=True, use_fp16=False)),
}
COND_TOKENS = 1374  # DINOv2 ViT-L/14-reg at 518 px: CLS + 4 registers + 37² patches
# The same architectures at test size (a seconds-long run of the whole benchmark).
TINY = {
    "ss_flow": ("SparseStructureFlowModel", dict(
        resolution=8, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2,
        num_heads=4, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, use_fp16=False)),
    "slat_flow": ("SLatFlowModel", dict(
        resolution=64, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2,
        num_heads=4, mlp_ratio=4, patch_size=2, num_io_res_blocks=1, io_block_channels=[16], pe_mode="ape",
        qk_rms_norm=True, use_fp16=False)),
}
SIZES = {"full": (FULL_SIZE, COND_TOKENS), "tiny": (TINY, 16)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RATIO_FIELDS = ("flops_per_forward", "achieved_gflops", "peak_matmul_gflops", "fraction_of_peak",
                "peak_memory_mb", "parameters_mb", "activations_estimate_mb", "memory_over_estimate")


def _register_cpu_attention_flops() -> None:
    """torch's flop counter has no formula for the CPU flash-attention kernel that F.scaled_dot_product_attention
    dispatches to on CPU; it is the same computation as the CUDA flash kernel (2 matmuls)."""

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry or op.default in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def shell_voxels(n: int, resolution: int = 64) -> torch.Tensor:
    """About n voxels on a sphere-like shell in the 64³ grid (a surface, like real assets), as coords [n, 4]."""
    g = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = (g.float() + 0.5 - resolution / 2).norm(dim=1)
    radius = math.sqrt(n / (4 * math.pi * 1.2))
    order = torch.argsort((d - radius).abs())
    chosen = g[torch.sort(order[:n]).values]
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), chosen], 1).int()


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(device: str, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best rate of an n x n x n matmul (2 n³ FLOPs) in `dtype` on `device`, GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):                     # the first is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "feats") and hasattr(obj, "coords"):
        return _nbytes(obj.feats) + _nbytes(obj.coords)
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def count_forward(model: torch.nn.Module, inputs: tuple) -> tuple[int, int]:
    """(FLOPs, largest input + output bytes of a leaf module) of one forward (no grad)."""

    _register_cpu_attention_flops()
    largest = [0]

    def hook(module, args, out):
        largest[0] = max(largest[0], _nbytes(args) + _nbytes(out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return int(counter.get_total_flops()), largest[0]


def measure(model_key: str, size: str, voxels: int, repeats: int, device: str, precision: str) -> dict:
    rss_start = rss_mb()
    table, cond_tokens = SIZES[size]
    name, args = table[model_key]
    dtype = DTYPES[precision]
    torch.manual_seed(0)
    model = build_model(name, args, device=device).eval()
    if device == "cuda" and precision == "fp16":
        model.convert_to_fp16()
    params = sum(p.numel() for p in model.parameters())
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cond = torch.randn(1, cond_tokens, args["cond_channels"], device=device)
    t = torch.tensor([500.0], device=device)
    if model_key == "ss_flow":
        r = args["resolution"]
        x = torch.randn(1, args["in_channels"], r, r, r, device=device)
        tokens = r ** 3
    else:
        coords = shell_voxels(voxels, args["resolution"]).to(device)
        x = SparseTensor(torch.randn(coords.shape[0], args["in_channels"], device=device), coords)
        tokens = int(torch.unique(coords[:, 1:] // args["patch_size"], dim=0).shape[0])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    rss_before = rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with autocast:
        flops, largest_leaf = count_forward(model, (x, t, cond))     # also the warm-up forward
    times = []
    with torch.no_grad(), autocast:
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, cond)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    latency = min(times)
    act_bytes = largest_leaf + _nbytes((x, t, cond))
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = peak_rss_mb() - rss_start
    peak_rss = peak_rss_mb()
    del model, x, cond
    # after the memory peak is read (its buffers would count otherwise); the tiny size needs no realistic peak
    n = {"cpu": 2048, "cuda": 8192}[device] if size == "full" else 512
    peak_gflops = matmul_peak_gflops(device, dtype, n)
    achieved = flops / latency / 1e9
    estimate_mb = (params_bytes + act_bytes) / 2 ** 20
    out = {"model": model_key, "size": size, "device": device, "precision": precision, "parameters": params,
           "transformer_tokens": tokens, "latency_s": latency, "latency_all_s": times,
           "threads": torch.get_num_threads(),
           "flops_per_forward": flops, "achieved_gflops": achieved, "peak_matmul_gflops": peak_gflops,
           "fraction_of_peak": achieved / peak_gflops,
           "peak_memory_mb": peak_mb, "parameters_mb": params_bytes / 2 ** 20,
           "activations_estimate_mb": act_bytes / 2 ** 20, "memory_over_estimate": peak_mb / estimate_mb}
    if device == "cpu":
        out.update(rss_after_imports_mb=rss_start, rss_after_build_mb=rss_before, peak_rss_mb=peak_rss)
    if model_key == "slat_flow":
        out["voxels"] = voxels
    return out


def table(results: list[dict]) -> str:
    head = (f"| {'model':<9} | {'prec':<4} | {'params':>7} | {'tokens':>6} | {'GFLOP/fwd':>9} | {'latency s':>9} | "
            f"{'GFLOP/s':>8} | {'peak GFLOP/s':>12} | {'of peak':>7} | {'peak MB':>8} | {'params+act MB':>13} | "
            f"{'mem/est':>7} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        lines.append(
            f"| {r['model']:<9} | {r['precision']:<4} | {r['parameters'] / 1e6:>6.1f}M | {r['transformer_tokens']:>6} | "
            f"{r['flops_per_forward'] / 1e9:>9.1f} | {r['latency_s']:>9.3f} | {r['achieved_gflops']:>8.1f} | "
            f"{r['peak_matmul_gflops']:>12.1f} | {r['fraction_of_peak']:>7.2f} | {r['peak_memory_mb']:>8.0f} | "
            f"{r['parameters_mb'] + r['activations_estimate_mb']:>13.0f} | {r['memory_over_estimate']:>6.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ss_flow", "slat_flow"], choices=sorted(FULL_SIZE))
    p.add_argument("--size", default="full", choices=sorted(SIZES))
    p.add_argument("--voxels", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.repeats < 1 or a.voxels < 1:
        p.error("--repeats and --voxels must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if a.child:
        print(json.dumps(measure(a.child[0], a.size, a.voxels, a.repeats, a.device, a.child[1])))
        return
    precisions = ["fp16", "bf16"] if a.device == "cuda" else ["fp32"]
    results = []
    for model_key in a.models:
        for precision in precisions:
            cmd = [sys.executable, "-m", "mdt.bench.models", "--child", model_key, precision, "--size", a.size,
                   "--voxels", str(a.voxels), "--repeats", str(a.repeats), "--device", a.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            results.append(r)
            print(f"{model_key} {a.device}/{precision}: {r['latency_s']:.3f} s, {r['achieved_gflops']:.1f} GFLOP/s "
                  f"= {r['fraction_of_peak']:.2f} of the measured matmul peak", flush=True)
    print(table(results))
    print(f"machine: {platform.processor() or platform.machine()}, {results[0]['threads']} threads, "
          f"torch {torch.__version__}")
    if a.json:
        report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "threads": results[0]["threads"], "torch": torch.__version__, "device": a.device},
                  "results": results}
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""Matrix-multiply throughput of float32, bfloat16 and float16 on this CPU, side by side in one run: which half
precision a CPU stage should use when a preset asks for one (`precision: bf16`, `features.dtype: bfloat16`).

    python -m mdt.bench.cpu_gemm [--size 4096 1024 4096] [--threads N] [--repeats 3] [--json PATH]

Times `torch.nn.functional.linear` of an [M, K] input with an [N, K] weight (2·M·K·N flops per call, the shape of
a transformer MLP layer at 4096 tokens and width 1024) after one untimed call, and prints GFLOPS per dtype and
each dtype's speed relative to float32. The CPU's AVX512-BF16 / AMX / AVX512-FP16 flags are printed beside them:
without a native half-precision instruction, PyTorch falls back to a slow conversion path for that dtype.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in FLAGS if x in have]
    except OSError:
        pass
    return []


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    torch.nn.functional.linear(x, w)                     # untimed: kernel selection, first-touch pages
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    seconds = (time.perf_counter() - t0) / repeats
    return 2 * m * k * n / seconds / 1e9


def run(size=(4096, 1024, 4096), threads: int | None = None, repeats: int = 3) -> dict:
    if threads:
        torch.set_num_threads(threads)
    gflops = {name: gemm_gflops(*size, dt, repeats) for name, dt in DTYPES.items()}
    return {"size_mkn": list(size), "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
            "gflops": gflops, "vs_fp32": {k: v / gflops["fp32"] for k, v in gflops.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[4096, 1024, 4096], metavar=("M", "K", "N"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.repeats < 1 or min(a.size) < 1:
        ap.error("--repeats and --size must be >= 1")
    res = run(tuple(a.size), a.threads, a.repeats)
    print(f"GEMM {'x'.join(map(str, res['size_mkn']))}, {res['threads']} threads, "
          f"CPU flags: {', '.join(res['cpu_flags']) or 'no native half precision'}")
    for k in DTYPES:
        print(f"  {k}: {res['gflops'][k]:7.1f} GFLOPS  ({res['vs_fp32'][k]:.2f}x fp32)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Forward latency and peak memory of the full-size TRELLIS flow transformers (random weights, one sample).

    python -m mdt.bench.models [--models ss_flow slat_flow] [--voxels 10000] [--repeats 1] [--device cpu|cuda]

Each measurement runs in a fresh subprocess so that peak memory is that model's alone: on CPU the peak
resident set size (and its growth during the forward pass), on CUDA the allocator's peak. CPU runs compute
in float32; CUDA runs are reported in fp16 (the published layout) and in bf16.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

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


def shell_voxels(n: int, resolution: int = 64) -> torch.Tensor:
    """About n voxels on a sphere-like shell in the 64³ grid (a surface, like real assets), as coords [n, 4]."""
    g = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = (g.float() + 0.5 - resolution / 2).norm(dim=1)
    radius = math.sqrt(n / (4 * math.pi * 1.2))
    order = torch.argsort((d - radius).abs())
    chosen = g[torch.sort(order[:n]).values]
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), chosen], 1).int()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_key: str, voxels: int, repeats: int, device: str, precision: str) -> dict:
    from mdt.models import build_model
    from mdt.sparse import SparseTensor

    name, args = FULL_SIZE[model_key]
    torch.manual_seed(0)
    model = build_model(name, args, device=device).eval()
    if device == "cuda" and precision == "fp16":
        model.convert_to_fp16()
    params = sum(p.numel() for p in model.parameters())
    cond = torch.randn(1, COND_TOKENS, 1024, device=device)
    t = torch.tensor([500.0], device=device)
    if model_key == "ss_flow":
        x = torch.randn(1, 8, 16, 16, 16, device=device)
        tokens = 16 ** 3
    else:
        coords = shell_voxels(voxels).to(device)
        x = SparseTensor(torch.randn(coords.shape[0], 8, device=device), coords)
        tokens = int(torch.unique(coords[:, 1:] // 2, dim=0).shape[0])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    rss_before = rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad(), autocast:
        for _ in range(repeats + (1 if device == "cuda" else 0)):  # one warm-up on CUDA (kernel selection)
            start = time.perf_counter()
            model(x, t, cond)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if device == "cuda":
        times = times[1:]
    out = {"model": model_key, "device": device, "precision": precision, "parameters": params,
           "transformer_tokens": tokens, "latency_s": min(times), "latency_all_s": times,
           "threads": torch.get_num_threads()}
    if device == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        out["rss_after_build_mb"] = rss_before
        out["peak_rss_mb"] = rss_mb()
        out["forward_peak_growth_mb"] = out["peak_rss_mb"] - rss_before
    if model_key == "slat_flow":
        out["voxels"] = voxels
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ss_flow", "slat_flow"], choices=sorted(FULL_SIZE))
    p.add_argument("--voxels", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.child[0], a.voxels, a.repeats, a.device, a.child[1])))
        return
    precisions = ["fp16", "bf16"] if a.device == "cuda" else ["fp32"]
    results = []
    for model_key in a.models:
        for precision in precisions:
            cmd = [sys.executable, "-m", "mdt.bench.models", "--child", model_key, precision, "--voxels",
                   str(a.voxels), "--repeats", str(a.repeats), "--device", a.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            results.append(r)
            mem = (f"peak GPU memory {r['peak_gpu_memory_mb']:.0f} MB" if a.device == "cuda" else
                   f"peak RSS {r['peak_rss_mb']:.0f} MB (weights+setup {r['rss_after_build_mb']:.0f} MB, "
                   f"forward +{r['forward_peak_growth_mb']:.0f} MB)")
            extra = f", {r['voxels']} voxels -> {r['transformer_tokens']} tokens" if "voxels" in r else \
                f", {r['transformer_tokens']} tokens"
            print(f"{model_key:9s} {a.device}/{precision}: {r['parameters'] / 1e6:.1f} M params{extra}, "
                  f"forward {r['latency_s']:.2f} s, {mem}, {r['threads']} threads", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
